"""``resconv experiment lesion``: delete one block at a time from a trained ResNet-18 and from
a trained plain 18-layer net, and measure the test accuracy after each deletion (Veit,
Wilber and Belongie 2016, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks").

Both nets have ResNet-18's CIFAR layout (3x3 stem, stages of 64/128/256/512 filters, two
blocks each; :class:`resconv.models.StagedNet`, the plain one is :func:`resconv.models.plain18`;
``--width`` scales the filters for smoke runs) and are
trained from the same seed on the same batches (SGD, momentum 0.9, weight decay 5e-4, cosine
learning rate). Deleting a block replaces it by its shortcut: the identity, or for a
downsampling block of the ResNet its 1x1 projection; a plain block that changes the shape has
no shortcut and cannot be deleted. The CPU default trains for a few epochs on digits;
``--full`` trains 30 epochs at 32x32 (a GPU's work, on CIFAR-10 with ``--data``).
"""
from __future__ import annotations

import resconv._app as _app
import resconv._cmd as _cmd

from . import common


def add_parser(exps) -> None:
    p = exps.add_parser("lesion", help="test accuracy after deleting each block of a trained ResNet-18 / plain-18",
                        description=__doc__.split("\n\n")[0], formatter_class=_cmd.HelpFormatter)
    p.add_argument("--epochs", type=_app.positive_int, default=10, help="training epochs of each net")
    p.add_argument("--batch-size", type=_app.positive_int, default=64)
    p.add_argument("--lr", type=_app.positive_float, default=0.05, help="peak learning rate (cosine annealing to 0)")
    p.add_argument("--width", type=_app.positive_int, default=64, help="filters of the first stage (then 2x, 4x, 8x)")
    p.add_argument("--full", action="store_true", help="30 epochs of batch 128 at 32x32 (a GPU's work)")
    common.add_data_options(p, image_size=8)
    _cmd.add_common(p, "experiment lesion")
    p.set_defaults(func=run)


def blocks(model):
    """(name, stage Sequential, index) of every block of a ResNet-18-like model, in input order."""
    out = []
    for s in range(1, 5):
        stage = getattr(model, f"layer{s}")
        out += [(f"layer{s}.{i}", stage, i) for i in range(len(stage))]
    return out


def shortcut(block):
    """What is left of a block without its residual branch: the identity, the projection
    (a ResNet's downsampling block), or None (a plain block that changes the shape)."""
    from torch import nn

    ds = getattr(block, "downsample", None)
    if ds is not None:
        return ds
    conv = block.conv1
    if conv.in_channels == block.conv2.out_channels and conv.stride in (1, (1, 1)):
        return nn.Identity()
    return None


def lesion(model, x, y, device) -> list[dict]:
    """Test error with each block deleted in turn (the model is restored after each)."""
    out = []
    for name, stage, i in blocks(model):
        block = stage[i]
        repl = shortcut(block)
        if repl is None:
            out.append(dict(block=name, deleted=None, error=None))
            continue
        stage[i] = repl
        try:
            out.append(dict(block=name, deleted="identity" if type(repl).__name__ == "Identity" else "projection",
                            error=common.error_rate(model, x, y, device)))
        finally:
            stage[i] = block
    return out


def run(args) -> int:
    if args.full:
        args.epochs, args.batch_size, args.image_size = 30, 128, args.image_size or 32
    data, device, backend = common.start(args)
    xtr, ytr, xte, yte, dataset = data
    import torch

    from resconv.models import StagedNet

    steps = args.epochs * (len(ytr) // args.batch_size)
    order = common.batches(len(ytr), args.batch_size, steps, args.seed)
    results = {}
    widths = tuple(args.width * m for m in (1, 2, 4, 8))
    for name, block in (("ResNet-18", "residual"), ("plain-18", "plain")):
        torch.manual_seed(args.seed)
        model = _cmd.set_backend(StagedNet(block, widths, (2, 2, 2, 2), init="kaiming"), backend).to(device)
        opt = common.sgd(model, args.lr, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
        bar = _cmd.progress(steps, f"train {name}")
        for idx in order:
            loss, _ = common.train_step(model, opt, xtr[idx], ytr[idx], device)
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
        bar.close()
        base = common.error_rate(model, xte, yte, device)
        results[name] = dict(test_error=base, lesions=lesion(model, xte, yte, device))
    print(f"{dataset} {xtr.shape[-1]}x{xtr.shape[-1]}: {args.epochs} epochs ({steps} steps of {args.batch_size}); "
          f"test accuracy with one block deleted")
    print(f"{'block':<10} " + " ".join(f"{n:>20}" for n in results))
    print(f"{'(none)':<10} " + " ".join(f"{1 - r['test_error']:20.2%}" for r in results.values()))
    for k, les0 in enumerate(results["ResNet-18"]["lesions"]):
        bname, cells = les0["block"], []
        for r in results.values():
            les = r["lesions"][k]
            cells.append("cannot delete" if les["error"] is None else f"{1 - les['error']:.2%} ({les['deleted']})")
        print(f"{bname:<10} " + " ".join(f"{c:>20}" for c in cells))
    out = _cmd.out_dir(args)
    _plot(results, out / "lesion.png", f"{dataset} {xtr.shape[-1]}x{xtr.shape[-1]}, {args.epochs} epochs "
                                       "(Veit et al. 2016)")
    _cmd.write_json(out / "lesion.json", dict(dataset=dataset, image_size=xtr.shape[-1], epochs=args.epochs,
                                              steps=steps, batch_size=args.batch_size, lr=args.lr, nets=results,
                                              run=_cmd.run_info(args, device, backend)))
    _cmd.finish(out, ["lesion.png", "lesion.json"])
    return 0


def _plot(results, path, title) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.2))
    for k, (name, r) in enumerate(results.items()):
        names = [les["block"] for les in r["lesions"]]
        acc = [None if les["error"] is None else 100 * (1 - les["error"]) for les in r["lesions"]]
        xs = [i + (k - 0.5) * 0.35 for i in range(len(names))]
        ax.bar([x for x, a in zip(xs, acc) if a is not None], [a for a in acc if a is not None], width=0.35,
               color=f"C{k}", label=f"{name} (intact: {100 * (1 - r['test_error']):.1f} %)")
        ax.axhline(100 * (1 - r["test_error"]), color=f"C{k}", ls="--", lw=1)
        for x, a in zip(xs, acc):
            if a is None:
                ax.text(x, 2, "n/a", ha="center", fontsize=7, rotation=90)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30)
    ax.set_ylim(0, 100)
    ax.set_xlabel("deleted block")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
