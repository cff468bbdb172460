"""Elman RNN recurrence, one layer and one direction over a whole sequence.

    h' = act(W_ih x + b_ih + W_hh h + b_hh),  act = tanh (relu=False) or relu (relu=True)
The kernels `rnn_forward` / `rnn_backward` are `recurrence.layer_forward` / `layer_backward`
for this cell, with variant = relu and (shapes there): c0, c_n, dc_n, dc0 (D, B, 0); pre and y
the same array (D, N, H): in, x @ W_ih^T + b_ih + b_hh (unfilled when fused, with b_ih (D, H) =
b_ih + b_hh); out, the hidden states (all backward needs); b_hh (D, 0); gate_cache and
cell_cache (D, 0, 0). Backward: d_input (D, N, H), the pre-activation's gradient;
dn_recurrent (D, 0, H). A direction's threads split its hidden units (`shared_product`).
"""

from __future__ import annotations

import sys

from numba import njit

from ..math import tanh
from .common import ROW_JIT_OPTIONS, STEP_JIT_OPTIONS, copy_row, scalar
from .recurrence import instantiate

_STEP = STEP_JIT_OPTIONS
_ROW = ROW_JIT_OPTIONS

# The cell's traits (see `recurrence`).
GATES = 1
JOINT_INPUT = True
SPLITS_UNITS = True
SEPARATE_RECURRENT_GRADIENT = False


@njit(**_ROW)
def rnn_forward_row(out, rec, hidden, relu, zero):
    """One row: out (H) in the input side's pre-activation (with both biases), out h' =
    act(out + rec); rec (H) = W_hh h."""
    if relu:
        for j in range(hidden):
            pre = out[j] + rec[j]
            # max() would turn NaN into 0; torch's relu keeps it.
            out[j] = pre if (pre > zero or pre != pre) else zero
    else:
        for j in range(hidden):
            out[j] = tanh(out[j] + rec[j])


@njit(**_ROW)
def rnn_backward_row(h_out, dh_row, d_pre, hidden, relu, one, zero):
    """Backward of `rnn_forward_row`: h_out (H) = h', dh_row (H) = dL/dh'; d_pre (H) out."""
    if relu:
        for j in range(hidden):
            d_pre[j] = dh_row[j] if h_out[j] > zero else zero
    else:
        for j in range(hidden):
            h = h_out[j]
            d_pre[j] = dh_row[j] * (one - h * h)


@njit(**_STEP)
def forward_rows(a, off, first, end, unit, end_unit, fused, variant):
    """One step's rows first..end-1 at row offset `off` (`recurrence.Forward` a), units
    unit..end_unit-1: y's rows (fused: from b_ih) + `a.recurrent` -> act, in place; h_n gets
    them too. variant: relu."""
    zero = scalar(a.y, 0)
    units = end_unit - unit
    for r in range(first, end):
        out = a.y[off + r, unit:end_unit]
        if fused:
            copy_row(out, a.b_ih[unit:end_unit])
        rnn_forward_row(out, a.recurrent[r, unit:end_unit], units, variant, zero)
        copy_row(a.h_n[r, unit:end_unit], out)


@njit(**_STEP)
def backward_rows(a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant):
    """One step's pre-activation gradients for rows first..end-1 (`recurrence.Backward` a),
    units unit..end_unit-1, from dh (= dh0, dL/dh'), into d_input. variant: relu."""
    one = scalar(a.y, 1)
    zero = scalar(a.y, 0)
    units = end_unit - unit
    for r in range(first, end):
        rnn_backward_row(
            a.y[off + r, unit:end_unit], dh[r, unit:end_unit], a.d_input[off + r, unit:end_unit],
            units, variant, one, zero,
        )  # fmt: skip


# The kernels, and their twins without a parallel region for forked processes
# (`runtime.serial_twin`).
_kernels = instantiate(sys.modules[__name__])
rnn_forward = _kernels["rnn_forward"]
rnn_backward = _kernels["rnn_backward"]
rnn_forward_serial = _kernels["rnn_forward_serial"]
rnn_backward_serial = _kernels["rnn_backward_serial"]
