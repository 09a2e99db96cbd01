"""``resconv inspect`` as a library: every resconv Triton kernel of a ResNet-18 compiled for a
GPU architecture without a GPU, its machine code read, and the time it should take on an
H200 *estimated* from that machine code (:mod:`resconv.bench.estimate`), next to the
roofline lower bound. Nothing here is a measurement.

Steps (:func:`run`):

1. For each layer of :func:`resconv.models.resnet18_layers` (the one layer table), capture
   the launches of what resconv runs for it (:func:`layer_launches`): the fused eval forward,
   and a training step (conv with statistics partials, the statistics merge, the centred
   apply, the running-statistics update; the dReLU/dBN reductions, dy, dgrad, wgrad and
   their reductions), on meta tensors at the requested batch, dtype and memory format.
2. Compile every configuration the autotuner may pick for each launch (after its pruner;
   ``configs='first'``: only the first, the largest tile kept), once per distinct binary, and
   the control matmul (:mod:`resconv.bench.control`) at every tile a matrix kernel uses, in
   a pool of processes.
3. Read registers, spills, shared memory, the tensor-core instruction, where wgmma reads A
   from, the main loop's load kind and length (:mod:`resconv.bench.sass`), and estimate each
   launch at its best configuration; sum per layer and for the whole model (x occurrences),
   with max-pooling, average pooling and the classifier at their memory bound.

The result is a JSON-serialisable dict; :mod:`resconv.bench.inspect_report` renders it.
Must run in a process without ``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
from dataclasses import dataclass

from . import aot, estimate
from .inspect_work import MATRIX_KERNELS, WORK

NOTE = ("ESTIMATES from machine code (SASS compiled for sm_{arch} without a GPU, read statically, through the "
        "issue-rate model of resconv.bench.estimate), not measurements: no kernel was run.")
PASSES = ("eval", "train")
EPS, MOMENTUM = 1e-5, 0.1
# Layers of the quick set (the CI test): one of each kind the kernels treat differently.
QUICK_LAYERS = ("imagenet/conv1", "imagenet/layer1.0.conv2", "imagenet/layer2.0.downsample.0",
                "imagenet/layer2.0.conv1")


@dataclass(frozen=True)
class Settings:
    arch: int = 90
    variants: tuple = ("imagenet", "cifar")
    batch: int = 256
    dtype: str = "bfloat16"
    memory_format: str = "channels_last"  # or 'contiguous' (NCHW)
    configs: str = "all"  # 'all' candidate configurations, or the 'first' of each launch
    passes: tuple = PASSES  # of 'eval' (inference forward), 'train' (training step)
    quick: bool = False  # only QUICK_LAYERS
    jobs: int = 0  # compile processes (0: one per CPU)


# ------------------------------------------------------------------------------------------
# 1. launches
# ------------------------------------------------------------------------------------------
def _tensors(layer, s: Settings):
    import torch

    dt = getattr(torch, s.dtype)
    fmt = torch.channels_last if s.memory_format == "channels_last" else torch.contiguous_format
    N, L = s.batch, layer

    def act(*shape, dtype=dt):
        return torch.empty(*shape, dtype=dtype, device="meta").contiguous(memory_format=fmt)

    def vec(n=L.K):
        return torch.empty(n, dtype=torch.float32, device="meta")

    return dict(x=act(N, L.C, L.H, L.W), w=act(L.K, L.C, L.R, L.S), out=act(N, L.K, L.P, L.Q),
                res=act(N, L.K, L.P, L.Q) if L.residual else None, vec=vec, fmt=fmt)


def _geometry(layer) -> dict:
    ph, pw = layer.padding
    return dict(stride=tuple(layer.stride), padding=(ph, ph, pw, pw), dilation=(1, 1), groups=1)


def layer_launches(layer, s: Settings) -> dict:
    """{'eval': [Launch], 'train': [Launch]}: the kernel launches resconv's Triton backend makes
    for ``layer`` (the sequence of resconv.ops.autograd's bn_train_forward / bn_train_backward
    and of resconv.ops.triton's conv backward: keep in step), captured on meta tensors."""
    import resconv.triton_kernels as tk

    t = _tensors(layer, s)
    x, w, res, vec, fmt = t["x"], t["w"], t["res"], t["vec"], t["fmt"]
    geo = _geometry(layer)
    out_shape = tuple(t["out"].shape)
    found = {}
    with aot.capture(arch=s.arch) as sink:
        tk.conv2d_fprop(x, w, **geo, out_shape=out_shape, scale=vec(), shift=vec(), residual=res, relu=layer.relu,
                        out_memory_format=fmt)
        found["eval"] = list(sink)
        sink.clear()
        # training forward: conv + partial moments, Chan merge, centred apply, running statistics
        y, cnt, pmean, pm2 = tk.conv2d_fprop(x, w, **geo, out_shape=out_shape, stats=True, out_memory_format=fmt)
        mean, invstd, var_u, a, _ = tk.bn_finalize(cnt, pmean, pm2, vec(), vec(), EPS)
        out = tk.scale_shift_act(y, a=a, b=vec(), center=mean, residual=res, relu=layer.relu)
        tk.update_running_stats_(vec(), vec(), mean, var_u, MOMENTUM)
        # training backward: dReLU/dBN sums (and g, the residual's gradient); dy formed once
        # by the dReLU/dBN formula (the Triton adapter's conv backward), then dgrad and wgrad
        gout = t["out"]
        want_g = layer.residual and layer.relu
        g = t["out"] if want_g else None
        tk.bn_backward_reduce(gout, out if layer.relu else None, y, mean, relu=layer.relu, g_out=g)
        src, mask = (g, None) if want_g else (gout, out if layer.relu else None)
        dy, _ = tk.bn_backward_dy(src, mask, y, a=vec(), b=vec(), c=vec(), mean=mean, relu=mask is not None,
                                  want_grad_residual=False, dy_dtype=x.dtype)
        if not layer.first:
            tk.conv2d_dgrad(dy, w, input_shape=tuple(x.shape), **geo, out_memory_format=fmt)
        tk.conv2d_wgrad(dy, x, weight_shape=tuple(w.shape), **geo, weight_memory_format=fmt)
        found["train"] = list(sink)
    for launches in found.values():
        for launch in launches:
            launch.label = aot.jit_function(launch.kernel).__name__
    return found


def other_work(variant: str, s: Settings, image_size: int) -> list:
    """The model's ops that are not resconv kernels (torch's): max-pooling (ImageNet stem),
    global average pooling, the classifier, as (name, pass, FLOPs, bytes) at their bound."""
    import torch

    e = torch.empty((), dtype=getattr(torch, s.dtype)).element_size()
    N = s.batch
    out = []
    if variant == "imagenet":
        hin = (image_size + 1) // 2  # stem output
        hout = (hin + 1) // 2
        fwd = N * 64 * (hin * hin + hout * hout) * e
        out.append(("maxpool 3x3 s2", "eval", 0.0, fwd))
        # training: also the int64 indices written and read, grad_out read, grad_in written
        out.append(("maxpool 3x3 s2", "train", 0.0, fwd + 2 * N * 64 * hout * hout * 8 + N * 64 * (hout * hout + hin * hin) * e))
    last = image_size // 32 if variant == "imagenet" else image_size // 8
    pool = N * 512 * (last * last + 1) * e
    classes = 1000 if variant == "imagenet" else 10
    fc_flops = 2.0 * N * 512 * classes
    fc_bytes = (N * 512 + 512 * classes + N * classes) * e
    out.append(("avgpool + fc", "eval", fc_flops, pool + fc_bytes))
    out.append(("avgpool + fc", "train", 3 * fc_flops, 2 * pool + 3 * fc_bytes))
    return out


# ------------------------------------------------------------------------------------------
# 2. compiling
# ------------------------------------------------------------------------------------------
def _worker_init():
    os.environ.pop("TRITON_INTERPRET", None)


def compile_facts(launch: aot.Launch, i: int, arch: int) -> dict:
    """Compile config i of ``launch`` for sm_<arch> and read its machine code (in a worker)."""
    from . import sass

    t0 = time.perf_counter()
    try:
        k = aot.compile_launch(launch, i, arch)
        cubin = k.asm["cubin"]
        facts = dict(aot.resources(cubin), shared_bytes=int(k.metadata.shared), **sass.summarize(aot.sass(cubin)))
        facts["error"] = None
    except Exception as e:  # a compile error is a finding: report it, go on
        facts = dict(error=aot.describe_error(e))
    facts["compile_s"] = time.perf_counter() - t0
    return facts


def _compile_all(jobs: dict, arch: int, workers: int, progress) -> dict:
    """{key: facts} for {key: (launch, config index)}."""
    out = {}
    if workers <= 1:
        for key, (launch, i) in jobs.items():
            out[key] = compile_facts(launch, i, arch)
            progress(key, out[key])
        return out
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init) as pool:
        futs = {pool.submit(compile_facts, launch, i, arch): key for key, (launch, i) in jobs.items()}
        for f in cf.as_completed(futs):
            out[futs[f]] = f.result()
            progress(futs[f], out[futs[f]])
    return out


# ------------------------------------------------------------------------------------------
# 3. estimates
# ------------------------------------------------------------------------------------------
def _per_k64(facts: dict, meta: dict):
    n = facts.get("loop_instructions")
    return None if not n or "BLOCK_K" not in meta else n * 64 / meta["BLOCK_K"]


def _estimate(m: estimate.Machine, launch: aot.Launch, i: int, facts: dict):
    fn = aot.jit_function(launch.kernel).__name__
    work = WORK.get(fn)
    if work is None or facts.get("error"):
        return None
    cfg = launch.configs[i]
    named = launch.named_args()
    named.update(cfg.meta, **(launch.heuristics[i] if launch.heuristics else {}), _grid=launch.grids[i])
    w = work(named)
    programs = launch.programs(i)
    common = dict(warps=cfg.num_warps, loop_instructions=facts["loop_instructions"] or facts["instructions"],
                  total_instructions=facts["instructions"], trips=w["trips"], programs=programs)
    occ = estimate.occupancy(m, facts["registers"], facts["shared_bytes"], cfg.num_warps)
    if w["matrix"]:
        meta = cfg.meta
        est = estimate.matrix_kernel(m, tile=(meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]), mma=facts["mma"],
                                     operand=w["operand"], useful_flops=w["flops"], nbytes=w["nbytes"],
                                     blocks_per_sm=occ, **common)
    else:
        est = estimate.plain_kernel(m, blocks_per_sm=occ, sync_loads_in_loop=facts["loop_sync_loads"] > 0,
                                    nbytes=w["nbytes"], **common)
    est.update(flops=w.get("flops", 0.0), nbytes=w["nbytes"], trips=w["trips"], programs=programs)
    return est


def _layer_bound(m: estimate.Machine, layer, s: Settings, pass_: str) -> dict:
    from .cases import DTYPES, LayerCase
    from .roofline import case_work

    dname = {v: k for k, v in DTYPES.items()}
    import torch

    case = LayerCase(layer, s.batch, "eval" if pass_ == "eval" else "train-fwdbwd",
                     dname[getattr(torch, s.dtype)], "channels_last" if s.memory_format == "channels_last" else "nchw")
    flops, nbytes = case_work(case, "fused")
    return dict(estimate.roofline(m, flops, nbytes), flops=flops, nbytes=nbytes)


def run(s: Settings, progress=None) -> dict:
    """Capture, compile, read and estimate (see the module docstring); the results dict."""
    import torch
    import triton

    from ..models import resnet18_layers
    from ..models.layers import IMAGE_SIZE
    from .control import control_launch
    from .env import collect

    aot.check_compiled_mode()
    t0 = time.perf_counter()
    m = estimate.H200
    layers = [L for v in s.variants for L in resnet18_layers(v)]
    if s.quick:
        layers = [L for L in layers if f"{L.variant}/{L.name}" in QUICK_LAYERS]
    captured = []  # (layer, pass, [Launch])
    for L in layers:
        for p, launches in layer_launches(L, s).items():
            if p not in s.passes:
                continue
            if s.configs == "first":
                launches = [aot.first_config_only(x) for x in launches]
            captured.append((L, p, launches))
    jobs = aot.unique([x for _, _, ls in captured for x in ls], s.arch)
    # the control matmul at every tile a matrix kernel may use
    tiles = {}
    for launch, i in jobs.values():
        if aot.jit_function(launch.kernel).__name__ in MATRIX_KERNELS:
            c = launch.configs[i]
            tiles.setdefault(c, control_launch(c, "float16" if s.dtype == "float32" else s.dtype))
    control_jobs = aot.unique(list(tiles.values()), s.arch)
    control_key = {c: aot.compile_key(cl, 0, s.arch) for c, cl in tiles.items()}
    all_jobs = dict(jobs, **control_jobs)
    t_capture = time.perf_counter() - t0
    workers = s.jobs or os.cpu_count() or 1
    done = [0]

    def report(key, facts):
        done[0] += 1
        if progress:
            progress(done[0], len(all_jobs), facts)

    facts = _compile_all(all_jobs, s.arch, min(workers, len(all_jobs)) or 1, report)

    compiles = []
    for key, (launch, i) in all_jobs.items():
        c = launch.configs[i]
        f = facts[key]
        fn = aot.jit_function(launch.kernel).__name__
        row = dict(key=key, kernel=fn, config=c.meta, tile=c.tile, num_warps=c.num_warps, num_stages=c.num_stages,
                   flags={k: v for k, v in launch.kwargs.items() if isinstance(v, (bool, int, str))}, **f)
        if not f.get("error"):
            row["occupancy"] = estimate.occupancy(m, f["registers"], f["shared_bytes"], c.num_warps)
            row["loop_per_k64"] = _per_k64(f, c.meta)
            if fn in MATRIX_KERNELS:
                cf_ = facts.get(control_key.get(c))
                row["control_loop_per_k64"] = _per_k64(cf_, c.meta) if cf_ and not cf_.get("error") else None
                if row["loop_per_k64"] and row["control_loop_per_k64"]:
                    row["loop_vs_control"] = row["loop_per_k64"] / row["control_loop_per_k64"]
        row["is_control"] = key in control_jobs and key not in jobs
        compiles.append(row)

    layer_rows = []
    for L, p, launches in captured:
        rows = []
        for launch in launches:
            cands = []
            for i in range(len(launch.configs)):
                key = aot.compile_key(launch, i, s.arch)
                est = _estimate(m, launch, i, facts[key])
                cands.append(dict(key=key, tile=launch.configs[i].tile, programs=launch.programs(i),
                                  estimate=est, error=facts[key].get("error")))
            ok = [c for c in cands if c["estimate"] is not None]
            best = min(ok, key=lambda c: c["estimate"]["time_s"]) if ok else None
            rows.append(dict(kernel=launch.label, flags={k: v for k, v in launch.kwargs.items()
                                                          if isinstance(v, (bool, int, str))},
                             chosen=best, candidates=len(cands), errors=sum(bool(c["error"]) for c in cands)))
        est_s = sum(r["chosen"]["estimate"]["time_s"] for r in rows if r["chosen"])
        layer_rows.append(dict(layer=L.as_dict(), pass_=p, launches=rows, estimate_s=est_s,
                               bound=_layer_bound(m, L, s, p)))

    totals = {}
    for v in s.variants:
        size = IMAGE_SIZE[v]
        other = [dict(name=n, pass_=p, **estimate.roofline(m, fl, b)) for n, p, fl, b in other_work(v, s, size)]
        for p in s.passes:
            sel = [r for r in layer_rows if r["layer"]["variant"] == v and r["pass_"] == p]
            if not sel:
                continue
            oth = [o for o in other if o["pass_"] == p]
            est = sum(r["estimate_s"] * r["layer"]["count"] for r in sel) + sum(o["time_s"] for o in oth)
            bound = sum(r["bound"]["time_s"] * r["layer"]["count"] for r in sel) + sum(o["time_s"] for o in oth)
            totals[f"{v}/{p}"] = dict(variant=v, pass_=p, estimate_s=est, bound_s=bound, other=oth,
                                      complete=not s.quick)
    env = collect(torch.device("cpu"))
    return dict(
        note=NOTE.format(arch=s.arch),
        settings=dict(s.__dict__, variants=list(s.variants), passes=list(s.passes)),
        environment=dict(env, triton=triton.__version__),
        machine=m.as_dict(),
        model=estimate.__doc__,
        compiles=compiles,
        layers=layer_rows,
        totals=totals,
        timing=dict(capture_s=t_capture, total_s=time.perf_counter() - t0, compiles=len(all_jobs),
                    compile_cpu_s=sum(f.get("compile_s", 0.0) for f in facts.values()), workers=workers),
    )
