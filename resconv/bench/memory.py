"""Saved-for-backward memory: what a training forward keeps alive for its backward.

Measured with ``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves
passes through the pack hook, which records its storage. Storages are counted once (a
tensor saved twice, or two views of one storage, cost one storage), and the storages of
parameters are left out (they are alive anyway). Inputs saved by the conv (needed by its
wgrad) count, on both sides alike.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch


def saved_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> tuple[int, int]:
    """Run ``forward()`` recording the tensors autograd saves.

    Args:
        forward: runs one training forward (grad mode on).
        exclude: tensors whose storages are not counted (the parameters).
    Returns:
        (bytes, number of distinct storages) saved for backward.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude if t is not None}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        ptr = st.data_ptr()
        if ptr and ptr not in skip and ptr not in seen:
            seen[ptr] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.enable_grad():
            out = forward()
    del out
    return sum(seen.values()), len(seen)
