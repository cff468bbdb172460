"""The Elman RNN cell with recurrent dropout and zoneout (`recurrence`'s masks): kernels
`rnn_masked_forward` / `rnn_masked_backward`, whose arguments are `rnn`'s plus the masks
(h_mask (D, B, H), zone_h (D, N, H), zone_c (D, N, 0)), and with zoneout a gate_cache
(D, N, H) that keeps h_new = act(pre) of every row for a backward (with no rows in inference):
y then holds the zoned-out states, from which act' can't be read.
"""

from __future__ import annotations

import sys

from numba import njit

from .common import STEP_JIT_OPTIONS, copy_row, scalar
from .recurrence import instantiate
from .rnn import (
    GATES,
    JOINT_INPUT,
    SEPARATE_RECURRENT_GRADIENT,
    SPLITS_UNITS,
    rnn_backward_row,
    rnn_forward_row,
)

__all__ = ["GATES", "JOINT_INPUT", "SEPARATE_RECURRENT_GRADIENT", "SPLITS_UNITS"]

MASKED = True
_STEP = STEP_JIT_OPTIONS


@njit(**_STEP)
def forward_rows(a, off, first, end, unit, end_unit, fused, variant):
    """`rnn.forward_rows`, keeping h_new in gate_cache when it has rows."""
    zero = scalar(a.y, 0)
    units = end_unit - unit
    keep = a.gate_cache.shape[0] > 0
    for r in range(first, end):
        out = a.y[off + r, unit:end_unit]
        if fused:
            copy_row(out, a.b_ih[unit:end_unit])
        rnn_forward_row(out, a.recurrent[r, unit:end_unit], units, variant, zero)
        copy_row(a.h_n[r, unit:end_unit], out)
        if keep:
            copy_row(a.gate_cache[off + r, unit:end_unit], out)


@njit(**_STEP)
def backward_rows(a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant):
    """`rnn.backward_rows`, reading h_new from gate_cache when it has rows (zoneout), else
    from y."""
    one = scalar(a.y, 1)
    zero = scalar(a.y, 0)
    units = end_unit - unit
    kept = a.gate_cache.shape[0] > 0
    for r in range(first, end):
        h_new = a.gate_cache[off + r, unit:end_unit] if kept else a.y[off + r, unit:end_unit]
        rnn_backward_row(
            h_new, dh[r, unit:end_unit], a.d_input[off + r, unit:end_unit], units, variant, one,
            zero,
        )  # fmt: skip


_kernels = instantiate(sys.modules[__name__])
rnn_masked_forward = _kernels["rnn_masked_forward"]
rnn_masked_backward = _kernels["rnn_masked_backward"]
rnn_masked_forward_serial = _kernels["rnn_masked_forward_serial"]
rnn_masked_backward_serial = _kernels["rnn_masked_backward_serial"]
