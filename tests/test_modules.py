"""Drop-in modules: construction, state_dict, parameter sharing, BatchNorm semantics (running
statistics, momentum=None, affine=False, track_running_stats=False, train/eval switching),
the eval fold cache, and inputs left untouched."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import resconv.nn as rnn
from resconv import tolerances as T
from conftest import set_backend, test_device

BACKENDS = ["torch", "triton"]


def _dev(backend):
    return test_device() if backend == "triton" else "cpu"


def _close(a, b, dtype=torch.float32, grad=False):
    cmp = T.compare(a, b, T.tolerance(dtype, grad=grad))
    assert cmp.ok, str(cmp)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kwargs", [
    dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
    dict(in_channels=6, out_channels=8, kernel_size=(3, 2), stride=(2, 1), padding="valid", bias=False),
    dict(in_channels=6, out_channels=9, kernel_size=3, padding=1, groups=3, padding_mode="reflect"),
    dict(in_channels=6, out_channels=8, kernel_size=4, padding="same", dilation=2, padding_mode="circular"),
], ids=["basic", "valid", "groups-reflect", "same-circular"])
def test_conv2d_is_drop_in(kwargs, backend):
    torch.manual_seed(1)
    ref = nn.Conv2d(**kwargs)
    ours = rnn.Conv2d(**kwargs)
    assert isinstance(ours, nn.Conv2d)
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    ours.backend = backend
    dev = _dev(backend)
    ours, ref64 = ours.to(dev), copy.deepcopy(ref).double()
    for x in (torch.randn(2, 6, 9, 8), torch.randn(6, 9, 8)):  # batched and unbatched
        out = ours(x.to(dev))
        _close(out, ref64(x.double()))
    assert repr(ours).startswith("Conv2d(")


@pytest.mark.parametrize("cls", [rnn.ConvBn2d, rnn.ConvBnReLU2d, rnn.ConvBnAddReLU2d])
def test_fused_state_dict_layout(cls):
    m = cls(4, 8, 3, padding=1, bias=True)
    assert list(m.state_dict()) == ["weight", "bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                                    "bn.num_batches_tracked"]


def test_from_modules_shares_parameters_and_buffers():
    conv, bn = nn.Conv2d(4, 8, 3, padding=1), nn.BatchNorm2d(8)
    m = rnn.ConvBnReLU2d.from_modules(conv, bn)
    assert m.weight is conv.weight and m.bias is conv.bias and m.bn is bn
    m.train()
    m(torch.randn(2, 4, 5, 5)).sum().backward()
    assert conv.weight.grad is not None and bn.weight.grad is not None
    assert bn.num_batches_tracked.item() == 1 and not torch.equal(bn.running_mean, torch.zeros(8))
    conv2, bn2 = m.to_modules()
    assert conv2.weight is conv.weight and bn2 is bn and type(conv2) is nn.Conv2d


def test_from_modules_unregistered_bn_keeps_parent_keys():
    parent = nn.Module()
    parent.conv, parent.bn = nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8)
    keys = list(parent.state_dict())
    parent.conv = rnn.ConvBn2d.from_modules(parent.conv, parent.bn, register_bn=False)
    assert list(parent.state_dict()) == keys


def test_from_modules_rejects_mismatch():
    with pytest.raises(ValueError, match="num_features"):
        rnn.ConvBn2d.from_modules(nn.Conv2d(4, 8, 3), nn.BatchNorm2d(6))
    with pytest.raises(TypeError, match="conv"):
        rnn.ConvBn2d.from_modules(nn.Linear(4, 8), nn.BatchNorm2d(8))


def _torch_pair(m: rnn._ConvBnNd):
    conv, bn = m.to_modules()
    conv, bn = copy.deepcopy(conv), copy.deepcopy(bn)
    return conv.double(), bn.double()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bn_kwargs", [
    dict(),
    dict(momentum=None),
    dict(affine=False),
    dict(track_running_stats=False),
], ids=["default", "momentum-None", "affine-False", "no-running-stats"])
def test_batchnorm_semantics_over_steps(bn_kwargs, backend):
    """Several training steps, then eval, then training again: outputs, gradients, running
    statistics and num_batches_tracked as torch.nn.Conv2d -> BatchNorm2d -> ReLU."""
    dev = _dev(backend)
    m = rnn.ConvBnReLU2d(4, 8, 3, padding=1, **bn_kwargs)
    conv, bn = _torch_pair(m)
    set_backend(m, backend).to(dev)
    for phase in ("train", "train", "train", "eval", "train"):
        m.train(phase == "train")
        conv.train(phase == "train")
        bn.train(phase == "train")
        x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
        xr = x.clone().requires_grad_()
        xo = x.float().to(dev).requires_grad_()
        out = m(xo)
        expect = torch.relu(bn(conv(xr)))
        _close(out, expect)
        g = torch.randn_like(expect)
        out.backward(g.float().to(dev))
        expect.backward(g)
        _close(xo.grad, xr.grad, grad=True)
    _close(m.weight.grad, conv.weight.grad, grad=True)
    if bn.affine:
        _close(m.bn.weight.grad, bn.weight.grad, grad=True)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        a, b = getattr(m.bn, name), getattr(bn, name)
        assert (a is None) == (b is None)
        if a is not None:
            _close(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_without_running_stats_uses_batch_stats(backend):
    m = set_backend(rnn.ConvBn2d(3, 5, 1, track_running_stats=False), backend).to(_dev(backend)).eval()
    conv, bn = _torch_pair(m)
    bn.eval()
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    _close(m(x.float().to(_dev(backend))), bn(conv(x)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_eval_fold_cache_follows_changes(backend):
    dev = _dev(backend)
    m = set_backend(rnn.ConvBnAddReLU2d(4, 6, 3, padding=1), backend).to(dev).eval()
    x = torch.randn(2, 4, 5, 5, device=dev)
    r = torch.randn(2, 6, 5, 5, device=dev)
    with torch.no_grad():
        out1 = m(x, r)
        m.bn.running_mean.add_(0.5)  # in place: the cached fold must be recomputed
        out2 = m(x, r)
        m.bn.weight.mul_(2.0)
        out3 = m(x, r)
        m.weight.mul_(-1.0)
        out4 = m(x, r)
    conv, bn = _torch_pair(m)
    bn.eval()
    _close(out4, torch.relu(bn(conv(x.double().cpu())) + r.double().cpu()))
    assert not torch.equal(out1, out2) and not torch.equal(out2, out3) and not torch.equal(out3, out4)


def test_eval_scaled_filters_are_cached_and_exact():
    """The torch backend folds eval BatchNorm's scale into the filters; the module keeps that
    product (no pass over the filters per call) and gets the very numbers of the uncached
    path, in both memory formats."""
    torch.manual_seed(0)
    for fmt in (torch.contiguous_format, torch.channels_last):
        m = set_backend(rnn.ConvBnReLU2d(4, 6, 3, padding=1), "torch").eval()
        m.bn.running_mean.normal_()
        m.bn.running_var.uniform_(0.5, 2.0)
        x = torch.randn(2, 4, 5, 5).contiguous(memory_format=fmt)
        with torch.no_grad():
            cached = m(x)
            assert "_scaled_cache" in m.__dict__
            assert torch.equal(m(x), cached)
        uncached = m(x)  # weight requires grad and grad is on: nothing cached is used
        assert torch.equal(cached, uncached) and cached.stride() == uncached.stride()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("cls", [rnn.Conv2d, rnn.ConvReLU2d, rnn.ConvBnReLU2d])
def test_frozen_model_after_inference_mode_gives_input_grad(cls, backend):
    """A frozen eval model first run under inference_mode, then with an input that requires
    grad (feature visualisation, adversarial inputs): the caches filled in inference mode
    hold normal tensors, which autograd can save (it raised before)."""
    dev = _dev(backend)
    m = set_backend(cls(3, 4, 3, padding=1), backend).to(dev).eval().requires_grad_(False)
    ref = copy.deepcopy(m)
    x = torch.randn(2, 3, 6, 6, device=dev).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        m(x)
    xg = x.clone().requires_grad_()
    m(xg).sum().backward()
    xr = x.clone().requires_grad_()
    ref(xr).sum().backward()  # the same module, never run in inference mode
    torch.testing.assert_close(xg.grad, xr.grad, rtol=0, atol=0)


def test_caches_follow_replaced_parameter_data():
    """``weight.data = ...`` twice between calls: the second tensor may be allocated where
    the first filters were, with the same fresh version counter. The caches hold their
    sources' storages, so that cannot happen while an entry could match (it returned the
    old filters' product about one time in seven before). ``.to()`` drops the caches."""
    torch.manual_seed(0)
    for _ in range(40):
        m = set_backend(rnn.ConvBnReLU2d(8, 8, 3, padding=1), "torch").eval()
        x = torch.randn(2, 8, 6, 6)
        with torch.no_grad():
            m(x)
            m.weight.data = torch.randn_like(m.weight)
            m.weight.data = torch.randn_like(m.weight)
            fresh = copy.deepcopy(m)  # no caches (test_pickle_leaves_the_caches_behind)
            assert torch.equal(m(x), fresh(x))
    m.to(torch.float64)
    assert not {"_packed_cache", "_fold_cache", "_scaled_cache"} & m.__dict__.keys()


def test_pickle_leaves_the_caches_behind():
    m = set_backend(rnn.ConvBnReLU2d(3, 4, 3, padding=1), "torch").eval()
    x = torch.randn(2, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        y = m(x)
    assert {"_packed_cache", "_fold_cache", "_scaled_cache"} <= m.__dict__.keys()
    clone = pickle.loads(pickle.dumps(m))
    assert not {"_packed_cache", "_fold_cache", "_scaled_cache"} & clone.__dict__.keys()
    with torch.no_grad():
        torch.testing.assert_close(clone(x), y, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_are_not_modified(backend):
    dev = _dev(backend)
    m = set_backend(rnn.ConvBnAddReLU2d(4, 6, 3, padding=1), backend).to(dev)
    x = torch.randn(2, 4, 5, 5, device=dev).contiguous(memory_format=torch.channels_last)
    r = torch.randn(2, 6, 5, 5, device=dev)
    x0, r0 = x.clone(), r.clone()
    for mode in (True, False):
        m.train(mode)
        m(x, r)
    assert torch.equal(x, x0) and torch.equal(r, r0)


def test_one_value_per_channel_in_training_raises_like_batchnorm():
    m = rnn.ConvBnReLU2d(3, 4, 3)
    with pytest.raises(ValueError) as ours:
        m(torch.randn(1, 3, 3, 3))
    with pytest.raises(ValueError) as theirs:
        nn.BatchNorm2d(4)(torch.randn(1, 4, 1, 1))
    assert str(ours.value) == str(theirs.value)
    m.eval()
    assert m(torch.randn(1, 3, 3, 3)).shape == (1, 4, 1, 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch_in_training(backend):
    dev = _dev(backend)
    m = set_backend(rnn.ConvBnReLU2d(3, 4, 3, padding=1), backend).to(dev).train()
    bn = nn.BatchNorm2d(4).to(dev)
    x = torch.randn(0, 3, 5, 5, device=dev, requires_grad=True)
    out = m(x)
    bn(torch.randn(0, 4, 5, 5, device=dev))
    assert out.shape == (0, 4, 5, 5)
    out.sum().backward()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(m.bn, name), getattr(bn, name)), name


def test_conv_bn_add_relu_needs_residual():
    with pytest.raises(ValueError, match="residual"):
        rnn.ConvBnAddReLU2d(3, 4, 1)(torch.randn(2, 3, 4, 4), None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_add_relu_module(backend):
    dev = _dev(backend)
    m = rnn.AddReLU()
    m.backend = backend
    a = torch.randn(2, 3, 4, 5, device=dev, requires_grad=True)
    b = torch.randn(2, 3, 4, 5, device=dev).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = m(a, b)
    torch.testing.assert_close(out, torch.relu(a + b), rtol=0, atol=1e-6)
    out.sum().backward()
    mask = (a + b > 0).float()
    torch.testing.assert_close(a.grad, mask, rtol=0, atol=0)
    torch.testing.assert_close(b.grad, mask, rtol=0, atol=0)


def test_deepcopy_and_pickle_round_trip():
    m = rnn.ConvBnReLU2d(3, 4, 3, padding=1).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        y = m(x)  # fills the fold cache
        for clone in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
            torch.testing.assert_close(clone(x), y, rtol=0, atol=0)
            assert clone.weight is not m.weight
