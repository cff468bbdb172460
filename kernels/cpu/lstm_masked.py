"""The LSTM cell with recurrent dropout and zoneout (`recurrence`'s masks): kernels
`lstm_masked_forward` / `lstm_masked_backward`, whose arguments are `lstm`'s plus the masks
(h_mask (D, B, P), zone_h (D, N, P), zone_c (D, N, H)).

The skeleton applies the recurrent dropout and the zoneout of h; this cell's hooks add the
zoneout of c: c' = zone_c * c + (1 - zone_c) * c_new with c_new = f * c + i * g, while
h_new = o * tanh(c_new) reads the cell before zoneout (Krueger et al. 2016). The cell cache
keeps c' (the state the next step reads); backward recomputes c_new from the cached gates and
the previous c', into scratch.
"""

from __future__ import annotations

import sys

from numba import njit

from ..math import tanh
from .common import STEP_JIT_OPTIONS, add_row, consumed_row, copy_row, scalar
from .lstm import (
    GATES,
    JOINT_INPUT,
    SEPARATE_RECURRENT_GRADIENT,
    SPLITS_UNITS,
    lstm_backward_row,
    lstm_forward_row,
)
from .recurrence import instantiate

__all__ = ["GATES", "JOINT_INPUT", "SEPARATE_RECURRENT_GRADIENT", "SPLITS_UNITS"]

MASKED = True
_STEP = STEP_JIT_OPTIONS


@njit(**_STEP)
def forward_rows(a, off, first, end, unit, end_unit, fused, variant):
    """`lstm.forward_rows`, with c zoned out after the gate math (zone_c with rows): c_n and
    the cell cache get c'."""
    hidden = a.c_n.shape[1]
    keep_caches = a.cell_cache.shape[0] > 0
    has_proj = a.h_raw.shape[0] > 0
    zoned = a.zone_c.shape[0] > 0
    one = scalar(a.y, 1)
    for r in range(first, end):
        c_row = a.c_n[r]
        out = a.h_raw[r] if has_proj else a.h_n[r]
        if zoned:
            copy_row(a.c_keep[r], c_row)
        if keep_caches:
            gates = a.gate_cache[off + r]
            if fused:
                copy_row(gates, a.b_ih)
            lstm_forward_row(gates, a.recurrent[r], c_row, out, hidden, True)
        else:
            gates = a.b_ih if fused else a.gate_cache[off + r]
            lstm_forward_row(gates, a.recurrent[r], c_row, out, hidden, False)
        if zoned:
            kept, zone = a.c_keep[r], a.zone_c[off + r]
            for j in range(hidden):
                c_row[j] = zone[j] * kept[j] + (one - zone[j]) * c_row[j]
        if keep_caches:
            copy_row(a.cell_cache[off + r], c_row)
        if not has_proj:
            copy_row(a.y[off + r], out)


@njit(**_STEP)
def backward_rows(a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant):
    """`lstm.backward_rows` through c's zoneout: dL/dc_new = (1 - zone_c) dL/dc', and
    zone_c dL/dc' passes to the previous c as it is."""
    hidden = a.c0.shape[1]
    one = scalar(a.y, 1)
    has_proj = a.h_raw.shape[0] > 0
    zoned = a.zone_c.shape[0] > 0
    for r in range(first, end):
        gates = a.gate_cache[off + r]
        c_prev = consumed_row(a.cell_cache, a.c0, offsets, prev, prev_rows, r)
        dc_row = a.dc0[r]
        if zoned:
            c_row = a.c_new[r]
            skip, zone = a.c_skip[r], a.zone_c[off + r]
            for j in range(hidden):
                c_row[j] = gates[hidden + j] * c_prev[j] + gates[j] * gates[2 * hidden + j]
                skip[j] = zone[j] * dc_row[j]
                dc_row[j] = (one - zone[j]) * dc_row[j]
        else:
            c_row = a.cell_cache[off + r]
        lstm_backward_row(gates, c_row, c_prev, dh[r], dc_row, a.d_input[off + r], hidden, one)
        if zoned:
            add_row(dc_row, a.c_skip[r])
        if has_proj:
            raw = a.h_raw[off + r]
            for j in range(hidden):
                raw[j] = gates[3 * hidden + j] * tanh(c_row[j])


_kernels = instantiate(sys.modules[__name__])
lstm_masked_forward = _kernels["lstm_masked_forward"]
lstm_masked_backward = _kernels["lstm_masked_backward"]
lstm_masked_forward_serial = _kernels["lstm_masked_forward_serial"]
lstm_masked_backward_serial = _kernels["lstm_masked_backward_serial"]
