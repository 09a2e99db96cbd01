"""``resconv summary MODEL``: per-layer output shape, parameters, MACs, receptive field and
jump of one of resconv's models (:func:`resconv.summary.summary`); a table, a PNG of the
receptive field and the output size across the layers, and JSON.

MODEL: ``resnet18`` (``--variant imagenet`` or ``cifar``), ``plain18`` (ResNet-18 without
shortcuts, CIFAR stem), He et al. 2016's CIFAR nets ``resnet20``, ``resnet56``, ... and their
plain twins ``plain20``, ``plain56``, ... (depth 6n + 2).
"""
from __future__ import annotations

import re

import resconv._app as _app
import resconv._cmd as _cmd

DESCRIPTION = __doc__.split("\n\n")[0]


def add_parser(sub) -> None:
    p = sub.add_parser("summary", help="per-layer shapes, parameters, MACs, receptive fields of a model",
                       description=__doc__, formatter_class=_cmd.HelpFormatter)
    p.add_argument("model", metavar="MODEL", help="resnet18, plain18, resnet<6n+2> or plain<6n+2> (e.g. resnet56)")
    p.add_argument("--variant", choices=("imagenet", "cifar"), default=None,
                   help="resnet18's stem (default: imagenet for resnet18; the others are CIFAR nets)")
    p.add_argument("--image-size", type=_app.positive_int, default=None, metavar="N",
                   help="input height and width (default: 224 for imagenet, 32 for cifar)")
    p.add_argument("--num-classes", type=_app.positive_int, default=None, help="default: 1000 (imagenet), 10 (cifar)")
    p.add_argument("--depth", type=_app.positive_int, default=2, help="rows for modules at most this deep (1: the model's children)")
    p.add_argument("--empirical", action="store_true",
                   help="also measure each top-level layer's receptive field (input gradient of the centre unit) "
                        "on --device/--backend and check it against the analytic one")
    _cmd.add_common(p, "summary")
    p.set_defaults(func=run)


def build_model(name: str, variant: str | None, num_classes: int | None):
    """(model, variant) for a MODEL name; ValueError naming what is wrong."""
    from .models import cifar_resnet, plain18, resnet18

    if name == "resnet18":
        variant = variant or "imagenet"
        return resnet18(num_classes or (1000 if variant == "imagenet" else 10), variant), variant
    if variant == "imagenet":
        raise ValueError(f"--variant imagenet: {name} is a CIFAR network (only resnet18 has an ImageNet stem)")
    if name == "plain18":
        return plain18(num_classes or 10), "cifar"
    m = re.fullmatch(r"(resnet|plain)(\d+)", name)
    if m is None:
        raise ValueError(f"MODEL: expected resnet18, plain18, resnet<6n+2> or plain<6n+2>, got {name!r}")
    depth = int(m.group(2))
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"MODEL: {name}: the CIFAR nets have depth 6n + 2 (20, 32, 44, 56, 110), got {depth}")
    return cifar_resnet(depth, plain=m.group(1) == "plain", num_classes=num_classes or 10), "cifar"


def run(args) -> int:
    device, backend = _cmd.setup(args)
    from .model_summary import receptive_field, summary

    try:
        model, variant = build_model(args.model, args.variant, args.num_classes)
    except ValueError as e:
        raise _cmd.UsageError(str(e)) from None
    size = args.image_size or (224 if variant == "imagenet" else 32)
    try:
        table = summary(model, (3, size, size), depth=args.depth)
    except ValueError as e:  # an image too small for the network's windows
        raise _cmd.UsageError(f"--image-size {size}: {e}") from None
    print(f"{args.model} ({variant} variant), input 3x{size}x{size}")
    print(table)
    result = dict(model=args.model, variant=variant, **table.as_dict(), run=_cmd.run_info(args, device, backend))
    ok = True
    if args.empirical:
        ok, result["empirical"] = _measure(model, size, table, device, backend, receptive_field)
    out = _cmd.out_dir(args)
    (out / "summary.txt").write_text(str(table) + "\n")
    _plot(table, out / "summary.png", f"{args.model} ({variant}), {size}x{size} input")
    _cmd.write_json(out / "summary.json", result)
    _cmd.finish(out, ["summary.txt", "summary.png", "summary.json"])
    return 0 if ok else 1


def _measure(model, size, table, device, backend, receptive_field):
    """Empirical receptive field of each top-level layer with a spatial output, against the analytic one."""
    rows = [r for r in table.layers if r.depth == 1 and len(r.output_shape) == 4]
    checks, ok = [], True
    bar = _cmd.progress(len(rows), "empirical RF")
    print("layer      analytic centre region (rows, cols)   measured")
    for r in rows:
        a = receptive_field(model, (3, size, size), layer=r.name)
        e = receptive_field(model, (3, size, size), layer=r.name, method="empirical", device=device,
                            backend=backend)
        same = a.centre == e.centre
        ok &= same
        checks.append(dict(layer=r.name, analytic=[list(x) for x in a.centre], measured=[list(x) for x in e.centre],
                           rf=list(a.size), agree=same))
        print(f"{r.name:<10} {str(a.centre):<38} {e.centre}  {'agree' if same else 'DIFFER'}")
        bar.update(1)
    bar.close()
    return ok, checks


def _plot(table, path, title) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in table.layers if r.rf is not None and len(r.output_shape) == 4 and r.depth == 1]
    names = [r.name for r in rows]
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    ax.plot(names, [r.rf[0] for r in rows], "o-", label="receptive field (input pixels)")
    ax.plot(names, [r.output_shape[2] for r in rows], "s-", label="output height (units)")
    ax.plot(names, [r.jump[0] if r.jump else None for r in rows], "^-", label="jump (input pixels per unit)")
    ax.axhline(table.input_size[2], color="grey", ls=":", label="input height")
    ax.set_yscale("log", base=2)
    ax.set_title(title)
    ax.set_xlabel("layer (output of)")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
