"""What the experiments share: the data (digits by default, CIFAR-10 from ``--data``), the
SGD training loop, accuracy, plotting."""
from __future__ import annotations

import resconv._app as _app
import resconv._cmd as _cmd


def add_data_options(p, image_size: int) -> None:
    p.add_argument("--data", metavar="DIR", type=_app.existing_dir, default=None,
                   help="CIFAR-10 folder (torchvision's cifar-10-batches-py); default: scikit-learn's digits")
    p.add_argument("--image-size", type=_app.positive_int, default=None,
                   help=f"input side in pixels (default: {image_size} for digits, whose originals are 8x8; "
                        "32 for CIFAR-10)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the data split and the batch order")
    p.add_argument("--limit", type=_app.positive_int, default=None, metavar="N",
                   help="use only the first N training and N test images (smoke runs; default: all)")


def load(args, default_size: int):
    """(x_train, y_train, x_test, y_test, name): normalised per channel with the training
    set's statistics; Tensor[n, 3, S, S] float32."""
    import torch.nn.functional as F

    import resconv.data as data

    if args.data:
        xtr, ytr, xte, yte = data.cifar10(str(args.data))
        size, name = args.image_size or 32, "cifar10"
        if size != 32:
            xtr, xte = (F.interpolate(t, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
                        for t in (xtr, xte))
    else:
        size, name = args.image_size or default_size, "digits"
        xtr, ytr, xte, yte = data.digits(args.seed, size)
    if args.limit is not None:
        xtr, ytr, xte, yte = xtr[: args.limit], ytr[: args.limit], xte[: args.limit], yte[: args.limit]
    mean, std = data.channel_stats(xtr)
    return data.normalise(xtr, mean, std), ytr, data.normalise(xte, mean, std), yte, name


def start(args, batch_option=True):
    """Check what argparse could not, resolve the device and backend, load the data.

    Args:
        batch_option: ``--batch-size`` must not exceed the training images.
    Returns:
        ((x_train, y_train, x_test, y_test, dataset name), torch.device, backend name).
    Raises:
        resconv._app.UsageError: naming the option.
    """
    if args.image_size is not None and args.image_size < 4:
        raise _cmd.UsageError(f"--image-size: expected at least 4 (pixels), got {args.image_size}")
    if args.limit is not None and args.limit < 2:
        raise _cmd.UsageError(f"--limit: expected at least 2 (images), got {args.limit}")
    device, backend = _cmd.setup(args, needs=("matplotlib",) if args.data else ("matplotlib", "sklearn"))
    try:
        loaded = load(args, 8)
    except FileNotFoundError as e:
        raise _cmd.UsageError(str(e)) from None
    if batch_option and args.batch_size > len(loaded[1]):
        raise _cmd.UsageError(f"--batch-size {args.batch_size}: more than the {len(loaded[1])} training images")
    return loaded, device, backend


def sgd(model, lr: float, momentum: float = 0.9, weight_decay: float = 1e-4):
    import torch

    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)


def batches(n: int, batch: int, steps: int, seed: int):
    """``steps`` index tensors of ``batch`` examples, reshuffled every epoch (seeded)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    out = []
    while len(out) < steps:
        order = torch.randperm(n, generator=gen)
        out += [order[i:i + batch] for i in range(0, n - batch + 1, batch)]
    return out[:steps]


def train_step(model, opt, x, y, device) -> tuple[float, float]:
    """One SGD step on a batch: (loss, batch error rate), train mode."""
    import torch.nn.functional as F

    model.train()
    logits = model(x.to(device))
    loss = F.cross_entropy(logits, y.to(device))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item(), (logits.argmax(1).cpu() != y).float().mean().item()


def error_rate(model, x, y, device, batch: int = 500) -> float:
    """Classification error of ``model`` in eval mode on (x, y)."""
    import torch

    model.eval()
    wrong = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            wrong += (model(x[i:i + batch].to(device)).argmax(1).cpu() != y[i:i + batch]).sum().item()
    return wrong / max(len(y), 1)


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
