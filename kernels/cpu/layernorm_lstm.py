"""The layer-norm LSTM cell of the CPU recurrence (`recurrence`): its gate math and what it keeps.

Gate order i, f, g, o (torch's), eps = EPS added to each norm's variance:
    gates = LN_ih(W_ih x) + LN_hh(W_hh h) + b_ih + b_hh      (each LN over a row's 4H columns)
    c' = sigmoid(f) c + sigmoid(i) tanh(g),  h' = sigmoid(o) tanh(LN_c(c'))   (LN_c over H)
Each LN is (v - mean(v)) / sqrt(var(v) + eps) * gain + bias. The input side does not depend on
h, so the caller computes it for every step at once: the kernels see it in `pre`, with every
bias of the gates added (b_ih, b_hh and both sides' norm biases). A norm needs whole rows of
the recurrent product, so the input side is never fused into it (JOINT_INPUT False; the caller
never passes W_ih) and a direction's threads never split its units (SPLITS_UNITS False).

The kernels `layernorm_lstm_forward` / `_backward` are `recurrence.layer_forward` /
`layer_backward` for this cell, with (shapes there) W_ih (D, 0, 0), W_hr (D, 0, H), P = H:
    b_hh (D, 6H): the direction's constants, gain_hh (4H), gain_c (H), bias_c (H);
    pre (D, N, 4H): the input side with the biases, as above;
    gate_cache (D, N + 1, CACHE_WIDTH H + 2) out, per row n < N: the activated gates i, f, g, o
    (4H), the recurrent side normalised (4H, before its gain), c' normalised (H), then
    1 / sqrt(var + eps) of the recurrent side and of c'. Row N is the caller's: it holds the
    constants as b_hh does (the backward kernel gets no other array for them);
    cell_cache (D, N, H): c' of every row.
A cell_cache with no rows means inference: neither cache is written (gate_cache then has no
rows). Backward: d_input (D, N, 4H) the gates' pre-activation gradients (the input side's norm
output's, and the biases'); dn_recurrent (D, N, 4H) the recurrent product's (W_hh h, before its
norm: dW_hh = dn_recurrent^T h_prev); dh_total (D, N, H) dL/d LN_c(c') per row, for the cell
norm's gain and bias. The gains' and biases' gradients are sums over rows the caller takes.
"""

from __future__ import annotations

import math
import sys

from numba import njit

from ..math import sigmoid, tanh
from .common import ROW_JIT_OPTIONS, STEP_JIT_OPTIONS, consumed_row, copy_row, scalar
from .recurrence import instantiate

_STEP = STEP_JIT_OPTIONS
_ROW = ROW_JIT_OPTIONS

# The cell's traits (see `recurrence`): a norm reads a whole row of the recurrent product, and
# the gradient through W_hh (that of the product before its norm) differs from d_input.
GATES = 4
JOINT_INPUT = False
SPLITS_UNITS = False
SEPARATE_RECURRENT_GRADIENT = True

# The variance's epsilon of every norm (torch.nn.LayerNorm's default; `fastrnn.cells`).
EPS = 1e-5
# gate_cache's row width in units of H (plus two scalars): gates, recurrent side, c'.
CACHE_WIDTH = 9


@njit(**_ROW)
def row_moments(values, count, eps):
    """(mean, 1 / sqrt(variance + eps)) of values[:count], the variance biased (over count),
    in two passes (no cancellation), in values' dtype."""
    n = scalar(values, count)
    total = scalar(values, 0)
    for j in range(count):
        total += values[j]
    mean = total / n
    spread = scalar(values, 0)
    for j in range(count):
        d = values[j] - mean
        spread += d * d
    return mean, scalar(values, 1) / math.sqrt(spread / n + eps)


@njit(**_ROW)
def layernorm_lstm_forward_row(pre, rec, consts, c_row, out, cache, hidden, keep_cache, eps):
    """One row's gate math. pre (4H): the input side with every bias; rec (4H): in W_hh h,
    out the activated gates; consts (6H): gain_hh, gain_c, bias_c; c_row (H): c in, c' out;
    out (H): h'; cache (CACHE_WIDTH H + 2) out as the module docstring says, written only with
    keep_cache (a literal True or False, see `gru.gru_forward_row`)."""
    width = 4 * hidden
    mean, inv = row_moments(rec, width, eps)
    for j in range(width):
        normed = (rec[j] - mean) * inv
        if keep_cache:
            cache[width + j] = normed
        rec[j] = pre[j] + consts[j] * normed
    for j in range(hidden):
        i = sigmoid(rec[j])
        f = sigmoid(rec[hidden + j])
        g = tanh(rec[2 * hidden + j])
        rec[j] = i
        rec[hidden + j] = f
        rec[2 * hidden + j] = g
        rec[3 * hidden + j] = sigmoid(rec[3 * hidden + j])
        c_row[j] = f * c_row[j] + i * g
    mean_c, inv_c = row_moments(c_row, hidden, eps)
    for j in range(hidden):
        normed = (c_row[j] - mean_c) * inv_c
        if keep_cache:
            cache[2 * width + j] = normed
        out[j] = rec[3 * hidden + j] * tanh(consts[width + j] * normed + consts[5 * hidden + j])
    if keep_cache:
        for j in range(width):
            cache[j] = rec[j]
        cache[9 * hidden] = inv
        cache[9 * hidden + 1] = inv_c


@njit(**_ROW)
def layernorm_lstm_backward_row(
    cache, c_prev, consts, dh_row, dc_row, d_row, d_rec, dl_row, hidden, one
):
    """Backward of `layernorm_lstm_forward_row`: cache as written there, c_prev (H) = c,
    consts (6H); dh_row (H) = dL/dh'; dc_row (H): dL/dc' in, dL/dc out; out d_row (4H) the
    gates' pre-activation gradients, d_rec (4H) those of W_hh h, dl_row (H) dL/d LN_c(c')."""
    width = 4 * hidden
    inv = cache[9 * hidden]
    inv_c = cache[9 * hidden + 1]
    # through h' = o tanh(LN_c(c')), then the cell norm: dc' += inv_c (dn - mean(dn) -
    # n mean(dn n)) with dn = dl gain_c
    sum_dn = one - one
    sum_dn_n = one - one
    for j in range(hidden):
        normed = cache[2 * width + j]
        o = cache[3 * hidden + j]
        tl = tanh(consts[width + j] * normed + consts[5 * hidden + j])
        dh = dh_row[j]
        dl = dh * o * (one - tl * tl)
        dl_row[j] = dl
        d_row[3 * hidden + j] = dh * tl * o * (one - o)
        dn = dl * consts[width + j]
        sum_dn += dn
        sum_dn_n += dn * normed
    mean_dn = sum_dn / scalar(dh_row, hidden)
    mean_dn_n = sum_dn_n / scalar(dh_row, hidden)
    for j in range(hidden):
        normed = cache[2 * width + j]
        dn = dl_row[j] * consts[width + j]
        dc = dc_row[j] + inv_c * (dn - mean_dn - normed * mean_dn_n)
        i = cache[j]
        f = cache[hidden + j]
        g = cache[2 * hidden + j]
        d_row[j] = dc * g * i * (one - i)
        d_row[hidden + j] = dc * c_prev[j] * f * (one - f)
        d_row[2 * hidden + j] = dc * i * (one - g * g)
        dc_row[j] = dc * f
    # the recurrent side's norm, with dn = d_row gain_hh
    sum_dn = one - one
    sum_dn_n = one - one
    for j in range(width):
        dn = d_row[j] * consts[j]
        sum_dn += dn
        sum_dn_n += dn * cache[width + j]
    mean_dn = sum_dn / scalar(dh_row, width)
    mean_dn_n = sum_dn_n / scalar(dh_row, width)
    for j in range(width):
        dn = d_row[j] * consts[j]
        d_rec[j] = inv * (dn - mean_dn - cache[width + j] * mean_dn_n)


@njit(**_STEP)
def forward_rows(a, off, first, end, unit, end_unit, fused, variant):
    """One step's rows first..end-1 at row offset `off` (`recurrence.Forward` a): gates from
    `a.pre` and the normalised `a.recurrent`, c' into c_n, h' into h_n and y, the caches unless
    inference."""
    hidden = a.c_n.shape[1]
    keep_caches = a.cell_cache.shape[0] > 0  # no rows: inference, nothing kept for a backward
    eps = scalar(a.y, EPS)
    for r in range(first, end):
        c_row = a.c_n[r]
        out = a.h_n[r]
        if keep_caches:
            cache = a.gate_cache[off + r]
            layernorm_lstm_forward_row(
                a.pre[off + r], a.recurrent[r], a.b_hh, c_row, out, cache, hidden, True, eps
            )
            copy_row(a.cell_cache[off + r], c_row)
        else:  # no cache to write: b_hh stands in for the unused cache row
            layernorm_lstm_forward_row(
                a.pre[off + r], a.recurrent[r], a.b_hh, c_row, out, a.b_hh, hidden, False, eps
            )
        copy_row(a.y[off + r], out)


@njit(**_STEP)
def backward_rows(a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant):
    """One step's gate gradients for rows first..end-1 (`recurrence.Backward` a) from dh
    (= dh0, dL/dh'): d_input, the recurrent product's gradient (rec_grads, for the product
    with W_hh, and dn_recurrent), dh_total (dL/d LN_c(c')), dc0 (dL/dc, carried to the previous
    step); dh is left zero: all of dL/dh goes through W_hh."""
    hidden = a.c0.shape[1]
    one = scalar(a.y, 1)
    zero = scalar(a.y, 0)
    consts = a.gate_cache[a.gate_cache.shape[0] - 1]
    for r in range(first, end):
        c_prev = consumed_row(a.cell_cache, a.c0, offsets, prev, prev_rows, r)
        rec = a.rec_grads[r]
        layernorm_lstm_backward_row(
            a.gate_cache[off + r], c_prev, consts, dh[r], a.dc0[r], a.d_input[off + r], rec,
            a.dh_total[off + r], hidden, one,
        )  # fmt: skip
        copy_row(a.dn_recurrent[off + r], rec)
        row = dh[r]
        for j in range(hidden):
            row[j] = zero


# The kernels, and their twins without a parallel region for forked processes
# (`runtime.serial_twin`).
_kernels = instantiate(sys.modules[__name__])
layernorm_lstm_forward = _kernels["layernorm_lstm_forward"]
layernorm_lstm_backward = _kernels["layernorm_lstm_backward"]
layernorm_lstm_forward_serial = _kernels["layernorm_lstm_forward_serial"]
layernorm_lstm_backward_serial = _kernels["layernorm_lstm_backward_serial"]
