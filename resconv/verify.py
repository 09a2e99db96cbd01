"""``resconv verify``: check every available backend against torch.nn on real photographs.

1. Each distinct conv layer shape of ResNet-18 (ImageNet variant): the fused op (conv +
   eval BatchNorm + ReLU, + residual where the block has one) on fresh random input, against
   torch.nn (Conv2d, BatchNorm2d, ReLU) in float64.
2. ResNet-18 made of resconv modules on scikit-image's sample photographs, resized and
   normalised the ImageNet way (shorter side to 256/224 of the crop, centre crop, ImageNet
   mean/std), against the same network in torch.nn (:class:`resconv.models.TorchResNet`)
   in float64: logit errors and top-1 agreement. Weights are random (seeded), with random
   BatchNorm statistics so that no layer is an identity; nothing is downloaded.

Pass/fail uses the tolerance policy of :mod:`resconv.tolerances`. Without a GPU the Triton
kernels run through the interpreter, at a reduced image size by default.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "retina", "hubble_deep_field", "ihc")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DTYPES = {"float32": "float32", "tf32": "float32", "float16": "float16", "bfloat16": "bfloat16"}


def add_parser(sub) -> None:
    from ._app import DEVICE_CHOICES, HelpFormatter, positive_int

    p = sub.add_parser(
        "verify",
        help="check the backends against torch.nn on ResNet-18 layers and real photographs",
        description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter,
    )
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="where to run (auto: the GPU when one is usable, else the CPU with the Triton interpreter)")
    p.add_argument("--backend", action="append", choices=("auto", "triton", "cuda", "torch"),
                   help="backend(s) to check (repeatable; auto: every backend that can run on the device, the "
                        "Triton kernels in its interpreter on the CPU; default: $RESCONV_BACKEND, else auto)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="compute dtype (tf32: float32 on TF32 tensor cores)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="photographs per batch (default: 8 on a GPU, 2 on the CPU)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="crop size in pixels, at least 32 (default: 224 on a GPU, 96 on the CPU)")
    p.add_argument("--layer-batch", type=positive_int, default=None,
                   help="batch of the per-layer checks (default: 8 on a GPU, 1 on the CPU)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    p.set_defaults(func=run)


@dataclass
class Check:
    kind: str  # "layer" or "model"
    backend: str
    name: str
    max_abs_err: float
    max_rel_err: float
    tolerance_ratio: float
    passed: bool
    extra: dict = field(default_factory=dict)


def run(args: argparse.Namespace) -> int:
    from ._app import UsageError, prepare_device, require, requested_backend

    require("skimage", what="resconv verify (its photographs)")
    if args.image_size is not None and args.image_size < 32:
        raise UsageError(f"--image-size: expected at least 32 (pixels: ResNet-18 downsamples 32x), got {args.image_size}")
    order = ("auto", "cuda", "triton", "torch")
    requested = sorted(set(args.backend or [requested_backend(None)[0]]), key=order.index)
    device = prepare_device(args.device, triton_may_run=any(b in ("auto", "triton") for b in requested))
    import torch

    import resconv.tolerances as T
    from resconv._version import __version__
    from resconv.functional import available_backends
    from resconv.models import resnet18_layers

    dtype = getattr(torch, DTYPES[args.dtype])
    tf32 = args.dtype == "tf32"
    gpu = device == "cuda"
    batch = args.batch_size or (8 if gpu else 2)
    size = args.image_size or (224 if gpu else 96)
    layer_batch = args.layer_batch or (8 if gpu else 1)
    avail = available_backends(device, dtype)
    wanted = [b for b in requested if b != "auto"]
    if "auto" in requested:
        wanted += [b for b in ("cuda", "triton", "torch") if avail[b] is None and b not in wanted]
    for b in wanted:
        if avail[b] is not None:
            raise UsageError(f"--backend {b}: backend {b!r} cannot run on {device}/{args.dtype}: {avail[b]}")
    print(f"resconv {__version__} verify: device={device} ({_device_name(device)}), dtype={args.dtype}, "
          f"backends={','.join(wanted)}, photos {batch}x3x{size}x{size}, layer batch {layer_batch}")
    for b, why in avail.items():
        if b not in wanted:
            print(f"  skipped backend {b}: {why or 'not requested'}")

    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    checks = []
    layers = resnet18_layers("imagenet", 224)
    from tqdm import tqdm

    jobs = [(b, spec) for b in wanted for spec in layers]
    for b, spec in tqdm(jobs, desc="layers", unit="layer", file=sys.stderr, disable=None):
        checks.append(check_layer(spec, b, device, dtype, tf32, layer_batch, T))
    photos = load_photos(batch, size)
    for b in tqdm(wanted, desc="resnet18 on photos", unit="backend", file=sys.stderr, disable=None):
        checks.append(check_model(photos, b, device, dtype, tf32, T, args.seed))
    elapsed = time.perf_counter() - t0
    _print_table(checks)
    ok = all(c.passed for c in checks)
    print(f"{sum(c.passed for c in checks)}/{len(checks)} checks passed in {elapsed:.1f} s: {'PASS' if ok else 'FAIL'}")
    if args.json:
        info = dict(device=device, device_name=_device_name(device), dtype=args.dtype, backends=wanted,
                    batch_size=batch, image_size=size, layer_batch=layer_batch, seed=args.seed,
                    torch=torch.__version__, resconv=__version__, seconds=elapsed, passed=ok,
                    tolerances={k: asdict(v) for k, v in T.OUTPUT.items()},
                    checks=[asdict(c) for c in checks])
        with open(args.json, "w") as f:
            json.dump(info, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if ok else 1


def _device_name(device: str) -> str:
    import platform

    import torch

    return torch.cuda.get_device_name() if device == "cuda" else (platform.processor() or platform.machine())


def _layer_name(layer) -> str:
    k = f"{layer.R}x{layer.S}"
    epi = "+add+relu" if layer.residual else ("+relu" if layer.relu else "")
    return f"{layer.name} {layer.C}->{layer.K} {k}/s{layer.stride[0]} @{layer.H}x{layer.W} bn{epi}"


def check_layer(layer, backend, device, dtype, tf32, batch, T) -> Check:
    import torch
    from torch import nn

    from resconv.nn import ConvBnAddReLU2d, ConvBn2d, ConvBnReLU2d

    cls = ConvBnAddReLU2d if layer.residual else (ConvBnReLU2d if layer.relu else ConvBn2d)
    kernel = (layer.R, layer.S)
    m = cls(layer.C, layer.K, kernel, layer.stride, layer.padding)
    _randomise_bn(m.bn)
    m = m.eval().to(device=device, dtype=dtype)
    m.backend, m.allow_tf32 = backend, tf32
    x = torch.randn(batch, layer.C, layer.H, layer.W, device=device, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    res = torch.randn(batch, layer.K, layer.P, layer.Q, device=device, dtype=dtype) if layer.residual else None
    with torch.no_grad():
        out = m(x, res) if res is not None else m(x)
        conv = nn.Conv2d(layer.C, layer.K, kernel, layer.stride, layer.padding, bias=False, dtype=torch.float64)
        conv.weight.copy_(m.weight.double().cpu())
        bn = nn.BatchNorm2d(layer.K, dtype=torch.float64).eval()
        bn.load_state_dict({k: v.double().cpu() if v.is_floating_point() else v.cpu()
                            for k, v in m.bn.state_dict().items()})
        ref = bn(conv(x.double().cpu()))
        if res is not None:
            ref = ref + res.double().cpu()
        if layer.relu:
            ref = torch.relu(ref)
    cmp = T.compare(out, ref, T.tolerance(dtype, tf32=tf32 and device == "cuda"))
    return Check("layer", backend, _layer_name(layer), cmp.max_abs_err, cmp.max_rel_err, cmp.worst_ratio, cmp.ok,
                 {"layers": list(layer.names), "batch": batch})


def _randomise_bn(bn) -> None:
    import torch

    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-0.2, 0.2)
        bn.running_var.uniform_(0.5, 2.0)


def load_photos(batch: int, size: int):
    """``batch`` of scikit-image's bundled RGB photographs (cycled), ImageNet-style
    preprocessing: resize the shorter side to ``size * 256 / 224``, centre-crop ``size``,
    scale to [0, 1], normalise with the ImageNet mean/std. Returns Tensor[batch, 3, size, size] fp32."""
    import numpy as np
    import skimage.data
    import torch
    from skimage.transform import resize

    imgs = []
    for i in range(batch):
        name = PHOTOS[i % len(PHOTOS)]
        img = np.asarray(getattr(skimage.data, name)(), dtype=np.float64)
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = img[..., :3]
        if img.max() > 1.0:
            img = img / 255.0
        h, w = img.shape[:2]
        short = round(size * 256 / 224)
        nh, nw = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
        img = resize(img, (nh, nw), anti_aliasing=True)
        top, left = (nh - size) // 2, (nw - size) // 2
        img = img[top : top + size, left : left + size]
        img = (img - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)
        imgs.append(torch.from_numpy(img.transpose(2, 0, 1).copy()).float())
    return torch.stack(imgs)


def _reference_model(state_dict):
    """The torch.nn ResNet-18 (resconv.models.TorchResNet) with ``state_dict``, in float64."""
    import torch

    from resconv.models import torch_resnet18

    ref = torch_resnet18()
    ref.load_state_dict(state_dict)
    return ref.to(torch.float64).eval()


def check_model(photos, backend, device, dtype, tf32, T, seed) -> Check:
    import torch

    from resconv.models import resnet18

    torch.manual_seed(seed)
    model = resnet18()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            _randomise_bn(m)
    ref = _reference_model(model.state_dict())
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend, m.allow_tf32 = backend, tf32
    model = model.eval().to(device=device, dtype=dtype).to(memory_format=torch.channels_last)
    x = photos.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        logits = model(x)
        ref_logits = ref(x.double().cpu())
    # A 20-layer network compounds rounding: the logits get NETWORK_FACTOR x the per-layer tolerance.
    tol = T.tolerance(dtype, tf32=tf32 and device == "cuda", network=True)
    cmp = T.compare(logits, ref_logits, tol)
    top1 = (logits.float().cpu().argmax(1) == ref_logits.argmax(1)).float().mean().item()
    return Check("model", backend, f"resnet18 logits on {x.shape[0]} photos {x.shape[2]}x{x.shape[3]}",
                 cmp.max_abs_err, cmp.max_rel_err, cmp.worst_ratio, cmp.ok, {"top1_agreement": top1})


def _print_table(checks) -> None:
    rows = [("backend", "check", "max abs err", "rel err", "err/tol", "result")]
    for c in checks:
        extra = f" top-1 agree {c.extra['top1_agreement']:.0%}" if "top1_agreement" in c.extra else ""
        rows.append((c.backend, c.name + extra, f"{c.max_abs_err:.2e}", f"{c.max_rel_err:.2e}",
                     f"{c.tolerance_ratio:.2f}", "pass" if c.passed else "FAIL"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
