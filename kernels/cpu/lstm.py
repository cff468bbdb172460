"""The LSTM cell of the CPU recurrence (`recurrence`): its gate math and what it keeps.

Gate order i, f, g, o (torch's). With a projection (proj_size P > 0), h = (o * tanh(c)) @ W_hr^T;
without, P = H and h = o * tanh(c). The kernels `lstm_forward` / `lstm_backward` are
`recurrence.layer_forward` / `layer_backward` for this cell, with (shapes there):
    c0, c_n, dc_n, dc0 (D, B, H); b_ih (D, 4H) = b_ih + b_hh when fused; b_hh (D, 0);
    pre and gate_cache the same array (D, N, 4H): in, x @ W_ih^T + b_ih + b_hh (unfilled when
    fused); out, the activated gates i, f, g, o; cell_cache (D, N, H): c of every row.
A cell_cache with no rows (D, 0, H) means inference: neither cache is written (gate_cache keeps
its pre-activations; with no rows too when fused). Backward: d_input (D, N, 4H) are the gate
pre-activations' gradients, dn_recurrent (D, 0, H).
"""

from __future__ import annotations

import sys

from numba import njit

from ..math import sigmoid, tanh
from .common import ROW_JIT_OPTIONS, STEP_JIT_OPTIONS, consumed_row, copy_row, scalar
from .recurrence import instantiate

_STEP = STEP_JIT_OPTIONS
_ROW = ROW_JIT_OPTIONS

# The cell's traits (see `recurrence`).
GATES = 4
JOINT_INPUT = True
SPLITS_UNITS = False
SEPARATE_RECURRENT_GRADIENT = False


@njit(**_ROW)
def lstm_forward_row(gates, rec, c_row, out, hidden, keep_gates):
    """One row's gate math. gates (4H): in the input side's pre-activations (with both biases),
    out the activated gates i, f, g, o when keep_gates (inference needs none: left as they
    were); rec (4H): the recurrent products W_hh h; c_row (H): c in, c' out; out (H):
    o * tanh(c'). Callers pass keep_gates as a literal True or False, so that neither compiled
    form has a branch in the loop (see `gru.gru_forward_row`)."""
    for j in range(hidden):
        i = sigmoid(gates[j] + rec[j])
        f = sigmoid(gates[hidden + j] + rec[hidden + j])
        g = tanh(gates[2 * hidden + j] + rec[2 * hidden + j])
        o = sigmoid(gates[3 * hidden + j] + rec[3 * hidden + j])
        c = f * c_row[j] + i * g
        if keep_gates:
            gates[j] = i
            gates[hidden + j] = f
            gates[2 * hidden + j] = g
            gates[3 * hidden + j] = o
        c_row[j] = c
        out[j] = o * tanh(c)


@njit(**_ROW)
def lstm_backward_row(gates, c_row, c_prev, dh_row, dc_row, d_row, hidden, one):
    """Backward of `lstm_forward_row`: gates (4H) activated, c_row (H) = c', c_prev (H) = c,
    dh_row (H) = dL/dh'; dc_row (H): dL/dc' in, dL/dc out; d_row (4H) out: the gradients of
    the gate pre-activations."""
    for j in range(hidden):
        i = gates[j]
        f = gates[hidden + j]
        g = gates[2 * hidden + j]
        o = gates[3 * hidden + j]
        tc = tanh(c_row[j])
        dh = dh_row[j]
        dc = dc_row[j] + dh * o * (one - tc * tc)
        d_row[j] = dc * g * i * (one - i)
        d_row[hidden + j] = dc * c_prev[j] * f * (one - f)
        d_row[2 * hidden + j] = dc * i * (one - g * g)
        d_row[3 * hidden + j] = dh * tc * o * (one - o)
        dc_row[j] = dc * f


@njit(**_STEP)
def forward_rows(a, off, first, end, unit, end_unit, fused, variant):
    """One step's rows first..end-1 at row offset `off` (`recurrence.Forward` a): gates from
    the input side (fused: b_ih stands in for them) and `a.recurrent`, c and h (h_raw with a
    projection, which the skeleton applies and copies to y)."""
    hidden = a.c_n.shape[1]
    keep_caches = a.cell_cache.shape[0] > 0  # no rows: inference, nothing kept for a backward
    has_proj = a.h_raw.shape[0] > 0
    for r in range(first, end):
        c_row = a.c_n[r]
        out = a.h_raw[r] if has_proj else a.h_n[r]
        if keep_caches:
            gates = a.gate_cache[off + r]
            if fused:
                copy_row(gates, a.b_ih)
            lstm_forward_row(gates, a.recurrent[r], c_row, out, hidden, True)
            copy_row(a.cell_cache[off + r], c_row)
        else:
            gates = a.b_ih if fused else a.gate_cache[off + r]
            lstm_forward_row(gates, a.recurrent[r], c_row, out, hidden, False)
        if not has_proj:
            copy_row(a.y[off + r], out)


@njit(**_STEP)
def backward_rows(a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant):
    """One step's gate gradients for rows first..end-1 (`recurrence.Backward` a) from dh
    (dL/dh_raw, or dL/dh without projection): d_input, dc0 (dL/dc, carried to the previous
    step), and with a projection h_raw = o * tanh(c) for dW_hr."""
    hidden = a.c0.shape[1]
    one = scalar(a.y, 1)
    has_proj = a.h_raw.shape[0] > 0
    for r in range(first, end):
        gates = a.gate_cache[off + r]
        c_row = a.cell_cache[off + r]
        c_prev = consumed_row(a.cell_cache, a.c0, offsets, prev, prev_rows, r)
        lstm_backward_row(gates, c_row, c_prev, dh[r], a.dc0[r], a.d_input[off + r], hidden, one)
        if has_proj:
            raw = a.h_raw[off + r]
            for j in range(hidden):
                raw[j] = gates[3 * hidden + j] * tanh(c_row[j])


# The kernels, and their twins without a parallel region for forked processes
# (`runtime.serial_twin`).
_kernels = instantiate(sys.modules[__name__])
lstm_forward = _kernels["lstm_forward"]
lstm_backward = _kernels["lstm_backward"]
lstm_forward_serial = _kernels["lstm_forward_serial"]
lstm_backward_serial = _kernels["lstm_backward_serial"]
