"""Test configuration: which backends run where, markers, and shared helpers.

On a machine without a GPU the Triton kernels run under the interpreter: this file sets
``TRITON_INTERPRET=1`` (before anything imports the kernels) unless a CUDA GPU is usable,
and ``RESCONV_POISON=1`` so that every kernel output starts as NaN and an unwritten element
fails its comparison. GPU tests carry the ``gpu`` marker and are skipped cleanly without one.
"""
from __future__ import annotations

import os

# Decide the Triton mode before resconv's kernels are imported. No CUDA query here: the
# NVIDIA driver library is looked up instead (CI machines have none).
def _has_cuda_driver() -> bool:
    import ctypes.util

    return ctypes.util.find_library("cuda") is not None


if "TRITON_INTERPRET" not in os.environ and not _has_cuda_driver():
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("RESCONV_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def gpu_available() -> bool:
    return not INTERPRET and torch.cuda.is_available()


def pytest_collection_modifyitems(config, items):
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here, or TRITON_INTERPRET=1)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def test_device() -> str:
    """Where the Triton backend runs in this session: 'cuda' on a GPU, else 'cpu' (interpreter)."""
    return "cuda" if gpu_available() else "cpu"


test_device.__test__ = False  # a helper, not a test


@pytest.fixture
def device() -> str:
    return test_device()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def randomise_bn(model):
    """Give every BatchNorm2d of ``model`` non-trivial affine parameters and running
    statistics (fresh uniform draws), so that BatchNorm cannot pass by being the identity."""
    from torch import nn

    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
                m.running_mean.uniform_(-0.3, 0.3)
                m.running_var.uniform_(0.5, 2.0)
    return model


@pytest.fixture(scope="module")
def ext():
    """The loaded CUDA extension resconv._C (compiled just in time into the cache on first use;
    no GPU needed); skips where it cannot be compiled (no CUDA build of torch, no toolkit)."""
    from resconv import build
    from resconv.ops import cuda as cuda_ops

    problem = build.toolchain_problem()
    if problem is not None:
        pytest.skip(f"the CUDA extension cannot be compiled here: {problem}")
    cuda_ops.ops()
    return build.loaded_extension()


def set_backend(model, name):
    """Force backend ``name`` on every resconv module of ``model`` (their ``backend``
    attribute); returns ``model``."""
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = name
    return model



def conv2d_backward(dy, x, weight, stride, padding, dilation, groups, need_input, need_weight, need_bias, *,
                    impl="aten", allow_tf32=None, prologue=None):
    """A conv backward by implementation, for the tests: 'aten' (ATen's, dy materialised from
    ``prologue`` in torch), 'triton' or 'cuda' (that backend's own dgrad/wgrad, the prologue
    fused into their loads). Returns (grad_input, grad_weight, grad_bias), None where not needed."""
    from resconv.ops import BACKENDS
    from resconv.ops._shared import Geometry, aten_conv2d_backward

    if impl == "aten":
        return aten_conv2d_backward(dy, x, weight, stride, padding, dilation, groups, need_input, need_weight,
                                    need_bias, prologue=prologue)
    tf32 = torch.backends.cudnn.allow_tf32 if allow_tf32 is None else bool(allow_tf32)
    return BACKENDS[impl].kernels.own_conv_backward(dy, x, weight, Geometry.of(stride, padding, dilation, groups),
                                                    need_input, need_weight, need_bias, tf32, prologue)
