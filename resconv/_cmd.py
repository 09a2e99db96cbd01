"""What the result-writing commands (summary, demo, experiment) share: the ``--out``,
``--device`` and ``--backend`` options and their checks, the output folder, JSON, the
progress bar.

The checks run before torch or any kernel is imported: on a CPU, ``--backend triton`` runs
the Triton kernels in Triton's interpreter, which ``TRITON_INTERPRET=1`` must select before
they are first imported. A request that cannot be served is refused (``error: ...``, exit
code 2); nothing falls back silently.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path

BACKENDS = ("auto", "torch", "triton", "cuda")


def add_common(p: argparse.ArgumentParser, command: str) -> None:
    """``--out``, ``--device``, ``--backend`` for ``resconv <command>``."""
    p.add_argument("--out", metavar="DIR", default=None,
                   help=f"folder for the results (default: ./resconv-results/{command.replace(' ', '-')}/<date>/)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where to compute (auto: cuda when a GPU is usable, else cpu)")
    p.add_argument("--backend", choices=BACKENDS, default="auto",
                   help="resconv backend (auto: cuda, then triton, then torch, the first that serves the device)")
    p.set_defaults(command_name=command)


def formatter(prog):
    """--help shows every default."""
    return argparse.ArgumentDefaultsHelpFormatter(prog, max_help_position=36)


def error(args, message: str) -> int:
    """Print ``resconv <command>: error: <message>`` (one line) and return exit code 2."""
    print(f"resconv {args.command_name}: error: {message}", file=sys.stderr)
    return 2


def setup(args):
    """Resolve ``--device`` and check ``--backend`` for it. Returns (torch.device, None), or
    (None, 2) after printing the error."""
    import ctypes.util

    device = args.device
    if device == "auto":
        device = "cpu" if ctypes.util.find_library("cuda") is None else "cuda"
    if device == "cpu" and args.backend == "triton" and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are first imported
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        if args.device == "cuda":
            return None, error(args, "--device cuda: no CUDA GPU is usable here (torch.cuda.is_available() is False)")
        device = "cpu"
    if args.backend != "auto":
        import resconv.functional as RF

        why = RF.unavailable_reason(args.backend, device, torch.float32)
        if why is not None:
            return None, error(args, f"--backend {args.backend}: backend {args.backend!r} cannot run on {device}: {why}")
    return torch.device(device), None


def backend_name(args):
    """The ``backend`` attribute for resconv modules: None for auto."""
    return None if args.backend == "auto" else args.backend


def set_backend(model, args):
    """Give every resconv module of ``model`` the chosen backend; returns ``model``."""
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend_name(args)
    return model


def out_dir(args) -> Path:
    """The results folder (created): ``--out``, else ./resconv-results/<command>/<date>/."""
    path = Path(args.out) if args.out else (Path("resconv-results") / args.command_name.replace(" ", "-")
                                            / datetime.date.today().isoformat())
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def run_info(args, device) -> dict:
    """The run's settings for its JSON: the arguments and where it ran."""
    import platform

    import torch

    return dict(args={k: v for k, v in vars(args).items() if k not in ("func", "command_name")},
                device=str(device), torch=torch.__version__, machine=platform.machine(),
                threads=torch.get_num_threads(), date=datetime.date.today().isoformat())


def progress(total: int, desc: str):
    """A tqdm bar on stderr (tqdm's ``disable=None``: shown on a terminal only)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None, dynamic_ncols=True)


def finish(out: Path, files: list[str]) -> None:
    for f in files:
        print(f"wrote {out / f}")
