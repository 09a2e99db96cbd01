"""Pictures of what a trained network learned, written by ``resconv train`` after training:

* ``filters.png``: the first conv layer's filters, one RGB tile each (every filter scaled to
  [0, 1] on its own, as Krizhevsky et al. 2012, figure 3, show theirs); for grey images fed as
  three equal channels (the digits) the sum over the channels, the filter the image meets;
* ``feature_maps.png``: one real image and the activations it produces after the stem and
  after each stage (the most active channels of each).
"""
from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_filters(weight, path: Path, title: str, grey: bool = False) -> None:
    """weight (Tensor[K, C, R, S], C = 1 or 3) as a grid of K tiles; ``grey``: the sum over C."""
    import math

    plt = _pyplot()
    w = weight.detach().float().cpu()
    if grey:
        w = w.sum(1, keepdim=True)
    K = w.shape[0]
    cols = math.ceil(math.sqrt(K))
    rows = math.ceil(K / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.0 * cols + 1, 1.0 * rows + 1), squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= K:
            continue
        f = w[k]
        f = (f - f.min()) / (f.max() - f.min()).clamp_min(1e-12)
        ax.imshow(f.permute(1, 2, 0).numpy() if f.shape[0] == 3 else f[0].numpy(), cmap=None if f.shape[0] == 3
                  else "gray", interpolation="nearest")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def stage_outputs(model, image) -> list[tuple[str, object]]:
    """(name, Tensor[C, H, W]) after the stem (``conv1``) and each stage (``layer1``...) of
    ``model`` for one image (Tensor[C, H, W], normalised as in training), eval mode."""
    import torch

    names = ["conv1"] + [n for n in (f"layer{i}" for i in range(1, 9)) if hasattr(model, n)]
    found = {}
    mods = dict(model.named_modules())
    hooks = [mods[n].register_forward_hook(lambda m, a, o, n=n: found.__setitem__(n, o[0].detach().float().cpu()))
             for n in names]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            p = next(model.parameters())
            model(image[None].to(p.device, p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return [(n, found[n]) for n in names]


def plot_feature_maps(image, maps, path: Path, title: str, channels: int = 8) -> None:
    """The image (Tensor[C, H, W] in [0, 1]) and, per stage, its ``channels`` most active maps."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(maps), channels + 1, figsize=(1.3 * (channels + 1), 1.35 * len(maps) + 0.6),
                             squeeze=False)
    img = image.float().cpu()
    for r, (name, fmap) in enumerate(maps):
        ax = axes[r, 0]
        if r == 0:
            ax.imshow(img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy(), cmap="gray")
            ax.set_title("input", fontsize=8)
        ax.axis("off")
        top = fmap.mean(dim=(1, 2)).argsort(descending=True)[:channels]
        for c, k in enumerate(top.tolist()):
            a = axes[r, c + 1]
            a.imshow(fmap[k].numpy(), cmap="viridis", interpolation="nearest")
            if fmap[k].numel() == 1:  # one unit: a colour alone says nothing
                a.text(0, 0, f"{fmap[k].item():.2f}", ha="center", va="center", color="white", fontsize=8)
            a.set_xticks([])
            a.set_yticks([])
            if c == 0:
                a.set_ylabel(f"{name}\n{fmap.shape[1]}x{fmap.shape[2]}", fontsize=8)
            a.set_title(f"ch {k}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_training_figures(model, image, shown, out: Path, label: str, grey: bool = False) -> list[str]:
    """Both figures for a trained ``model`` into ``out``.

    Args:
        image (Tensor[C, H, W]): one test image as the model takes it (normalised).
        shown (Tensor[C, H, W]): the same image in [0, 1], for display.
        label (str): what was trained on what (figure titles).
        grey (bool): the images are grey ones repeated over the channels (filters shown summed).
    Returns:
        the file names written.
    """
    out.mkdir(parents=True, exist_ok=True)
    plot_filters(model.conv1.weight, out / "filters.png", f"first-layer filters after training ({label})"
                 + (", summed over the 3 equal input channels" if grey else ""), grey)
    plot_feature_maps(shown, stage_outputs(model, image), out / "feature_maps.png",
                      f"feature maps after the stem and each stage ({label}): the 8 most active channels")
    return ["filters.png", "feature_maps.png"]
