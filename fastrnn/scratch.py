"""Reused CPU buffers for what a forward without autograd computes and throws away.

Without autograd, a layer's gate pre-activations (and LSTM's per-step cell states) are dead as
soon as the layer returns. Fresh tensors of that size cost more than the arithmetic on them:
above glibc's mmap threshold (32 MiB at most) every allocation gets new pages from the kernel,
and touching them faults and zeroes each page. LSTM T100 B64 I256 H512 inference (a 52 MB gate
buffer) took 139-143 ms per call with fresh buffers and 114-120 ms with reused ones (the same
process with malloc's thresholds raised), against torch's 112 ms.

One buffer per (slot, dtype, inference mode or not) and Python thread, grown to the largest
request and kept until `release_scratch_buffers()`; CUDA tensors always get new ones (torch's
caching allocator already reuses device memory).
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor

_local = threading.local()
# Test hook: True fills every buffer handed out with NaN (float dtypes), so that a kernel reading
# an element it never wrote turns its result into NaN instead of passing on stale values.
POISON = False


def scratch(slot: str, shape: tuple[int, ...], like: Tensor, dtype: torch.dtype | None = None):
    """An uninitialised tensor of `shape` (like's dtype unless given, like's device) that the
    next call with the same `slot` on this thread may overwrite: only for values that are dead
    when the caller returns."""
    dtype = like.dtype if dtype is None else dtype
    if like.device.type != "cpu":
        return like.new_empty(shape, dtype=dtype)
    buffers = getattr(_local, "buffers", None)
    if buffers is None:
        buffers = _local.buffers = {}
    # A tensor made under torch.inference_mode() is an inference tensor, which must not be
    # written outside it: each mode keeps its own buffers.
    key = (slot, dtype, torch.is_inference_mode_enabled())
    entry = buffers.get(key)
    if entry is not None and entry[1] == shape:
        # The same shape as last time (every call of a training loop): the view made then
        # (slicing and viewing anew cost ~3 us a call, which shows at batch 1).
        return _poisoned(entry[2]) if POISON else entry[2]
    numel = math.prod(shape)
    buffer = entry[0] if entry is not None and entry[0].numel() >= numel else None
    if buffer is None:
        buffer = torch.empty(numel, dtype=dtype)
    view = buffer[:numel].view(shape)
    buffers[key] = (buffer, shape, view)
    return _poisoned(view) if POISON else view


def _poisoned(view: Tensor) -> Tensor:
    if view.is_floating_point():
        view.fill_(math.nan)
    return view


def release_scratch_buffers() -> None:
    """Free the calling thread's reused forward buffers (they are re-created on demand)."""
    _local.buffers = {}
