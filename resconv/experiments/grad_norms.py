"""``resconv experiment grad-norms``: the norm of every layer's weight gradient at
initialisation, for a deep plain network against a residual network of the same depth, each
with and without BatchNorm, on one batch of real images (cross-entropy loss, train mode).

The nets (:mod:`resconv.models.deep`): PlainNet = conv(3, W) [+ BN] + ReLU, then depth - 2
convs (W, W) [+ BN] + ReLU, global average pooling, fc; the ResNet has the same stem and
(depth - 2) / 2 BasicBlocks of W channels (identity shortcuts). The figures are what this run
measures: nothing is assumed from a textbook.
"""
from __future__ import annotations

import resconv._app as _app
import resconv._cmd as _cmd

from . import common

NETS = (("plain", True), ("plain", False), ("residual", True), ("residual", False))


def add_parser(exps) -> None:
    p = exps.add_parser("grad-norms", help="per-layer gradient norms at initialisation: plain vs ResNet, +/- BN",
                        description=__doc__.split("\n\n")[0], formatter_class=_cmd.HelpFormatter)
    p.add_argument("--depth", type=_app.positive_int, default=50, help="weighted layers of each net (even, >= 4)")
    p.add_argument("--width", type=_app.positive_int, default=64, help="channels of every conv")
    p.add_argument("--batch-size", type=_app.positive_int, default=64, help="images in the batch")
    p.add_argument("--init", choices=("default", "kaiming"), default="default",
                   help="conv weights: torch.nn.Conv2d's default (Kaiming-uniform, a=sqrt(5)) or N(0, 2/fan_out)")
    common.add_data_options(p, image_size=8)
    _cmd.add_common(p, "experiment grad-norms")
    p.set_defaults(func=run)


def grad_norms(model, x, y) -> list[float]:
    """L2 norm of the loss gradient of each conv's weight (main path, input order), then of fc's."""
    import torch.nn.functional as F

    from resconv.models.deep import conv_layers

    model.train()
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return [m.weight.grad.norm().item() for _, m in conv_layers(model)] + [model.fc.weight.grad.norm().item()]


def run(args) -> int:
    if args.depth < 4 or args.depth % 2:
        raise _cmd.UsageError(f"--depth must be even and at least 4, got {args.depth}")
    data, device, backend = common.start(args, batch_option=False)
    xtr, ytr, _, _, dataset = data
    import torch

    from resconv.models import plain_net, residual_net

    gen = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(len(ytr), generator=gen)[: args.batch_size]
    x, y = xtr[idx].to(device), ytr[idx].to(device)
    results = {}
    bar = _cmd.progress(len(NETS), "grad-norms")
    for kind, bn in NETS:
        torch.manual_seed(args.seed)
        build = plain_net if kind == "plain" else residual_net
        model = build(args.depth, args.width, batch_norm=bn, init=args.init)
        norms = grad_norms(_cmd.set_backend(model, backend).to(device), x, y)
        convs = norms[:-1]
        results[f"{kind}{'' if bn else ' no BN'}"] = dict(
            block=kind, batch_norm=bn, norms=norms, first_over_last=convs[0] / convs[-1],
            max_over_min=max(convs) / min(convs) if min(convs) > 0 else float("inf"))
        bar.update(1)
    bar.close()
    print(f"depth {args.depth}, width {args.width}, {args.init} init; one batch of {len(y)} {dataset} images "
          f"({x.shape[-1]}x{x.shape[-1]}); weight-gradient L2 norms")
    print(f"{'net':<18} {'first conv':>11} {'last conv':>11} {'fc':>11} {'first/last':>11} {'max/min':>11}")
    for name, r in results.items():
        n = r["norms"]
        print(f"{name:<18} {n[0]:11.3e} {n[-2]:11.3e} {n[-1]:11.3e} {r['first_over_last']:11.3e} "
              f"{r['max_over_min']:11.3e}")
    out = _cmd.out_dir(args)
    _plot(results, out / "grad_norms.png", f"weight-gradient norms at initialisation, depth {args.depth} "
                                           f"({dataset}, batch {len(y)}, {args.init} init)")
    _cmd.write_json(out / "grad_norms.json", dict(dataset=dataset, depth=args.depth, width=args.width, init=args.init,
                                                  batch=len(y), image_size=x.shape[-1], nets=results,
                                                  run=_cmd.run_info(args, device, backend)))
    _cmd.finish(out, ["grad_norms.png", "grad_norms.json"])
    return 0


def _plot(results, path, title) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    styles = {"plain": "-", "residual": "--"}
    for name, r in results.items():
        n = r["norms"]
        ax.semilogy(range(1, len(n) + 1), [max(v, 1e-300) for v in n], styles[r["block"]], marker=".",
                    label=f"{name}: first/last conv {r['first_over_last']:.3g}")
    ax.set_xlabel("layer (1 = first conv, last = fc)")
    ax.set_ylabel("||dL/dW|| (log scale)")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
