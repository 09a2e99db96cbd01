"""``resconv demo``: what a convolution does, shown with resconv's own Conv2d on a real photo.

* ``resconv demo filters``: classic 3x3 filters (Sobel-x, Sobel-y, blur, sharpen) as the
  four output channels of one :class:`resconv.nn.Conv2d`, and 2x2 pooling (average: a
  stride-2 Conv2d with weights 1/4; max: torch.nn.MaxPool2d, which no convolution computes)
  applied to a photograph; one PNG grid, a table and JSON.
* ``resconv demo learn-filter``: gradient descent through our Conv2d's autograd fits a
  random 3x3 kernel until its output on a photo matches a target filter's; PNG of the kernel
  over the steps and of the loss, and JSON.

Like torch.nn.Conv2d, resconv computes cross-correlation (the kernel is not flipped):
``out[i, j] = sum_{u, v} w[u, v] * x[i + u, j + v]``.
"""
from __future__ import annotations

import resconv._app as _app
import resconv._cmd as _cmd

# The textbook kernels (Gonzalez & Woods, Digital Image Processing, ch. 3). Sobel-x responds to
# intensity rising from left to right (cross-correlation: no flip).
KERNELS = {
    "sobel-x": [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]],
    "sobel-y": [[-1, -2, -1], [0, 0, 0], [1, 2, 1]],
    "blur": [[1 / 16, 2 / 16, 1 / 16], [2 / 16, 4 / 16, 2 / 16], [1 / 16, 2 / 16, 1 / 16]],  # Gaussian, sigma ~0.85
    "sharpen": [[0, -1, 0], [-1, 5, -1], [0, -1, 0]],
}


FILTERS_HELP = ("Sobel-x, Sobel-y, blur and sharpen as the four output channels of one resconv.nn.Conv2d, 2x2 "
                "average pooling as a stride-2 Conv2d and 2x2 max pooling (MaxPool2d: no convolution computes it) "
                "on a grey photograph; writes filters.png and filters.json.")
LEARN_HELP = ("Gradient descent through resconv.nn.Conv2d's autograd fits a random 3x3 kernel until its output on a "
              "crop of a photograph matches the target filter's (mean squared error, plain SGD); writes "
              "learn_filter.png (the kernel over the steps, the loss) and learn_filter.json.")


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="what a convolution does: classic filters, learning a filter",
                       description=__doc__.split("\n\n")[0] + " (see the subcommands)", formatter_class=_cmd.HelpFormatter)
    demos = p.add_subparsers(dest="demo", metavar="DEMO", required=True)

    f = demos.add_parser("filters", help="Sobel, blur, sharpen and 2x2 pooling on a photo, as one PNG grid",
                         description=FILTERS_HELP, formatter_class=_cmd.HelpFormatter)
    f.add_argument("--photo", default="camera", help="scikit-image photo (camera, astronaut, coffee, chelsea, ...)")
    f.add_argument("--size", type=_app.positive_int, default=256, help="the photo is resized to SIZE x SIZE (grey)")
    _cmd.add_common(f, "demo filters")
    f.set_defaults(func=run_filters)

    g = demos.add_parser("learn-filter", help="fit a random 3x3 kernel to a target filter by gradient descent",
                         description=LEARN_HELP, formatter_class=_cmd.HelpFormatter)
    g.add_argument("--target", choices=tuple(KERNELS), default="sobel-x", help="the filter to recover")
    g.add_argument("--photo", default="camera", help="scikit-image photo (grey)")
    g.add_argument("--size", type=_app.positive_int, default=32,
                   help="the photo subsampled to SIZE x SIZE (every k-th pixel, no smoothing: its sharp detail makes "
                        "the fit well conditioned; a smooth patch is not)")
    g.add_argument("--dtype", choices=("float64", "float32"), default=None,
                   help="default: float64 with the torch backend (auto on a CPU), float32 with triton/cuda "
                        "(float32 stops near 1e-5: the fit's condition number times float32's rounding)")
    g.add_argument("--steps", type=_app.positive_int, default=2000, help="gradient-descent steps")
    g.add_argument("--lr", type=_app.positive_float, default=0.3, help="learning rate (plain SGD)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random initial kernel")
    _cmd.add_common(g, "demo learn-filter")
    g.set_defaults(func=run_learn_filter)


def kernel(name: str, dtype=None):
    """A KERNELS entry as Tensor[3, 3] (float32 unless ``dtype``)."""
    import torch

    return torch.tensor(KERNELS[name], dtype=dtype or torch.float32)


# ----------------------------------------------------------------------------------------
# filters
# ----------------------------------------------------------------------------------------
def filter_bank(names=tuple(KERNELS), padding: int = 1):
    """One :class:`resconv.nn.Conv2d` (1 -> len(names) channels, 3x3, no bias) whose output
    channels are the named KERNELS."""
    import torch

    from .nn import Conv2d

    conv = Conv2d(1, len(names), 3, padding=padding, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.stack([kernel(n) for n in names])[:, None])
    return conv


def average_pool_conv():
    """2x2 average pooling as a convolution: Conv2d(1, 1, 2, stride=2) with weights 1/4."""
    import torch

    from .nn import Conv2d

    conv = Conv2d(1, 1, 2, stride=2, bias=False)
    with torch.no_grad():
        conv.weight.fill_(0.25)
    return conv


def run_filters(args) -> int:
    if args.size < 4:
        raise _cmd.UsageError(f"--size: expected at least 4 (pixels), got {args.size}")
    device, backend = _cmd.setup(args, needs=("matplotlib", "skimage"))
    import torch
    import torch.nn.functional as F

    from .data import photo

    try:
        x = photo(args.photo, args.size, grey=True)[None].to(device)  # [1, 1, S, S]
    except ValueError as e:
        raise _cmd.UsageError(f"--photo {args.photo}: {e}") from None
    names = list(KERNELS)
    bank = _cmd.set_backend(filter_bank(names), backend).to(device)
    avg = _cmd.set_backend(average_pool_conv(), backend).to(device)
    with torch.no_grad():
        filtered = bank(x)[0]  # [4, S, S]
        pooled_avg = avg(x)[0, 0]
        pooled_max = F.max_pool2d(x, 2)[0, 0]
        # the average-pool conv must compute what avg_pool2d does
        avg_err = (pooled_avg - F.avg_pool2d(x, 2)[0, 0]).abs().max().item()
    panels = [("photo", x[0, 0], None)] + [(n, filtered[i], KERNELS[n]) for i, n in enumerate(names)]
    panels += [("2x2 average pool (Conv2d, stride 2)", pooled_avg, [[0.25, 0.25], [0.25, 0.25]]),
               ("2x2 max pool (MaxPool2d)", pooled_max, None)]
    rows = []
    print(f"{'filter':<36} {'output':>9} {'min':>8} {'max':>8}")
    for name, img, k in panels:
        rows.append(dict(name=name, kernel=k, shape=list(img.shape), min=img.min().item(), max=img.max().item()))
        print(f"{name:<36} {'x'.join(map(str, img.shape)):>9} {rows[-1]['min']:8.3f} {rows[-1]['max']:8.3f}")
    print(f"average-pool conv vs avg_pool2d: max |difference| {avg_err:.2e}")
    out = _cmd.out_dir(args)
    _plot_filters(panels, out / "filters.png", f"{args.photo}, {args.size}x{args.size}, resconv.nn.Conv2d "
                                               f"(backend {args.backend}, {device})")
    _cmd.write_json(out / "filters.json", dict(photo=args.photo, size=args.size, panels=rows,
                                               avg_pool_conv_max_abs_diff=avg_err, run=_cmd.run_info(args, device, backend)))
    _cmd.finish(out, ["filters.png", "filters.json"])
    return 0


def _plot_filters(panels, path, title) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(2, 4, figsize=(13, 7))
    for ax, (name, img, k) in zip(axes.flat, panels):
        img = img.float().cpu()
        signed = name in ("sobel-x", "sobel-y")
        lim = img.abs().max().item() or 1.0
        ax.imshow(img, cmap="RdBu_r" if signed else "gray", vmin=-lim if signed else None, vmax=lim if signed else None)
        label = name if k is None or len(k) != 3 else name + "\n" + "\n".join(" ".join(f"{v:5.2g}" for v in row)
                                                                              for row in k)
        ax.set_title(label, fontsize=8, family="monospace")
        ax.axis("off")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------------------
# learn-filter
# ----------------------------------------------------------------------------------------
def learn_filter(x, target_kernel, steps: int, lr: float, seed: int, backend=None, on_step=None):
    """Fit a random 3x3 kernel by plain gradient descent on the mean squared error between
    ``Conv2d(x)`` and ``conv2d(x, target_kernel)`` (valid padding), through resconv's Conv2d
    and its autograd.

    Args:
        x (Tensor[1, 1, H, W]): the photo; float32 or float64, any device.
        target_kernel (Tensor[3, 3]).
        steps (int), lr (float), seed (int): the initial kernel is torch.nn.Conv2d's default
            draw under ``torch.manual_seed(seed)``.
        backend (str or None): resconv backend of the Conv2d.
        on_step (callable(step, loss, kernel) or None).
    Returns:
        (kernel Tensor[3, 3] after ``steps`` steps, losses list[float] of steps + 1 entries
        (the last one after the final step)).
    """
    import torch
    import torch.nn.functional as F

    from .nn import Conv2d

    torch.manual_seed(seed)
    conv = Conv2d(1, 1, 3, bias=False).to(x.device, x.dtype)
    conv.backend = backend
    target = F.conv2d(x, target_kernel.to(x)[None, None])
    opt = torch.optim.SGD(conv.parameters(), lr=lr)
    losses = []
    for step in range(steps + 1):
        loss = F.mse_loss(conv(x), target)
        losses.append(loss.item())
        if on_step is not None:
            on_step(step, losses[-1], conv.weight.detach()[0, 0])
        if step == steps:
            break
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return conv.weight.detach()[0, 0].clone(), losses


def run_learn_filter(args) -> int:
    if args.size < 3:
        raise _cmd.UsageError(f"--size: expected at least 3 (the kernel's side), got {args.size}")
    requested = _app.requested_backend(args.backend)[0]
    dtype = args.dtype or ("float64" if requested in ("auto", "torch") else "float32")
    if dtype == "float64" and requested in ("triton", "cuda"):
        raise _cmd.UsageError(f"--dtype float64: the {requested} backend computes float16/bfloat16/float32 only "
                              "(use --dtype float32 or --backend torch)")
    device, backend = _cmd.setup(args, dtype, needs=("matplotlib", "skimage"))
    import torch

    from .data import photo

    try:
        full = photo(args.photo, grey=True)
    except ValueError as e:
        raise _cmd.UsageError(f"--photo {args.photo}: {e}") from None
    H, W = full.shape[1:]
    if args.size > min(H, W):
        raise _cmd.UsageError(f"--size {args.size}: larger than the photo ({H}x{W})")
    k = min(H, W) // args.size
    x = full[:, : k * args.size : k, : k * args.size : k][None].to(device, getattr(torch, dtype))
    hess = _hessian_eigenvalues(x)
    target = kernel(args.target)
    keep = sorted({0, 1, 3, 10, 30, 100, 300, 1000, args.steps} & set(range(args.steps + 1)))
    snaps = {}
    bar = _cmd.progress(args.steps + 1, "learn-filter")

    def on_step(step, loss, w):
        if step in keep:
            snaps[step] = w.cpu().tolist()
        bar.update(1)
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss:.3g}")

    w, losses = learn_filter(x, target, args.steps, args.lr, args.seed, backend, on_step)
    bar.close()
    err_max = (w.cpu() - target).abs().max().item()
    rate = max(abs(1 - args.lr * hess[0]), abs(1 - args.lr * hess[-1]))
    print(f"target {args.target}; {args.photo} subsampled to {args.size}x{args.size} (every {k}th pixel), {dtype}; "
          f"lr {args.lr}, {args.steps} steps")
    print(f"loss Hessian eigenvalues {hess[0]:.3g} .. {hess[-1]:.3g}: the kernel's error shrinks at least "
          f"{rate:.4f}x per step (max |1 - lr * eigenvalue|; above 1 it diverges)")
    print(f"loss {losses[0]:.3g} -> {losses[-1]:.3g}; max |kernel - target| = {err_max:.2e}")
    print("learned kernel:\n" + "\n".join(" ".join(f"{v:+.6f}" for v in row) for row in w.cpu().tolist()))
    out = _cmd.out_dir(args)
    _plot_learning(snaps, target, losses, out / "learn_filter.png",
                   f"learning {args.target} on {args.photo} at {args.size}x{args.size} "
                   f"(lr {args.lr}, {dtype}, backend {args.backend}, {device})")
    _cmd.write_json(out / "learn_filter.json", dict(
        target=args.target, target_kernel=KERNELS[args.target], learned_kernel=w.cpu().tolist(),
        max_abs_error=err_max, initial_loss=losses[0], final_loss=losses[-1], dtype=dtype,
        hessian_eigenvalues=hess, rate_per_step=rate, losses=losses,
        snapshots={str(k): v for k, v in snaps.items()}, run=_cmd.run_info(args, device, backend)))
    _cmd.finish(out, ["learn_filter.png", "learn_filter.json"])
    return 0


def _hessian_eigenvalues(x) -> list[float]:
    """Eigenvalues of the mean-squared-error loss's Hessian in the kernel's 9 weights:
    2/L * P P^T for the L 3x3 patches P of the photo (the loss is quadratic in the kernel)."""
    import torch
    import torch.nn.functional as F

    p = F.unfold(x.double().cpu(), 3)[0]  # [9, L]
    return torch.linalg.eigvalsh(2 * p @ p.T / p.shape[1]).tolist()


def _plot_learning(snaps, target, losses, path, title) -> None:
    plt = _pyplot()
    cols = len(snaps) + 1
    fig = plt.figure(figsize=(2.0 * cols, 6))
    grid = fig.add_gridspec(2, cols, height_ratios=[1, 1.3])
    lim = max(abs(v) for row in target.tolist() for v in row)
    items = [(f"step {k}", v) for k, v in sorted(snaps.items())] + [("target", target.tolist())]
    for i, (name, k) in enumerate(items):
        ax = fig.add_subplot(grid[0, i])
        ax.imshow(k, cmap="RdBu_r", vmin=-lim, vmax=lim)
        for (r, c), v in __import__("numpy").ndenumerate(__import__("numpy").array(k)):
            ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    ax = fig.add_subplot(grid[1, :])
    ax.semilogy(range(len(losses)), [max(v, 1e-300) for v in losses])
    ax.set_xlabel("gradient-descent step")
    ax.set_ylabel("mean squared error")
    ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
