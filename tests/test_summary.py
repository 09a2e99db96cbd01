"""resconv.summary / conv_output_size / receptive_field (resconv.model_summary): output
sizes, parameter counts, MACs and receptive fields, pinned to the figures everyone quotes (He et al. 2016's ResNet-18, torchvision's counts), and the analytic
receptive field against the one measured from the input gradient of the centre unit."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import resconv
from resconv.models import cifar_resnet, resnet18
from resconv.model_summary import conv_output_size, receptive_field, summary


@pytest.mark.parametrize("args, expected", [
    ((224, 3, 1, 1), 224),
    ((224, 7, 2, 3), 112),
    ((32, 3, 2, 1), 16),
    ((32, 3, 1, 0), 30),
    ((32, 3, 1, 2, 2), 32),  # dilation 2 spans 5 pixels
    ((32, 5, 1, "same", 3), 32),
    ((32, 5, 1, "valid"), 28),
    (((32, 20), (3, 1), (2, 1), (1, 0)), (16, 20)),
])
def test_conv_output_size(args, expected):
    assert conv_output_size(*args) == expected


def test_conv_output_size_matches_nn_conv2d():
    for H, k, s, p, d in [(17, 3, 2, 1, 1), (9, 4, 3, 2, 2), (31, 1, 2, 0, 1), (8, 2, 2, 0, 1)]:
        out = nn.Conv2d(1, 1, k, s, p, d)(torch.randn(1, 1, H, H))
        assert conv_output_size(H, k, s, p, d) == out.shape[-1]


def test_conv_output_size_errors():
    with pytest.raises(ValueError, match="padding='same' is not supported for strided"):
        conv_output_size(32, 3, 2, "same")
    with pytest.raises(ValueError, match="stride: expected positive"):
        conv_output_size(32, 3, 0)
    with pytest.raises(ValueError, match="kernel_size: the window spans 5 pixels"):
        conv_output_size(3, 5)
    with pytest.raises(TypeError, match="size: expected an int"):
        conv_output_size(32.0, 3)


def test_public_names():
    assert resconv.summary is summary and resconv.conv_output_size is conv_output_size
    assert resconv.receptive_field is receptive_field


def test_one_conv_on_224():
    s = summary(resconv.nn.Conv2d(3, 64, 3, padding=1), (3, 224, 224))
    assert s.layers[0].output_shape == (1, 64, 224, 224)
    assert s.total_params == 1792 and s.layers[0].params == 1792
    assert s.total_macs == 64 * 224 * 224 * 27


@pytest.mark.parametrize("variant, params, macs", [("cifar", 11_173_962, 555_422_720),
                                                   ("imagenet", 11_689_512, 1_814_073_344)])
def test_resnet18_parameters_and_macs(variant, params, macs):
    size = 32 if variant == "cifar" else 224
    model = resnet18(10 if variant == "cifar" else 1000, variant)
    s = summary(model, (3, size, size), depth=1)
    assert s.total_params == params  # CIFAR: the common "11.2 M"; ImageNet: torchvision's 11,689,512
    assert s.total_macs == macs  # 0.555 / 1.814 GMAC per image
    assert sum(r.params for r in s.layers) == params  # every Parameter in exactly one top-level row
    torchvision = pytest.importorskip("torchvision")
    if variant == "imagenet":
        assert summary(torchvision.models.resnet18(), (3, 224, 224)).total_params == params


def test_resnet18_cifar_stages_and_receptive_fields():
    s = summary(resnet18(10, "cifar"), (3, 32, 32), depth=1)
    names = ["conv1", "layer1", "layer2", "layer3", "layer4", "avgpool"]
    assert [s[n].output_shape[-1] for n in names] == [32, 32, 16, 8, 4, 1]
    assert [s[n].rf for n in names[:5]] == [(3, 3), (11, 11), (25, 25), (53, 53), (109, 109)]
    assert [s[n].jump for n in names[:5]] == [(1, 1), (1, 1), (2, 2), (4, 4), (8, 8)]


def test_resnet18_imagenet_receptive_fields_match_torchvision():
    torchvision = pytest.importorskip("torchvision")
    ours = summary(resnet18(), (3, 224, 224), depth=1)
    theirs = summary(torchvision.models.resnet18(), (3, 224, 224), depth=1)
    for n in ["conv1", "maxpool", "layer1", "layer2", "layer3", "layer4"]:
        assert ours[n].rf == theirs[n].rf and ours[n].output_shape == theirs[n].output_shape
    assert ours["layer4"].rf == (435, 435)


def test_receptive_field_worked_examples():
    ten = nn.Sequential(*[nn.Conv2d(1, 1, 3) for _ in range(10)])
    assert receptive_field(ten, (1, 32, 32)).size == (21, 21)
    assert receptive_field(nn.Conv2d(1, 1, 3, dilation=2), (1, 16, 16)).size == (5, 5)
    rf = receptive_field(nn.Sequential(nn.Conv2d(1, 1, 3, stride=2), nn.MaxPool2d(2), nn.Conv2d(1, 1, 3)), (1, 64, 64))
    assert rf.size == (1 + 2 + 1 * 2 + 2 * 4,) * 2 and rf.jump == (4, 4)


@pytest.mark.parametrize("size", [32, 72])
def test_analytic_and_measured_receptive_fields_agree_on_resnet18(size):
    """At 32x32 the deeper stages' fields are clipped by the image; at 72 layer3's 53 is whole."""
    model = resnet18(10, "cifar")
    for layer in ["conv1", "layer1", "layer2", "layer3", "layer4"]:
        a = receptive_field(model, (3, size, size), layer=layer)
        e = receptive_field(model, (3, size, size), layer=layer, method="empirical")
        assert a.centre == e.centre, layer
    assert receptive_field(model, (3, 72, 72), layer="layer3", method="empirical").size == (53, 53)


def test_analytic_and_measured_agree_with_max_pool_and_even_padding():
    model = nn.Sequential(nn.Conv2d(3, 4, 4, padding="same"), nn.ReLU(), nn.MaxPool2d(3, 2, 1),
                          nn.Conv2d(4, 4, 3, stride=2, dilation=2, padding=1), nn.BatchNorm2d(4))
    for size in (24, 40):
        assert receptive_field(model, (3, size, size)).centre == \
            receptive_field(model, (3, size, size), method="empirical").centre


def test_summary_leaves_the_model_alone():
    model = cifar_resnet(20)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    summary(model, (3, 32, 32))
    receptive_field(model, (3, 32, 32), layer="layer1", method="empirical")
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_receptive_field_errors():
    with pytest.raises(ValueError, match="method: expected"):
        receptive_field(nn.Conv2d(1, 1, 3), (1, 8, 8), method="guess")
    with pytest.raises(ValueError, match="layer: 'nope' is not a module"):
        receptive_field(nn.Conv2d(1, 1, 3), (1, 8, 8), layer="nope")
    with pytest.raises(ValueError, match="input_size: expected"):
        summary(nn.Conv2d(1, 1, 3), (8, 8))
