"""ResNet-18 from resconv modules against torchvision, and convert()/revert() of torchvision
models (outputs, gradients, state_dict keys, parameter sharing)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resconv
from resconv import tolerances as T
from resconv.models import resnet18
from conftest import randomise_bn, set_backend, test_device

torchvision = pytest.importorskip("torchvision")


def _close(a, b, factor=4.0):
    tol = T.tolerance(torch.float32)
    cmp = T.compare(a, b, T.Tolerance(tol.rtol * factor, tol.atol * factor))
    assert cmp.ok, str(cmp)


def _close_as_torch_nn(a, b, peer):
    """Training-mode logits: BatchNorm over a few values per channel (layer4 sees 2 x 1 x 1
    or 2 x 2 x 2 here) amplifies float32 rounding for torch.nn too, so the bound is what
    torch.nn in float32 makes on the same input (resconv.tolerances.compare_with_peer)."""
    cmp = T.compare_with_peer(a, b, peer, T.tolerance(torch.float32))
    assert cmp.ok, str(cmp)


def _grad_close_as_torch_nn(name, grad, ref, peer):
    """A whole network's float32 gradients at initialisation are ill-conditioned for torch.nn
    too (a few percent of the largest element): compare them as norms, relative to the
    float64 reference, within 2x torch.nn float32's own distance plus 1e-4."""
    ref_norm = ref.norm().clamp_min(1e-30)
    rel = ((grad.double().cpu() - ref).norm() / ref_norm).item()
    rel_peer = ((peer.double().cpu() - ref).norm() / ref_norm).item()
    assert rel <= 2 * rel_peer + 1e-4, (name, rel, rel_peer)


def test_imagenet_variant_has_torchvision_keys_and_logits():
    tv = randomise_bn(torchvision.models.resnet18())
    ours = resnet18()
    sd_ours, sd_tv = ours.state_dict(), tv.state_dict()
    assert list(sd_ours) == list(sd_tv)
    assert all(sd_ours[k].shape == sd_tv[k].shape for k in sd_tv)
    ours.load_state_dict(sd_tv)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        _close(set_backend(ours, "torch").eval()(x), tv.double().eval()(x.double()))
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in tv.parameters())


def test_cifar_variant_layout():
    m = resnet18(num_classes=10, variant="cifar")
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1) and isinstance(m.maxpool, nn.Identity)
    assert set_backend(m, "torch")(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="variant"):
        resnet18(variant="tiny")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_imagenet_resnet18_train_step_matches_torchvision(backend):
    """One training forward/backward of resconv's ResNet-18 against torchvision's with the
    same state_dict. torch backend: both in float64, to float64 rounding (the same function).
    triton backend (float32; the interpreter on CPU): within 2x of torch.nn float32's own
    distance to float64 (resconv.tolerances.compare_with_peer)."""
    dev = test_device() if backend == "triton" else "cpu"
    dtype = torch.float32 if backend == "triton" else torch.float64
    tv = randomise_bn(torchvision.models.resnet18(num_classes=10))
    ours = set_backend(resnet18(num_classes=10), backend)
    for m in ours.modules():
        if hasattr(m, "allow_tf32"):
            m.allow_tf32 = False  # the peer is IEEE float32 (a GPU would use TF32 by default)
    ours.load_state_dict(tv.state_dict())
    ours.to(dev, dtype).train()
    tv32 = copy.deepcopy(tv).train()
    tv = tv.double().train()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)  # small: the interpreter runs every kernel
    out = ours(x.to(dev, dtype))
    ref = tv(x)
    if dtype == torch.float64:
        tol64 = T.tolerance(torch.float64)
        cmp = T.compare(out, ref, T.Tolerance(tol64.rtol * 1e3, tol64.atol * 1e3))
        assert cmp.ok, str(cmp)
    else:
        _close_as_torch_nn(out, ref, tv32(x.float()))
        tv32(x.float()).sum().backward()
    ref.sum().backward()
    out.sum().backward()
    for (n1, p1), (n2, p2), (_, p3) in zip(ours.named_parameters(), tv.named_parameters(), tv32.named_parameters()):
        assert n1 == n2
        if dtype == torch.float64:
            rel = ((p1.grad - p2.grad).norm() / p2.grad.norm()).item()
            assert rel < 1e-7, (n1, rel)
        else:
            _grad_close_as_torch_nn(n1, p1.grad, p2.grad, p3.grad)
    for k, v in tv.state_dict().items():
        if "running" in k:
            _close(ours.state_dict()[k], v)


def _zoo_model(zoo: str, arch: str):
    if zoo == "torchvision":
        return getattr(torchvision.models, arch)(num_classes=10)
    timm = pytest.importorskip("timm")
    return timm.create_model(arch, pretrained=False, num_classes=10)


# (zoo, arch, fused patterns): torchvision's stem is fused too; timm's stem conv is called by
# a custom forward, so convert leaves it (and says so).
ZOO = [
    ("torchvision", "resnet18", 1 + 8), ("torchvision", "resnet34", 1 + 16), ("torchvision", "resnet50", 1 + 16),
    ("timm", "resnet18", 8), ("timm", "resnet50", 16),
]


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("zoo,arch,n_fused", ZOO, ids=[f"{z}-{a}" for z, a, _ in ZOO])
def test_convert_and_revert_model_zoo(zoo, arch, n_fused, mode):
    """convert() computes the same function: the converted model, run in float64 (torch
    backend), gives the original float64 model's outputs, parameter gradients and running
    statistics to float64 rounding; the kernels' own precision is the conformance tests'."""
    model = randomise_bn(_zoo_model(zoo, arch)).double()
    reference = copy.deepcopy(model)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    converted, report = resconv.convert(model, return_report=True)
    assert converted is model
    assert list(model.state_dict()) == keys, "convert must keep the state_dict keys"
    assert {n: p for n, p in model.named_parameters()} == params, "convert must share the Parameters"
    assert len(report.fused) == n_fused, report  # stem + blocks (downsample fused inside its block)
    if zoo == "timm":
        assert [p for p, _ in report.left] == ["conv1"], report
    block = resconv.models.Bottleneck if arch == "resnet50" else resconv.models.BasicBlock
    assert isinstance(model.layer1[0], block)
    set_backend(model, "torch")
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    model.train(mode == "train")
    reference.train(mode == "train")
    out = model(x)
    ref = reference(x)
    tol64 = T.tolerance(torch.float64)
    cmp = T.compare(out, ref, T.Tolerance(tol64.rtol * 1e3, tol64.atol * 1e3))
    assert cmp.ok, f"logits: {cmp}"
    if mode == "train":
        out.square().mean().backward()
        ref.square().mean().backward()
        named_ref = dict(reference.named_parameters())
        for n, p in model.named_parameters():
            rel = ((p.grad - named_ref[n].grad).norm() / named_ref[n].grad.norm().clamp_min(1e-300)).item()
            assert rel < 1e-7, (n, rel)
        ref_buffers = dict(reference.named_buffers())
        for n, b in model.named_buffers():
            assert torch.allclose(b.double(), ref_buffers[n].double(), rtol=1e-9, atol=1e-12), n
    resconv.revert(model)
    assert type(model.layer1[0]).__module__ == type(reference.layer1[0]).__module__
    assert type(model.conv1) is nn.Conv2d and type(model.bn1) is nn.BatchNorm2d
    assert list(model.state_dict()) == keys
    assert not any(isinstance(m, (resconv.nn._ConvBnNd, resconv.nn.FoldedBatchNorm2d)) for m in model.modules())
    model.eval()
    reference.eval()
    with torch.no_grad():
        _close(model(x), reference(x))


def test_convert_sequential_patterns_and_report():
    seq = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8),
        nn.Conv2d(8, 4, 3), nn.ReLU(),  # no BatchNorm: conv + ReLU
        nn.Conv2d(4, 4, 3), nn.BatchNorm2d(5 - 1 + 0),  # same channels: fused
        nn.Conv2d(4, 4, 1), nn.MaxPool2d(2),  # neither: left alone
    )
    randomise_bn(seq)
    ref = copy.deepcopy(seq).double().eval()
    keys = list(seq.state_dict())
    _, report = resconv.convert(seq, return_report=True)
    assert [k for _, k in report.fused] == ["conv-bn-relu", "conv-bn", "conv-relu", "conv-bn"]
    assert [p for p, _ in report.left] == ["9"]
    assert list(seq.state_dict()) == keys
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        _close(set_backend(seq, "torch").eval()(x), ref(x.double()))
    resconv.revert(seq)
    assert [type(m) for m in seq] == [type(m) for m in ref]
    assert seq[2].inplace


def test_convert_then_move_then_revert_keeps_buffers():
    model = torchvision.models.resnet18()
    resconv.convert(model)
    model.to(torch.float64)
    assert model.layer2[0].downsample[1].running_mean.dtype == torch.float64
    resconv.revert(model)
    assert model.layer2[0].downsample[1].running_mean.dtype == torch.float64
    assert model.bn1.running_var.dtype == torch.float64


def test_custom_forward_conv_is_left_alone():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y  # the conv output has two users: fusing would be wrong

    net = Net()
    _, report = resconv.convert(net, return_report=True)
    assert report.fused == [] and [p for p, _ in report.left] == ["conv"]
    assert type(net.conv) is nn.Conv2d
