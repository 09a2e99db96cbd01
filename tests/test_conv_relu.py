"""Plain Conv + ReLU fusion: resconv.nn.ConvReLU2d against torch.nn (float64), and
resconv.convert / revert of the classic small CNN that has no BatchNorm."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import resconv
import resconv.nn as rnn
from resconv import tolerances as T
from conftest import set_backend, test_device


def _small_cnn(relu_inplace: bool) -> nn.Sequential:
    """The classic small CNN: Conv(3,32)+ReLU+MaxPool, Conv(32,64)+ReLU+MaxPool, Linear."""
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(inplace=relu_inplace), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(inplace=relu_inplace), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 4 * 4, 10),
    )


def test_conv_relu2d_is_conv_then_relu_in_float64():
    conv = nn.Conv2d(5, 7, 3, stride=2, padding=1, dilation=1).double()
    with torch.no_grad():  # float64 values no float32 can hold: a float32 detour shows
        conv.bias.copy_(torch.randn(7, dtype=torch.float64))
    fused = rnn.ConvReLU2d.from_modules(conv)
    assert fused.weight is conv.weight and fused.bias is conv.bias
    assert list(fused.state_dict()) == ["weight", "bias"]
    x = torch.randn(2, 5, 9, 11, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    fused.backend = "torch"
    out = fused(x)
    ref = torch.relu(conv(x_ref))
    assert torch.equal(out, ref)
    g = torch.randn_like(ref)
    out.backward(g)
    (gx, gw, gb) = (x.grad, conv.weight.grad.clone(), conv.bias.grad.clone())
    conv.zero_grad()
    ref.backward(g)
    torch.testing.assert_close(gx, x_ref.grad, rtol=0, atol=0)
    torch.testing.assert_close(gw, conv.weight.grad, rtol=1e-12, atol=0)
    torch.testing.assert_close(gb, conv.bias.grad, rtol=1e-12, atol=0)


def test_conv_relu2d_constructor_is_nn_conv2d():
    m = rnn.ConvReLU2d(3, 4, 3, padding="same", padding_mode="circular")
    assert isinstance(m, nn.Conv2d) and m.bias is not None
    ref = nn.Conv2d(3, 4, 3, padding="same", padding_mode="circular").double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 3, 6, 6)
    cmp = T.compare(m(x), torch.relu(ref(x.double())), T.tolerance(torch.float32))
    assert cmp.ok, str(cmp)
    with pytest.raises(TypeError, match="conv: expected a torch.nn.Conv2d"):
        rnn.ConvReLU2d.from_modules(nn.Linear(3, 4))


def test_conv_relu2d_triton_backend_float32():
    device = test_device()
    m = rnn.ConvReLU2d(4, 8, 3, padding=1).to(device)
    m.backend = "triton"
    x = torch.randn(2, 4, 6, 6, device=device)
    ref = torch.relu(nn.functional.conv2d(x.double(), m.weight.double(), m.bias.double(), padding=1))
    cmp = T.compare(m(x), ref, T.tolerance(torch.float32))
    assert cmp.ok, str(cmp)


@pytest.mark.parametrize("relu_inplace", [False, True])
def test_convert_fuses_the_small_cnn_and_revert_restores_it(relu_inplace):
    model = _small_cnn(relu_inplace)
    ref = copy.deepcopy(model).double()
    keys = list(model.state_dict())
    params = dict(model.named_parameters())
    _, report = resconv.convert(model, return_report=True)
    assert report.fused == [("0", "conv-relu"), ("3", "conv-relu")]
    assert report.left == []
    assert [type(m).__name__ for m in model] == ["ConvReLU2d", "FoldedReLU", "MaxPool2d", "ConvReLU2d",
                                                 "FoldedReLU", "MaxPool2d", "Flatten", "Linear"]
    assert list(model.state_dict()) == keys and dict(model.named_parameters()) == params

    # The same function, in float64: outputs and every parameter gradient.
    set_backend(model.double(), "torch")
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    out, out_ref = model(x), ref(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-12, atol=1e-12)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-10, atol=1e-12, msg=name)

    resconv.revert(model)
    assert [type(m) for m in model] == [type(m) for m in ref]
    assert model[1].inplace == relu_inplace and model[0].weight is params["0.weight"]
    torch.testing.assert_close(model(x), out_ref, rtol=1e-12, atol=1e-12)
