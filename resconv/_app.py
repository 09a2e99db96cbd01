"""What every ``resconv`` subcommand shares: argument types, the one rule for device and
backend, output folders, optional dependencies, and the error every bad option gets.

Nothing here imports torch at module level: ``resconv --help`` and argument errors must not
wait for it.

The rule for device and backend (every command): never fall back silently. ``--device auto``
is the GPU when one is usable, else the CPU; ``--device cuda`` without a usable GPU is an
error. ``--backend auto`` is resolved once, for the run's device and dtype, and the command
prints what it resolved to (``backend=auto -> torch (no GPU)``); a forced backend that cannot
serve the run is an error naming the option and the reason.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import logging
import os
import sys
from pathlib import Path
from typing import Optional

LOG = logging.getLogger("resconv")
BACKEND_CHOICES = ("auto", "cuda", "triton", "torch")
DEVICE_CHOICES = ("auto", "cpu", "cuda")
RESULTS_DIR = Path("resconv-results")  # relative to the working directory, never the package
# Optional dependencies: import name -> the extra of resconv that installs it.
EXTRAS = {"skimage": "data", "sklearn": "data", "matplotlib": "bench", "torchvision": "learn"}
PIP_NAMES = {"skimage": "scikit-image", "sklearn": "scikit-learn"}


class UsageError(Exception):
    """A bad option or environment found after parsing: ``resconv <cmd>: error: <message>``, exit 2."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown in every option's help; descriptions and epilogs printed as written."""


# ------------------------------------------------------------------------------------------
# argument types (argparse calls them: a bad value is a usage error at parse time)
# ------------------------------------------------------------------------------------------
def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive finite number, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a non-negative finite number, got {text}")
    return value


def existing_dir(text: str) -> Path:
    p = Path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return p


def existing_file(text: str) -> Path:
    p = Path(text)
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    return p


def add_device_backend(p: argparse.ArgumentParser, *, backend_help: str = "resconv backend") -> None:
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto",
                   help="where to run (auto: the GPU when one is usable, else the CPU; never a silent fallback)")
    p.add_argument("--backend", choices=BACKEND_CHOICES, default=None,
                   help=f"{backend_help} (default: $RESCONV_BACKEND, else auto: the first of cuda, triton, torch "
                        "that can serve the run; on the CPU, torch)")


def add_out(p: argparse.ArgumentParser, command: str) -> None:
    p.add_argument("--out", type=Path, metavar="DIR", default=None,
                   help=f"result folder (default: ./{RESULTS_DIR}/{command}/<date>/ in the working directory)")


# ------------------------------------------------------------------------------------------
# device, backend, output
# ------------------------------------------------------------------------------------------
def cuda_driver_present() -> bool:
    """Whether an NVIDIA driver library exists (no CUDA query: cheap, and safe before the
    Triton interpreter mode is decided)."""
    import ctypes.util

    return ctypes.util.find_library("cuda") is not None


def prepare_device(requested: str, *, triton_may_run: bool) -> str:
    """'cpu' or 'cuda' for ``--device``; raises UsageError for ``cuda`` without a usable GPU.

    On the CPU with ``triton_may_run``, sets ``TRITON_INTERPRET=1`` before anything imports
    triton (the Triton kernels then run in its interpreter). Imports torch only to ask
    whether a GPU is usable when a driver exists.
    """
    if requested == "cpu":
        device = "cpu"
    elif requested in ("auto", "cuda"):
        usable = False
        if cuda_driver_present():
            import torch

            usable = torch.cuda.is_available()
        if requested == "cuda" and not usable:
            raise UsageError("--device cuda: no usable CUDA GPU on this machine (use --device cpu or auto)")
        device = "cuda" if usable else "cpu"
    else:
        raise UsageError(f"--device: expected one of {DEVICE_CHOICES}, got {requested!r}")
    if device == "cpu" and triton_may_run and "TRITON_INTERPRET" not in os.environ:
        os.environ["TRITON_INTERPRET"] = "1"
    return device


def requested_backend(option: Optional[str]) -> tuple[str, str]:
    """(name, where it came from) of the backend a command was asked for: ``--backend`` when
    given, else ``RESCONV_BACKEND`` (UsageError naming it when it names no backend), else auto."""
    if option is not None:
        return option, "--backend"
    from .functional import BACKEND_ENV, env_backend

    try:
        name = env_backend()
    except ValueError as e:
        raise UsageError(str(e)) from None
    return name, (BACKEND_ENV if os.environ.get(BACKEND_ENV, "").strip() else "default")


def resolve_backend(option: Optional[str], device: str, dtype) -> tuple[str, str]:
    """(backend name, the line that says what it resolved to) for ``--backend`` (or its
    default) on the run's device and dtype. Raises UsageError when a forced backend cannot
    serve it, naming the option or the environment variable that forced it."""
    import torch

    from .functional import BackendUnavailableError, select_backend

    requested, source = requested_backend(option)
    probe = torch.empty(0, device=device, dtype=dtype)
    if requested == "auto":
        backend = select_backend("auto", probe).name
        why = "no GPU" if device == "cpu" else f"{device}, {str(dtype).replace('torch.', '')}"
        return backend, f"backend=auto -> {backend} ({why})"
    try:
        select_backend(requested, probe)
    except BackendUnavailableError as e:
        where = f"--backend {requested}" if source == "--backend" else f"{source}={requested}"
        raise UsageError(f"{where}: {e}") from None
    return requested, f"backend={requested}" + (f" (from {source})" if source != "--backend" else "")


def dated_folder(base: Path) -> Path:
    """<base>/<date>/ (with a time suffix when that folder holds results already)."""
    date = _dt.date.today().isoformat()
    out = base / date
    if out.exists() and any(out.iterdir()):
        out = base / (date + _dt.datetime.now().strftime("_%H%M%S"))
    return out


def default_out(command: str, *parts: str) -> Path:
    """./resconv-results/<command>/<parts...>/<date>/ in the working directory."""
    return dated_folder(RESULTS_DIR.joinpath(command, *parts))


def require(*modules: str, what: str) -> None:
    """UsageError naming the pip command when an optional dependency is missing."""
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        pkgs = " ".join(PIP_NAMES.get(m, m) for m in missing)
        extras = sorted({EXTRAS[m] for m in missing if m in EXTRAS})
        hint = f'pip install "resconv[{",".join(extras)}]"' if extras else f"pip install {pkgs}"
        raise UsageError(f"{what} needs {pkgs}, which is not installed: {hint} (or pip install {pkgs})")


# ------------------------------------------------------------------------------------------
# logging
# ------------------------------------------------------------------------------------------
def configure_logging(verbosity: int) -> None:
    """The CLI's logging: resconv's messages on stderr (-q: warnings only, -v: debug)."""
    level = logging.INFO if verbosity == 0 else (logging.WARNING if verbosity < 0 else logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("resconv: %(message)s"))
    LOG.handlers[:] = [handler]
    LOG.setLevel(level)
    LOG.propagate = False
