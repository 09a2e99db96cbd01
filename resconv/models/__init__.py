"""Models built from resconv modules."""
from .resnet import BasicBlock, Bottleneck, ResNet, resnet18

__all__ = ["ResNet", "BasicBlock", "Bottleneck", "resnet18"]
