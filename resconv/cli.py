"""The ``resconv`` command (also ``python -m resconv``): argument parsing and dispatch only.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)`` (adds
its parser and sets ``func``) and does the work; this file only wires them together. No
module here imports torch before a subcommand runs: ``resconv --help``, ``--version`` and
argument errors answer at once.

Errors: a bad option is reported by argparse at parse time; what a subcommand finds wrong
later (no GPU for ``--device cuda``, a backend that cannot serve the run, a missing folder or
optional dependency) raises :class:`resconv._app.UsageError`, printed here as one
``resconv <command>: error: ...`` line with exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from ._app import UsageError, configure_logging
from ._version import __version__

SUBCOMMANDS = (
    "resconv.verify",
    "resconv.train",
    "resconv.bench.cli",
    "resconv.bench.inspect_cli",
    "resconv.build_cli",
    "resconv.summary_cli",
    "resconv.demo",
    "resconv.experiments",
)


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resconv",
        description="Fused Conv2d + BatchNorm + residual + ReLU kernels for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"resconv {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more messages (debug)")
    parser.add_argument("-q", "--quiet", action="count", default=0, help="fewer messages (warnings and errors only)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(sub)
    return parser


def main(argv=None) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)
    configure_logging(args.verbose - args.quiet)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        print(f"resconv {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
