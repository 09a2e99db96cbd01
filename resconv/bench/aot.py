"""Compile resconv's Triton kernels for a GPU architecture on a machine without a GPU.

Triton compiles for any ``GPUTarget`` without a driver (ptxas, cuobjdump and nvdisasm ship
in its wheel). This module

1. *captures* kernel launches: :func:`capture` runs a launcher (e.g.
   ``conv2d_fprop(x, w, ...)``) on ``meta`` tensors (shapes and strides, no memory) with every
   kernel object of ``resconv.triton_kernels`` replaced by a recorder, so nothing runs; each
   launch becomes a :class:`Launch` (the kernel, its arguments, the autotune configurations
   the pruner keeps for them, the grid of each);
2. *compiles* a launch with one configuration for ``sm_<arch>`` with the real argument
   specialisation (ints equal to 1 become constants, multiples of 16 are marked divisible;
   meta tensors count as 16-byte aligned, as every CUDA allocation is);
3. reads the result: resources (registers, stack frame) from ``cuobjdump
   --dump-resource-usage`` and the SASS from ``cuobjdump -sass``.

The process must not run Triton's interpreter (``TRITON_INTERPRET=1`` decorates the kernels
as interpreted functions, which cannot be compiled): :func:`check_compiled_mode` says so.
Uses Triton internals (``create_function_from_signature``, ``JITFunction._pack_args``), as
Triton's own runtime does to build a compile call: tested with Triton 3.8.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from unittest import mock

KERNEL_PACKAGE = "resconv.triton_kernels"


def tool(name: str) -> str:
    """Path of a CUDA binary tool shipped in Triton's wheel (cuobjdump, nvdisasm, ptxas)."""
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def check_compiled_mode() -> None:
    """Raise RuntimeError if resconv's kernels are (or will be) decorated for the interpreter."""
    mod = sys.modules.get(f"{KERNEL_PACKAGE}._common")
    interpret = mod.INTERPRET if mod is not None else os.environ.get("TRITON_INTERPRET", "0") == "1"
    if interpret:
        raise RuntimeError("compiling kernels needs a process without TRITON_INTERPRET=1 (the kernels are "
                           "decorated for Triton's interpreter in this one)")


# ------------------------------------------------------------------------------------------
# launches
# ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TensorSpec:
    """A tensor argument without its data: enough to specialise and compile a kernel."""

    shape: tuple
    stride: tuple
    dtype: str  # torch dtype name, e.g. 'bfloat16'

    @classmethod
    def of(cls, t) -> "TensorSpec":
        return cls(tuple(t.shape), tuple(t.stride()), str(t.dtype).replace("torch.", ""))

    def meta(self):
        import torch

        return torch.empty_strided(self.shape, self.stride, dtype=getattr(torch, self.dtype), device="meta")

    @property
    def nbytes(self) -> int:
        import torch

        if 0 in self.shape:
            return 0
        span = 1 + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return span * torch.empty((), dtype=getattr(torch, self.dtype)).element_size()


@dataclass(frozen=True)
class DescSpec:
    """A TMA tensor-descriptor argument without its data (its block shape is per configuration)."""

    base: TensorSpec
    shape: tuple
    strides: tuple

    @classmethod
    def of(cls, d) -> "DescSpec":
        return cls(TensorSpec.of(d.base), tuple(d.shape), tuple(d.strides))

    def build(self, block_shape):
        from triton.tools.tensor_descriptor import TensorDescriptor

        return TensorDescriptor(self.base.meta(), list(self.shape), list(self.strides), list(block_shape))


@dataclass(frozen=True)
class Config:
    """One autotune configuration (or a plain kernel's launch options)."""

    kwargs: tuple  # sorted (name, value) pairs: BLOCK_M, ...
    num_warps: int = 4
    num_stages: int = 3

    @property
    def meta(self) -> dict:
        return dict(self.kwargs)

    @property
    def tile(self) -> str:
        m = self.meta
        dims = [str(m[k]) for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K") if k in m]
        return ("x".join(dims) + " " if dims else "") + f"w{self.num_warps} s{self.num_stages}"


@dataclass
class Launch:
    """One captured kernel launch: the kernel (``module:attribute`` of the JITFunction), its
    arguments (tensors as :class:`TensorSpec`), constexpr flags, and per candidate
    configuration the flags a ``triton.heuristics`` wrapper adds and the grid."""

    kernel: str
    args: tuple
    kwargs: dict
    configs: list  # of Config: what the autotuner may pick (after its pruner), or the one a plain launch uses
    grids: list  # per config: grid tuple
    heuristics: list = field(default_factory=list)  # per config: dict of extra constexprs
    label: str = ""
    desc_blocks: list = field(default_factory=list)  # per config: {argument index: TMA block shape}

    @property
    def name(self) -> str:
        return self.kernel.rpartition(":")[2]

    def named_args(self) -> dict:
        return dict(zip(jit_function(self.kernel).arg_names, self.args), **self.kwargs)

    def programs(self, i: int) -> int:
        g = self.grids[i]
        n = 1
        for d in g:
            n *= int(d)
        return n


def jit_function(kernel: str):
    """The JITFunction behind ``module:attribute`` (unwrapping autotune / heuristics)."""
    from triton.runtime.jit import JITFunction

    module, _, attr = kernel.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    while not isinstance(obj, JITFunction):
        obj = obj.fn
    return obj


def _spec(v):
    import torch

    if isinstance(v, torch.Tensor):
        return TensorSpec.of(v)
    return DescSpec.of(v) if type(v).__name__ == "TensorDescriptor" else v


def _unspec(v, block_shape=None):
    if isinstance(v, DescSpec):
        return v.build(block_shape)
    return v.meta() if isinstance(v, TensorSpec) else v


class _Recorder:
    """Stands in for a kernel object (JITFunction, Autotuner, Heuristics): ``rec[grid](*args,
    **kwargs)`` records a :class:`Launch` instead of running anything."""

    def __init__(self, kernel: str, obj, sink: list):
        self.kernel, self.obj, self.sink = kernel, obj, sink
        autotuner = obj if hasattr(obj, "configs") else None
        inner = autotuner.fn if autotuner is not None else obj
        self.heur = inner.values if hasattr(inner, "values") and hasattr(inner, "arg_names") else None
        self.autotuner = autotuner
        self.jit = jit_function(kernel)
        self.best_config = autotuner.configs[0] if autotuner is not None else None

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._record(grid, args, kwargs)

    def _record(self, grid, args, kwargs):
        import triton

        named = dict(zip(self.jit.arg_names, args), **kwargs)
        if self.autotuner is not None:
            cfgs = self.autotuner.configs
            prune = self.autotuner.early_config_prune
            if prune is not None:
                cfgs = prune(cfgs, named, **kwargs)
            self.best_config = cfgs[0]
            flags = kwargs
        else:
            opts = {k: kwargs[k] for k in ("num_warps", "num_stages") if k in kwargs}
            cfgs = [triton.Config({}, **opts)]
            flags = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        configs, grids, heur, blocks = [], [], [], []
        descs = {i: a for i, a in enumerate(args) if type(a).__name__ == "TensorDescriptor"}
        for c in cfgs:
            meta = dict(named, **c.kwargs)
            extra = {k: f(meta) for k, f in self.heur.items()} if self.heur else {}
            meta.update(extra)
            g = grid(meta) if callable(grid) else grid
            g = tuple(g) + (1,) * (3 - len(tuple(g)))
            configs.append(Config(tuple(sorted(c.kwargs.items())), c.num_warps, c.num_stages))
            grids.append(g)
            heur.append(extra)
            if getattr(c, "pre_hook", None) is not None and descs:  # it sets the descriptors' block shapes
                c.pre_hook(meta)
            blocks.append({i: tuple(d.block_shape) for i, d in descs.items()})
        self.sink.append(Launch(self.kernel, tuple(_spec(a) for a in args), dict(flags), configs, grids, heur,
                                desc_blocks=blocks))


def _kernel_objects():
    """(module, attribute, object) of every kernel object in resconv's kernel modules."""
    import pkgutil

    pkg = importlib.import_module(KERNEL_PACKAGE)
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
        for attr, obj in list(vars(mod).items()):
            if type(obj).__name__ in ("JITFunction", "Autotuner", "Heuristics"):
                yield mod, attr, obj


@contextlib.contextmanager
def capture(num_sms: int = 132, arch: int = 90):
    """Within the block, resconv's kernel launchers record their launches instead of running:
    call them on ``meta`` tensors. Yields the list the :class:`Launch` es are appended to.

    ``num_sms`` and ``arch`` stand in for the device's multiprocessor count (launchers that
    size grids from it, e.g. wgrad's split-K, ask for it) and architecture (TMA paths need
    sm_90 and Triton 3.8)."""
    import torch

    check_compiled_mode()
    common = importlib.import_module(f"{KERNEL_PACKAGE}._common")
    tma = arch >= 90 and common._triton_at_least(3, 8)
    sink: list = []
    patches = [mock.patch.object(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext()),
               mock.patch.object(torch.cuda, "current_device", lambda: 0)]
    for mod, attr, obj in _kernel_objects():
        patches.append(mock.patch.object(mod, attr, _Recorder(f"{mod.__name__}:{attr}", obj, sink)))
        if hasattr(mod, "check_device"):
            patches.append(mock.patch.object(mod, "check_device", lambda *a, **k: None))
        if hasattr(mod, "_sm_count"):
            patches.append(mock.patch.object(mod, "_sm_count", lambda *a, **k: num_sms))
        if hasattr(mod, "tma_available"):
            patches.append(mock.patch.object(mod, "tma_available", lambda *a, **k: tma))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield sink


# ------------------------------------------------------------------------------------------
# compiling
# ------------------------------------------------------------------------------------------
def _prepare(launch: Launch, i: int, arch: int):
    """(src, target, options) of Triton's compile call for config i of the launch."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = jit_function(launch.kernel)
    cfg = launch.configs[i]
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    kw = dict(launch.kwargs, **cfg.meta, **(launch.heuristics[i] if launch.heuristics else {}),
              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    blocks = launch.desc_blocks[i] if launch.desc_blocks else {}
    bound, spec, options = binder(*[_unspec(a, blocks.get(j)) for j, a in enumerate(launch.args)], **kw)
    options, signature, constexprs, attrs = jit._pack_args(backend, kw, bound, spec, options)
    return ASTSource(jit, signature, constexprs, attrs), target, options


def compile_key(launch: Launch, i: int, arch: int) -> str:
    """A key equal for two launches exactly when Triton would compile the same binary."""
    src, target, options = _prepare(launch, i, arch)
    return f"{src.hash()}-{options.hash()}-{target}"


def compile_launch(launch: Launch, i: int, arch: int):
    """Compile config i of the launch for sm_<arch>: a Triton CompiledKernel (asm: ptx, cubin)."""
    import triton

    src, target, options = _prepare(launch, i, arch)
    return triton.compile(src, target=target, options=options.__dict__)


def _cuobjdump(cubin: bytes, *flags: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([tool("cuobjdump"), *flags, f.name], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)


def resources(cubin: bytes) -> dict:
    """Registers per thread and stack frame bytes (spills, local arrays) of a cubin's kernel."""
    import re

    out = _cuobjdump(cubin, "--dump-resource-usage")
    m = re.search(r"REG:(\d+).*?STACK:(\d+)", out)
    if not m:
        raise RuntimeError(f"cuobjdump --dump-resource-usage: no REG/STACK in {out!r}")
    return dict(registers=int(m.group(1)), stack_bytes=int(m.group(2)))


def sass(cubin: bytes) -> str:
    """The SASS (machine code) listing of a cubin, cuobjdump's format."""
    return _cuobjdump(cubin, "-sass")


def describe_error(e: BaseException) -> str:
    """A compile error in one line (Triton's CompilationError keeps its cause separately)."""
    cause = e.__cause__ if e.__cause__ is not None else e
    text = " | ".join(line.strip() for line in str(e).splitlines() if line.strip() and line.strip() != "^")
    return f"{type(e).__name__}: {text[:600]} (cause: {cause!r})"


def unique(launches: list, arch: int) -> dict:
    """{compile key: (launch, config index)} over every candidate configuration of every launch."""
    out: dict = {}
    for launch in launches:
        for i in range(len(launch.configs)):
            out.setdefault(compile_key(launch, i, arch), (launch, i))
    return out


def first_config_only(launch: Launch) -> Launch:
    """The launch restricted to its first candidate configuration (the largest tile kept)."""
    return Launch(launch.kernel, launch.args, launch.kwargs, launch.configs[:1], launch.grids[:1],
                  launch.heuristics[:1], launch.label, launch.desc_blocks[:1])
