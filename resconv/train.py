"""``resconv train``: train the CIFAR-variant ResNet-18 made of resconv modules on a real,
offline image data set, optionally side by side with the same network in torch.nn.

Data: scikit-learn's bundled handwritten digits (1,797 8x8 images, 10 classes), upscaled to
32x32 (bilinear) and replicated to 3 channels, split 80/20 (stratified, seeded); or CIFAR-10
from a local folder in torchvision's format (``cifar-10-batches-py``; nothing is downloaded)
given by ``--data``.

``--compare`` trains a torch.nn ResNet-18 (:class:`resconv.models.TorchResNet`, torchvision's
layout with the CIFAR stem) from the same initial weights on the same batches in the same
order, prints both loss curves side by side, and checks the first steps and the final accuracy:

* step 0 (identical weights, so a pure forward comparison) agrees within the output
  tolerance of the dtype (``resconv.tolerances``) when there is no float64 run
  (``--check-steps 0``); otherwise it is the first step of the rule below;
* SGD amplifies rounding from the first update on (at initialisation, float32 gradients of
  ResNet-18 differ from float64 ones by a few percent for torch.nn itself), so for the next
  ``--check-steps`` steps both runs are also compared with torch.nn in float64 on the same
  batches: resconv's largest distance to that reference over those steps must be no more
  than twice torch.nn's largest, plus the tolerance (the rule FlashAttention's tests use,
  applied to the window: the per-step distances of two float32 runs jump by orders of
  magnitude from step to step, so a per-step bound fails on noise);
* both reach the same test accuracy (within 2 points; above 95 % on digits).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time
from pathlib import Path

from .recipes import RECIPES

DIGITS_ACCURACY_TARGET = 0.95
MAX_ACCURACY_GAP = 0.02  # |acc_resconv - acc_torch| allowed by --compare


def add_parser(sub) -> None:
    from ._app import HelpFormatter, add_device_backend, add_out, existing_dir, nonnegative_float, nonnegative_int, \
        positive_float, positive_int

    p = sub.add_parser("train", help="train ResNet-18 (CIFAR variant) on digits or CIFAR-10, optionally vs torch.nn",
                       description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--data", metavar="DIR", type=existing_dir, default=None,
                   help="CIFAR-10 folder (torchvision's cifar-10-batches-py, or its parent); default: "
                        "scikit-learn's digits")
    add_device_backend(p)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="autocast dtype for the forward/backward (float32: IEEE)")
    p.add_argument("--epochs", type=positive_int, default=None,
                   help="epochs (default: 3 on digits, 10 on CIFAR-10; with --recipe, the recipe's: 200)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="training images per step (default: 64; with --recipe, the recipe's: 128)")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="peak learning rate of the one-cycle schedule (default: 0.05; with --recipe, the recipe's "
                        "initial rate: 0.1)")
    p.add_argument("--momentum", type=nonnegative_float, default=0.9, help="SGD momentum (Nesterov without --recipe)")
    p.add_argument("--weight-decay", type=nonnegative_float, default=5e-4, help="SGD weight decay (L2)")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="a published recipe instead of the quick one-cycle run (resconv/recipes.py): cifar10 = "
                        "ResNet-18's CIFAR-10 recipe, crop + flip, batch 128, SGD lr 0.1, cosine, 200 epochs")
    add_out(p, "train")
    p.add_argument("--compare", action="store_true", help="also train torch.nn's ResNet-18 from the same start")
    p.add_argument("--check-steps", type=nonnegative_int, default=5,
                   help="with --compare: the first N steps are also run by torch.nn in float64 and checked")
    p.add_argument("--max-steps", type=positive_int, default=None,
                   help="stop after this many steps (smoke runs; default: every step of the schedule)")
    p.add_argument("--image-size", type=positive_int, default=32,
                   help="side of the training images in pixels, at least 4 (the digits are 8x8 originals, "
                        "upscaled bilinearly; CIFAR-10 is resized when not 32)")
    p.add_argument("--eval-images", type=positive_int, default=None, metavar="N",
                   help="measure test accuracy on the first N test images only (smoke runs; default: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the split and the batch order")
    p.add_argument("--json", metavar="PATH", help="also write losses and accuracies as JSON to PATH")
    p.set_defaults(func=run)


# ----------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------
def load_digits(seed: int, size: int = 32):
    """scikit-learn's digits as (x_train, y_train, x_test, y_test): Tensor[n, 3, size, size]
    fp32 normalised to zero mean / unit variance, int64 labels."""
    import numpy as np
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    d = sk_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0)[:, None]  # [n, 1, 8, 8] in [0, 1]
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    x = x.repeat(1, 3, 1, 1)
    y = torch.from_numpy(d.target.astype(np.int64))
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.2, stratify=d.target, random_state=seed)
    mean, std = x[idx_tr].mean(), x[idx_tr].std()
    x = (x - mean) / std
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


def load_cifar10(root: str):
    """CIFAR-10 from torchvision's on-disk format (``data_batch_1..5``, ``test_batch``), as
    (x_train, y_train, x_test, y_test) normalised per channel."""
    import numpy as np
    import torch

    folder = root if os.path.exists(os.path.join(root, "test_batch")) else os.path.join(root, "cifar-10-batches-py")
    if not os.path.exists(os.path.join(folder, "test_batch")):
        raise FileNotFoundError(f"--data: no CIFAR-10 batches (test_batch, data_batch_1..5) under {root!r}")

    def read(name):
        with open(os.path.join(folder, name), "rb") as f:
            d = pickle.load(f, encoding="latin1")
        return np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32), np.asarray(d["labels"], dtype=np.int64)

    parts = [read(f"data_batch_{i}") for i in range(1, 6)]
    xtr = torch.from_numpy(np.concatenate([p[0] for p in parts])).float() / 255.0
    ytr = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    xte, yte = read("test_batch")
    xte = torch.from_numpy(xte).float() / 255.0
    mean = xtr.mean(dim=(0, 2, 3), keepdim=True)
    std = xtr.std(dim=(0, 2, 3), keepdim=True)
    return (xtr - mean) / std, ytr, (xte - mean) / std, torch.from_numpy(yte)


# ----------------------------------------------------------------------------------------
# models
# ----------------------------------------------------------------------------------------
def _set_backend(model, backend):
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend


# ----------------------------------------------------------------------------------------
# training loop
# ----------------------------------------------------------------------------------------
class Trainer:
    """SGD with Nesterov momentum, weight decay and a one-cycle learning rate, on one model."""

    def __init__(self, model, device, dtype, args, steps_total):
        import torch

        self.model = model.to(device).to(memory_format=torch.channels_last)
        self.device, self.dtype = device, dtype
        self.opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                                   weight_decay=args.weight_decay, nesterov=True)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(self.opt, max_lr=args.lr, total_steps=max(steps_total, 1))
        self.losses: list[float] = []

    def _autocast(self):
        import contextlib

        import torch

        if self.dtype in (torch.float32, torch.float64):
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, x, y) -> float:
        import torch
        import torch.nn.functional as F

        self.model.train()
        x = x.to(self.device).contiguous(memory_format=torch.channels_last)
        with self._autocast():
            loss = F.cross_entropy(self.model(x).float(), y.to(self.device))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.losses.append(loss.item())
        return self.losses[-1]

    def accuracy(self, x, y, batch: int = 256, desc: str = "test") -> float:
        """Top-1 accuracy on (x, y) in batches of ``batch``, with a progress bar."""
        import torch
        from tqdm import tqdm

        self.model.eval()
        correct = 0
        with torch.no_grad(), self._autocast():
            for i in tqdm(range(0, len(y), batch), desc=desc, unit="batch", file=sys.stderr, disable=None,
                          leave=False):
                xb = x[i : i + batch].to(self.device).contiguous(memory_format=torch.channels_last)
                correct += (self.model(xb).argmax(1).cpu() == y[i : i + batch]).sum().item()
        return correct / len(y)


def run(args: argparse.Namespace) -> int:
    from ._app import UsageError, prepare_device, require, requested_backend, resolve_backend

    if args.image_size < 4:
        raise UsageError(f"--image-size: expected at least 4 (pixels), got {args.image_size}")
    if not args.data:
        require("sklearn", what="resconv train on the digits (no --data)")
    require("matplotlib", what="resconv train's filter and feature-map PNGs")
    if args.recipe:
        require("torchvision", what=f"--recipe {args.recipe} (its augmentation: torchvision.transforms.v2)")
    # The Triton interpreter only where Triton is asked for by name: auto on the CPU is torch.
    device_name = prepare_device(args.device, triton_may_run=requested_backend(args.backend)[0] == "triton")
    import torch

    import resconv.tolerances as T
    from resconv.models import resnet18, torch_resnet18

    device = torch.device(device_name)
    dtype = getattr(torch, args.dtype)
    backend, backend_line = resolve_backend(args.backend, device_name, dtype)
    torch.manual_seed(args.seed)
    from .recipes import fill_defaults, run_recipe

    if args.recipe:
        return run_recipe(args, device, backend, backend_line)
    fill_defaults(args)
    if args.data:
        try:
            xtr, ytr, xte, yte = load_cifar10(str(args.data))
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        if args.image_size != 32:
            import torch.nn.functional as F

            xtr, xte = (F.interpolate(t, size=(args.image_size,) * 2, mode="bilinear", align_corners=False)
                        for t in (xtr, xte))
        dataset, epochs = "cifar10", args.epochs or 10
    else:
        xtr, ytr, xte, yte = load_digits(args.seed, args.image_size)
        dataset, epochs = "digits", args.epochs or 3
    if args.eval_images is not None:
        xte, yte = xte[: args.eval_images], yte[: args.eval_images]
    steps_per_epoch = (len(ytr) + args.batch_size - 1) // args.batch_size
    schedule_steps = epochs * steps_per_epoch  # the schedule is the full run's; --max-steps cuts it short
    steps = schedule_steps if args.max_steps is None else min(args.max_steps, schedule_steps)

    model = resnet18(num_classes=10, variant="cifar")
    _set_backend(model, backend)
    runs = {"resconv": None}
    if args.compare:
        ref = torch_resnet18(10, variant="cifar")
        ref.load_state_dict(model.state_dict())  # same initial weights
        runs["torch.nn"] = Trainer(ref, device, dtype, args, schedule_steps)
        ref64 = torch_resnet18(10, variant="cifar")
        ref64.load_state_dict(model.state_dict())
        fp64 = Trainer(ref64.double(), device, torch.float64, args, schedule_steps)
    runs["resconv"] = Trainer(model, device, dtype, args, schedule_steps)
    length = f"{epochs} epochs, {steps} steps" if steps == schedule_steps else \
        f"{steps} of the {schedule_steps} steps of {epochs} epochs (--max-steps)"
    print(f"resconv train: {dataset} ({len(ytr)} train / {len(yte)} test, 3x{args.image_size}x{args.image_size}), "
          f"ResNet-18 (CIFAR stem), device={device}, {backend_line}, dtype={args.dtype}, {length}, "
          f"batch {args.batch_size}{', vs torch.nn' if args.compare else ''}")

    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    step = 0
    bar = tqdm(total=steps, desc="train", unit="step", file=sys.stderr, disable=None)
    while step < steps:
        order = torch.randperm(len(ytr), generator=gen)  # the same order for both models
        for i in range(0, len(ytr), args.batch_size):
            if step >= steps:
                break
            idx = order[i : i + args.batch_size]
            postfix = {name: f"{tr.step(xtr[idx], ytr[idx]):.4f}" for name, tr in runs.items()}
            if args.compare and step < args.check_steps:
                fp64.step(xtr[idx].double(), ytr[idx])
            bar.set_postfix(postfix)
            bar.update(1)
            step += 1
    bar.close()
    elapsed = time.perf_counter() - t0
    acc = {name: tr.accuracy(xte, yte, desc=f"test {name}") for name, tr in runs.items()}
    _write_figures(args, model, xte[0], dataset)
    return _report(args, runs, acc, elapsed, dataset, dtype, T, fp64.losses if args.compare else None)


def _write_figures(args, model, image, dataset) -> None:
    """The first-layer filters and one test image's feature maps (resconv.train_figures)."""
    from ._app import default_out
    from .train_figures import write_training_figures

    out = Path(args.out) if args.out else default_out("train")
    shown = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-12)
    for f in write_training_figures(model, image, shown, out, f"ResNet-18, {dataset}, one-cycle run",
                                    grey=dataset == "digits"):
        print(f"wrote {out / f}")


def _report(args, runs, acc, elapsed, dataset, dtype, T, losses64) -> int:
    names = list(runs)
    losses = {n: runs[n].losses for n in names}
    nsteps = len(losses["resconv"])
    shown = sorted(set(list(range(min(nsteps, 10))) + list(range(0, nsteps, max(1, nsteps // 10))) + [nsteps - 1]))
    header = "step  " + "  ".join(f"{n:>10}" for n in names) + ("   |diff|/loss" if len(names) > 1 else "")
    print(header)
    for s in shown:
        row = f"{s:>4}  " + "  ".join(f"{losses[n][s]:10.5f}" for n in names)
        if len(names) > 1:
            a, b = losses["resconv"][s], losses["torch.nn"][s]
            row += f"   {abs(a - b) / max(abs(b), 1e-12):.2e}"
        print(row)
    ok = True
    checked = []  # what the verdict rests on: PASS is printed only when something was checked
    for n in names:
        print(f"test accuracy {n}: {acc[n]:.2%}")
    full_run = args.max_steps is None and args.eval_images is None  # the accuracy claims need the whole run
    if dataset == "digits" and full_run:
        checked.append(f"accuracy >= {DIGITS_ACCURACY_TARGET:.0%} on digits")
        for n in names:
            if acc[n] < DIGITS_ACCURACY_TARGET:
                print(f"FAIL: {n} reached {acc[n]:.2%} < {DIGITS_ACCURACY_TARGET:.0%} on digits")
                ok = False
    if len(names) > 1:
        checked.append("loss curves against torch.nn" + (" and float64" if losses64 else ""))
        ok = _check_curves(losses["resconv"], losses["torch.nn"], losses64, dtype, T) and ok
        gap = abs(acc["resconv"] - acc["torch.nn"])
        if full_run:
            checked.append(f"accuracy within {MAX_ACCURACY_GAP:.0%} of torch.nn")
            if gap > MAX_ACCURACY_GAP:
                print(f"FAIL: accuracies differ by {gap:.2%} > {MAX_ACCURACY_GAP:.0%}")
                ok = False
    if checked:
        print(f"{nsteps} steps in {elapsed:.1f} s: {'PASS' if ok else 'FAIL'} ({'; '.join(checked)})")
    else:
        print(f"{nsteps} steps in {elapsed:.1f} s: done, nothing checked (the accuracy target needs the whole run "
              "on digits; --compare checks against torch.nn)")
    if losses64:
        losses["torch.nn-float64"] = losses64
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(dataset=dataset, args={k: v for k, v in vars(args).items() if k != "func"},
                           losses=losses, accuracy=acc, seconds=elapsed, passed=ok if checked else None,
                           checked=checked), f, indent=2, default=str)
        print(f"wrote {args.json}")
    return 0 if ok else 1


def _check_curves(ours, theirs, ref64, dtype, T) -> bool:
    """The early-step rule of the module docstring; prints what it compared."""
    out_tol = T.tolerance(dtype)
    ok = True
    d0 = abs(ours[0] - theirs[0]) / max(abs(theirs[0]), 1e-12)
    if not ref64 and d0 > out_tol.rtol + out_tol.atol:
        # Without the float64 run (--check-steps 0) only the direct comparison is left. With it,
        # step 0 is judged against float64 like the others: with few values per channel in a
        # BatchNorm (small batches or images), torch.nn's own float32 loss is farther from
        # float64 than this tolerance.
        print(f"FAIL: step 0 losses differ by {d0:.2e} (relative), above {out_tol.rtol + out_tol.atol:.1e}")
        ok = False
    tol = T.tolerance(dtype, grad=True)
    print("step  |resconv - fp64|  |torch.nn - fp64|  (torch.nn in float64 on the same batches)")
    for s, l64 in enumerate(ref64):
        print(f"{s:>4}  {abs(ours[s] - l64):15.3e}  {abs(theirs[s] - l64):16.3e}")
    if ref64:
        e_ours = max(abs(ours[s] - l64) for s, l64 in enumerate(ref64))
        e_theirs = max(abs(theirs[s] - l64) for s, l64 in enumerate(ref64))
        bound = 2 * e_theirs + (tol.rtol + tol.atol) * max(abs(l) for l in ref64)
        verdict = "within" if e_ours <= bound else "FAIL: above"
        print(f"first {len(ref64)} steps: resconv's largest distance to float64 {e_ours:.3e} is {verdict} "
              f"2x torch.nn's ({e_theirs:.3e}) + tolerance = {bound:.3e}")
        ok = ok and e_ours <= bound
    return ok
