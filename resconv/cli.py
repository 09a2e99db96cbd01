"""The ``resconv`` command (also ``python -m resconv``): argument parsing and dispatch only.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)`` (adds
its parser and sets ``func``) and does the work; this file only wires them together.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# (module, what it adds). Imported lazily: `resconv --help` must not import torch kernels.
SUBCOMMANDS = (
    "resconv.verify",
    "resconv.train",
    "resconv.bench.cli",
    "resconv.bench.inspect_cli",
    "resconv.build",
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resconv",
        description="Fused Conv2d + BatchNorm + residual + ReLU kernels for PyTorch.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real import error inside the module
                raise
            continue
        mod.add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
