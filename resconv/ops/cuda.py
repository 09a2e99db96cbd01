"""The CUDA C++ backend (``resconv._C``)."""
from __future__ import annotations

from typing import Optional

import torch


class CudaBackend:
    name = "cuda"

    def __init__(self):
        self.cause: Optional[BaseException] = None

    def unavailable_reason(self, device: torch.device, dtype: torch.dtype) -> Optional[str]:
        return "the CUDA C++ extension is not built in this version"
