"""Models built from resconv modules, their layer table, and the torch.nn reference."""
from .deep import StagedNet, cifar_resnet, plain18, plain_net, residual_net
from .layers import ConvLayer, resnet18_layers
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18
from .torch_resnet import TorchResNet, torch_resnet18

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18", "ConvLayer", "resnet18_layers", "TorchResNet",
           "torch_resnet18", "StagedNet", "plain_net", "residual_net", "cifar_resnet", "plain18"]
