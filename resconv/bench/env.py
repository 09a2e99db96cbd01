"""What a result was measured on: device, driver and library versions, the exact command;
and the names of result folders."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

import torch


def _run(cmd: list[str]) -> Optional[str]:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        return out or None
    except Exception:  # not installed, no permission, no GPU: the field stays empty
        return None


def _driver_version() -> Optional[str]:
    try:
        import pynvml  # nvidia-ml-py

        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else v
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        out = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        return out.splitlines()[0].strip() if out else None


def _git_commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    return _run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"])


def collect(device: torch.device) -> dict:
    """Environment record for the results (JSON-serialisable)."""
    from .._version import __version__

    try:
        import triton

        triton_version = triton.__version__
    except Exception as e:  # the suite still runs without Triton (torch providers)
        triton_version = f"unavailable ({e})"
    now = _dt.datetime.now().astimezone()
    info = dict(
        date=now.isoformat(timespec="seconds"),
        command=command_line(),
        python=platform.python_version(),
        platform=platform.platform(),
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        torch=torch.__version__,
        triton=triton_version,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        resconv=__version__,
        git_commit=_git_commit(),
        triton_interpret=os.environ.get("TRITON_INTERPRET", "0") == "1",
        device=str(device),
    )
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=p.name, driver=_driver_version(), capability=f"{p.major}.{p.minor}", sm_count=p.multi_processor_count,
            l2_bytes=int(p.L2_cache_size), gpu_memory_bytes=int(p.total_memory),
            nvidia_smi=_run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                             "power.limit,temperature.gpu,pstate", "--format=csv"]),
        )
    else:
        info.update(gpu=None, driver=None)
    return info


def slug(text: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'nvidia-h100-80gb-hbm3' (folder names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def command_line() -> str:
    """The command as the user typed it: ``resconv bench ...`` or ``python -m resconv bench ...``
    (a run that re-executed itself under TRITON_INTERPRET=1 records the original)."""
    recorded = os.environ.get("RESCONV_BENCH_COMMAND")
    if recorded:
        return recorded
    argv = list(sys.argv) or ["?"]
    if argv[0].endswith("__main__.py"):
        argv = ["python", "-m", "resconv"] + argv[1:]
    else:
        argv[0] = os.path.basename(argv[0])
    return shlex.join(argv)
