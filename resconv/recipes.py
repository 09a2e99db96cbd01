"""Published training recipes, run by ``resconv train --recipe NAME``.

``cifar10``: ResNet-18 on CIFAR-10 as it is commonly published (e.g. the widely used
pytorch-cifar training script; the augmentation of He et al. 2016, section 4.2): per image
RandomCrop(32, padding=4) and RandomHorizontalFlip, normalisation by CIFAR-10's channel
means (0.4914, 0.4822, 0.4465) and standard deviations (0.2470, 0.2435, 0.2616); batch 128
(test 256); SGD, lr 0.1, momentum 0.9, weight decay 5e-4; cosine annealing of the learning
rate over the epochs (stepped once per epoch); 200 epochs; cross-entropy.

On digits (no ``--data``) the same recipe runs with two changes that the data set needs: no
horizontal flip (a mirrored digit is not the same class) and normalisation by the digits'
own mean and standard deviation. The crop's padding is an eighth of the image side (4 at
32x32). Augmentation is torchvision.transforms.v2 on tensors, drawn per image.

After training, the first-layer filters and the feature maps of one test image are written
as PNGs (:mod:`resconv.train_figures`).
"""
from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Recipe:
    name: str
    epochs: int
    batch_size: int
    test_batch_size: int
    lr: float
    momentum: float
    weight_decay: float
    mean: tuple
    std: tuple


RECIPES = {
    "cifar10": Recipe("cifar10", epochs=200, batch_size=128, test_batch_size=256, lr=0.1, momentum=0.9,
                      weight_decay=5e-4, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
}
# resconv train's quick one-cycle run (no --recipe): its defaults for the options a recipe also sets.
QUICK = dict(batch_size=64, lr=0.05, momentum=0.9, weight_decay=5e-4)


def fill_defaults(args) -> None:
    """Options the user left unset (None) take the recipe's values, or the quick run's."""
    recipe = RECIPES[args.recipe] if getattr(args, "recipe", None) else None
    for k, v in QUICK.items():
        if getattr(args, k, None) is None:
            setattr(args, k, getattr(recipe, k) if recipe else v)


def augmentation(size: int, flip: bool, mean, std):
    """Per-image training transform (torchvision.transforms.v2 on Tensor[C, H, W] in [0, 1])."""
    from torchvision.transforms import v2

    steps = [v2.RandomCrop(size, padding=max(size // 8, 1))]
    if flip:
        steps.append(v2.RandomHorizontalFlip())
    steps.append(v2.Normalize(list(mean), list(std)))
    return v2.Compose(steps)


def run_recipe(args, device, backend: str, backend_line: str) -> int:
    """``resconv train --recipe NAME`` (the train command's parsed arguments, its resolved
    device and backend): train, evaluate each epoch, write JSON and the figures. Returns the
    exit code; raises resconv._app.UsageError for options the recipe cannot take."""
    import torch
    import torch.nn.functional as F
    from torchvision.transforms import v2

    from ._app import UsageError, default_out
    from .data import channel_stats, cifar10, digits
    from .models import resnet18
    from .train_figures import write_training_figures

    recipe = RECIPES[args.recipe]
    if args.compare:
        raise UsageError("--compare: not with --recipe (it compares the quick one-cycle run with torch.nn)")
    fill_defaults(args)
    if args.data:
        try:
            xtr, ytr, xte, yte = cifar10(str(args.data))
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        dataset, flip, mean, std = "cifar10", True, recipe.mean, recipe.std
        if args.image_size != 32:
            xtr, xte = (F.interpolate(t, size=(args.image_size,) * 2, mode="bilinear", antialias=True,
                                      align_corners=False).clamp(0, 1) for t in (xtr, xte))
    else:
        xtr, ytr, xte, yte = digits(args.seed, args.image_size)
        dataset, flip = "digits", False
        mean, std = channel_stats(xtr)
    if args.eval_images is not None:
        xte, yte = xte[: args.eval_images], yte[: args.eval_images]
    epochs = args.epochs or recipe.epochs
    train_tf = augmentation(args.image_size, flip, mean, std)
    test_tf = v2.Normalize(list(mean), list(std))
    steps_per_epoch = (len(ytr) + args.batch_size - 1) // args.batch_size
    total = epochs * steps_per_epoch if args.max_steps is None else min(args.max_steps, epochs * steps_per_epoch)

    model = resnet18(10, "cifar")
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    model = model.to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    dtype = getattr(torch, args.dtype)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype not in (torch.float32, torch.float64)
                else torch.autocast(device.type, enabled=False))
    print(f"resconv train --recipe {recipe.name}: {dataset} ({len(ytr)} train / {len(yte)} test, "
          f"3x{args.image_size}x{args.image_size}), ResNet-18 (CIFAR stem), device={device}, {backend_line}, "
          f"{epochs} epochs of batch {args.batch_size}, SGD lr {args.lr} momentum {args.momentum} weight decay "
          f"{args.weight_decay}, cosine annealing, RandomCrop(padding={max(args.image_size // 8, 1)})"
          f"{' + RandomHorizontalFlip' if flip else ''}, {total} steps")

    from tqdm import tqdm

    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # the augmentation's draws
    history = dict(loss=[], epoch_lr=[], test_accuracy=[])
    bar = tqdm(total=total, desc="train", unit="step", file=sys.stderr, disable=None)
    t0, step = time.perf_counter(), 0
    for epoch in range(epochs):
        if step >= total:
            break
        model.train()
        history["epoch_lr"].append(opt.param_groups[0]["lr"])
        order = torch.randperm(len(ytr), generator=gen)
        for i in range(0, len(ytr), args.batch_size):
            if step >= total:
                break
            idx = order[i:i + args.batch_size]
            xb = torch.stack([train_tf(img) for img in xtr[idx]]).to(device).contiguous(
                memory_format=torch.channels_last)
            with autocast:
                loss = F.cross_entropy(model(xb).float(), ytr[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history["loss"].append(loss.item())
            bar.set_postfix(epoch=epoch, loss=f"{history['loss'][-1]:.4f}", refresh=False)
            bar.update(1)
            step += 1
        sched.step()
        history["test_accuracy"].append(_accuracy(model, test_tf(xte), yte, recipe.test_batch_size, device, autocast))
    bar.close()
    elapsed = time.perf_counter() - t0
    acc = history["test_accuracy"][-1]
    print(f"{step} steps ({len(history['test_accuracy'])} epochs) in {elapsed:.1f} s; test accuracy after each "
          f"epoch: " + ", ".join(f"{a:.2%}" for a in history["test_accuracy"]))
    out = Path(args.out) if args.out else default_out("train")
    files = write_training_figures(model, test_tf(xte[:1])[0], xte[0], out,
                                   f"ResNet-18, {dataset}, recipe {recipe.name}, epochs: {len(history['test_accuracy'])}",
                                   grey=dataset == "digits")
    result = dict(dataset=dataset, recipe=asdict(recipe), flip=flip, mean=list(mean), std=list(std),
                  args={k: v for k, v in vars(args).items() if k != "func"}, steps=step, seconds=elapsed,
                  final_test_accuracy=acc, **history)
    (out / "train.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    files.append("train.json")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=str) + "\n")
        files.append(str(args.json))
    for f in files:
        print(f"wrote {out / f}")
    return 0


def _accuracy(model, x, y, batch, device, autocast) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad(), autocast:
        for i in range(0, len(y), batch):
            xb = x[i:i + batch].to(device).contiguous(memory_format=torch.channels_last)
            correct += (model(xb).argmax(1).cpu() == y[i:i + batch]).sum().item()
    return correct / max(len(y), 1)
