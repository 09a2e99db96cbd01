"""What the result-writing commands (summary, demo, experiment) add to :mod:`resconv._app`:
their common options, the device and backend resolved and printed once, the output folder,
JSON and the progress bar. Problems raise :class:`resconv._app.UsageError` (one ``error:``
line, exit code 2)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from ._app import HelpFormatter, UsageError, add_device_backend, add_out, default_out, prepare_device, require, \
    requested_backend, resolve_backend

__all__ = ["HelpFormatter", "UsageError", "add_common", "setup", "set_backend", "out_dir", "write_json", "run_info",
           "progress", "finish"]


def add_common(p, command: str) -> None:
    """``--out``, ``--device``, ``--backend`` for ``resconv <command>`` (e.g. 'demo filters')."""
    add_out(p, "/".join(command.split()))
    add_device_backend(p)
    p.set_defaults(command_name=command)


def setup(args, dtype: str = "float32", needs=("matplotlib",)):
    """Check the optional dependencies, resolve ``--device`` and ``--backend`` for tensors of
    ``dtype`` (a torch dtype's name) and print what they resolved to. Returns (torch.device,
    backend name)."""
    require(*needs, what=f"resconv {args.command_name}")
    device = prepare_device(args.device, triton_may_run=requested_backend(args.backend)[0] == "triton")
    import torch

    backend, line = resolve_backend(args.backend, device, getattr(torch, dtype))
    print(f"resconv {args.command_name}: device={device}, {line}")
    return torch.device(device), backend


def set_backend(model, backend: str):
    """Give every resconv module of ``model`` the resolved backend; returns ``model``."""
    for m in model.modules():
        if hasattr(m, "backend"):
            m.backend = backend
    return model


def out_dir(args) -> Path:
    """The results folder (created): ``--out``, else ./resconv-results/<command>/<date>/."""
    path = Path(args.out) if args.out else default_out(*args.command_name.split())
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def run_info(args, device, backend) -> dict:
    """The run's settings for its JSON: the arguments and where it ran."""
    import datetime
    import platform

    import torch

    return dict(args={k: v for k, v in vars(args).items() if k not in ("func", "command_name")},
                device=str(device), backend=backend, torch=torch.__version__, machine=platform.machine(),
                threads=torch.get_num_threads(), date=datetime.date.today().isoformat())


def progress(total: int, desc: str):
    """A tqdm bar on stderr (tqdm's ``disable=None``: shown on a terminal only)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None, dynamic_ncols=True)


def finish(out: Path, files: list[str]) -> None:
    for f in files:
        print(f"wrote {out / f}")
