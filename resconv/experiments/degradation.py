"""``resconv experiment degradation``: training error against steps of plain and residual
networks at two depths (default 20 and 56): He et al. 2016 ("Deep Residual Learning for
Image Recognition"), figures 1 and 6, where the deeper plain net trains worse than the
shallower one and the deeper ResNet better.

The nets are He et al.'s CIFAR-10 family (:func:`resconv.models.cifar_resnet`: 6n + 2
layers, 16/32/64 filters, BatchNorm, projection shortcuts where the shape changes) and their
plain twins, trained from the same seed on the same batches with SGD (momentum 0.9, weight
decay 1e-4). The CPU default is a short run on digits; ``--full`` is He et al.'s schedule
(batch 128, lr 0.1 divided by 10 at 32k and 48k steps, 64k steps) for a GPU and CIFAR-10.
"""
from __future__ import annotations

import resconv._app as _app
import resconv._cmd as _cmd

from . import common

FULL = dict(steps=64_000, batch_size=128, milestones=(32_000, 48_000), image_size=32)


def add_parser(exps) -> None:
    p = exps.add_parser("degradation", help="training error of plain vs residual nets at 20 and 56 layers",
                        description=__doc__.split("\n\n")[0], formatter_class=_cmd.HelpFormatter)
    p.add_argument("--depths", type=int, nargs="+", default=[20, 56], help="depths (6n + 2) to compare")
    p.add_argument("--steps", type=_app.positive_int, default=300, help="SGD steps per net")
    p.add_argument("--batch-size", type=_app.positive_int, default=64)
    p.add_argument("--lr", type=_app.positive_float, default=0.1, help="learning rate (He et al.'s)")
    p.add_argument("--evals", type=_app.positive_int, default=10, help="times the whole training and test sets are evaluated")
    p.add_argument("--full", action="store_true",
                   help="He et al.'s schedule: 64k steps of batch 128, lr /10 at 32k and 48k, 32x32 (a GPU's work)")
    common.add_data_options(p, image_size=8)
    _cmd.add_common(p, "experiment degradation")
    p.set_defaults(func=run)


def run(args) -> int:
    bad = [d for d in args.depths if d < 8 or (d - 2) % 6]
    if bad:
        raise _cmd.UsageError(f"--depths: {bad[0]} is not of the form 6n + 2 (20, 32, 44, 56, 110)")
    if args.full:
        args.steps, args.batch_size, args.image_size = FULL["steps"], FULL["batch_size"], args.image_size or 32
    data, device, backend = common.start(args)
    xtr, ytr, xte, yte, dataset = data
    import torch

    from resconv.models import cifar_resnet

    order = common.batches(len(ytr), args.batch_size, args.steps, args.seed)
    checkpoints = sorted({round(i * args.steps / args.evals) for i in range(args.evals + 1)})
    milestones = FULL["milestones"] if args.full else ()
    runs = {}
    for depth in sorted(args.depths):
        for plain in (True, False):
            name = f"{'plain' if plain else 'resnet'}-{depth}"
            torch.manual_seed(args.seed)
            model = _cmd.set_backend(cifar_resnet(depth, plain=plain), backend).to(device)
            opt = common.sgd(model, args.lr)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), 0.1)
            r = dict(depth=depth, plain=plain, step_loss=[], step_error=[], eval_steps=[], train_error=[],
                     test_error=[])
            bar = _cmd.progress(args.steps, name)
            for step in range(args.steps + 1):
                if step in checkpoints:
                    r["eval_steps"].append(step)
                    r["train_error"].append(common.error_rate(model, xtr, ytr, device))
                    r["test_error"].append(common.error_rate(model, xte, yte, device))
                    bar.set_postfix(train_err=f"{r['train_error'][-1]:.3f}")
                if step == args.steps:
                    break
                idx = order[step]
                loss, berr = common.train_step(model, opt, xtr[idx], ytr[idx], device)
                sched.step()
                r["step_loss"].append(loss)
                r["step_error"].append(berr)
                bar.update(1)
            bar.close()
            runs[name] = r
    print(f"{dataset}, {xtr.shape[-1]}x{xtr.shape[-1]}, {args.steps} steps of batch {args.batch_size}, lr {args.lr}")
    print(f"{'net':<12} {'train error':>12} {'test error':>11} {'(final, eval mode)':>20}")
    for name, r in runs.items():
        print(f"{name:<12} {r['train_error'][-1]:12.2%} {r['test_error'][-1]:11.2%}")
    verdict = _verdict(runs, sorted(args.depths))
    print(verdict)
    out = _cmd.out_dir(args)
    _plot(runs, out / "degradation.png", f"{dataset} {xtr.shape[-1]}x{xtr.shape[-1]}, batch {args.batch_size}, "
                                         f"lr {args.lr} (He et al. 2016, fig. 1 / 6)")
    _cmd.write_json(out / "degradation.json", dict(dataset=dataset, image_size=xtr.shape[-1], steps=args.steps,
                                                   batch_size=args.batch_size, lr=args.lr, milestones=list(milestones),
                                                   nets=runs, verdict=verdict, run=_cmd.run_info(args, device, backend)))
    _cmd.finish(out, ["degradation.png", "degradation.json"])
    return 0


def _verdict(runs, depths) -> str:
    """What this run shows about the deepest vs the shallowest net, from the final training errors."""
    lo, hi = depths[0], depths[-1]
    if lo == hi:
        return "one depth only: nothing to compare"
    e = {k: r["train_error"][-1] for k, r in runs.items()}
    plain = "worse" if e[f"plain-{hi}"] > e[f"plain-{lo}"] else "not worse"
    res = "worse" if e[f"resnet-{hi}"] > e[f"resnet-{lo}"] else "not worse"
    return (f"measured: plain-{hi} trains {plain} than plain-{lo} ({e[f'plain-{hi}']:.2%} vs {e[f'plain-{lo}']:.2%} "
            f"training error); resnet-{hi} {res} than resnet-{lo} ({e[f'resnet-{hi}']:.2%} vs "
            f"{e[f'resnet-{lo}']:.2%})")


def _plot(runs, path, title) -> None:
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    colours = {}
    for name, r in runs.items():
        ax = axes[0 if r["plain"] else 1]
        c = colours.setdefault(r["depth"], f"C{len(colours)}")
        ax.plot(r["eval_steps"], [100 * v for v in r["train_error"]], "-", color=c, marker="o", ms=3,
                label=f"{name} training")
        ax.plot(r["eval_steps"], [100 * v for v in r["test_error"]], "--", color=c, alpha=0.7, label=f"{name} test")
    for ax, t in zip(axes, ("plain", "residual")):
        ax.set_title(f"{t} nets", fontsize=10)
        ax.set_xlabel("SGD step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("error (%), eval mode")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
