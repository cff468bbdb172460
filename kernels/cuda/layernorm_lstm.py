"""The layer-norm LSTM on the GPU, stepwise: per step the host runs the recurrent products
(cuBLAS, through torch) and launches one of these kernels for all directions of a layer.

The gate math is the CPU cell's (`kernels/cpu/layernorm_lstm`, same formulas, same cache
layout), but a norm reads a whole row, so a thread here does one row (d, b) of a step, every
unit of it, where the other cells' kernels give a thread one unit (`cells`): no row-wide
reduction across threads. Arrays (D directions, N packed rows, B batch rows, H hidden):
    rec (D, B, 4H): this step's W_hh h of each direction's active rows (in: forward);
    pre (D, N, 4H): the input side with every bias; consts (D, 6H): gain_hh, gain_c, bias_c;
    gate_cache (D, N + 1, 9H + 2), cell_cache (D, N, H), c_state (D, B, H), h_state (D, B, H),
    y (D, N, H): as the CPU kernels' (the cache's row N holds the constants);
    backward: dy (D, N, H), dh_n (D, B, H), dh_rec (D, B, H) (d_recurrent @ W_hh of the next
    processed step), dc_state (D, B, H) (dL/dc, running), d_input, d_recurrent (D, N, 4H),
    d_cell_norm (D, N, H), dh0 (D, B, H).
Computed in the storage dtype (float32 or float64; `one` is a 1 of it; a count is
float32(n) * one, as n * one would be float64 in a compiled kernel).
"""

from __future__ import annotations

import math

from numba import cuda, float32

from .common import sigmoid, step_span

_JIT = {"cache": True}


@cuda.jit(device=True)
def _row(directions, batch):
    """(d, b, in range) of this thread over (D, B) rows."""
    i = cuda.grid(1)
    return i // batch, i % batch, i < directions * batch


@cuda.jit(device=True)
def _moments(values, d, b, width, total, eps, one):
    """(mean, 1 / sqrt(variance + eps)) of values[d, b, :width], whose sum is `total`."""
    mean = total / (float32(width) * one)
    spread = one - one
    for j in range(width):
        v = values[d, b, j] - mean
        spread += v * v
    return mean, one / math.sqrt(spread / (float32(width) * one) + eps)


@cuda.jit(**_JIT)
def layernorm_lstm_step_forward(
    k, hidden, eps, batch_sizes, offsets, rec, pre, consts, gate_cache, cell_cache, c_state,
    h_state, y, one,
):  # fmt: skip
    """Step k forward: the row's gates from pre and its normalised rec, c' into c_state and
    cell_cache, h' into h_state and y, the gate cache as the module docstring says."""
    d, b, ok = _row(h_state.shape[0], h_state.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    if b >= rows:
        return
    n = off + b
    width = 4 * hidden
    total = one - one
    for j in range(width):
        total += rec[d, b, j]
    mean, inv = _moments(rec, d, b, width, total, eps, one)
    gate_cache[d, n, 9 * hidden] = inv
    for j in range(width):
        normed = (rec[d, b, j] - mean) * inv
        gate_cache[d, n, width + j] = normed
        gate_cache[d, n, j] = pre[d, n, j] + consts[d, j] * normed
    total = one - one
    for j in range(hidden):
        i = sigmoid(gate_cache[d, n, j], one)
        f = sigmoid(gate_cache[d, n, hidden + j], one)
        g = math.tanh(gate_cache[d, n, 2 * hidden + j])
        gate_cache[d, n, j] = i
        gate_cache[d, n, hidden + j] = f
        gate_cache[d, n, 2 * hidden + j] = g
        gate_cache[d, n, 3 * hidden + j] = sigmoid(gate_cache[d, n, 3 * hidden + j], one)
        c = f * c_state[d, b, j] + i * g
        c_state[d, b, j] = c
        cell_cache[d, n, j] = c
        total += c
    mean, inv = _moments(c_state, d, b, hidden, total, eps, one)
    gate_cache[d, n, 9 * hidden + 1] = inv
    for j in range(hidden):
        normed = (c_state[d, b, j] - mean) * inv
        gate_cache[d, n, 2 * width + j] = normed
        cell = consts[d, width + j] * normed + consts[d, 5 * hidden + j]
        h = gate_cache[d, n, 3 * hidden + j] * math.tanh(cell)
        h_state[d, b, j] = h
        y[d, n, j] = h


@cuda.jit(**_JIT)
def layernorm_lstm_step_backward(
    k, hidden, batch_sizes, offsets, dy, dh_n, dh_rec, c0, gate_cache, cell_cache, dc_state,
    d_input, d_recurrent, d_cell_norm, dh0, one,
):  # fmt: skip
    """Step k backward (k = -1 only hands the last carried gradients to dh0): dL/dh' of the
    row = dy plus dh_rec (from the next processed step) or dh_n (a row that ends here); then
    the gate gradients (d_input), those of W_hh h (d_recurrent), dL/d LN_c(c') (d_cell_norm)
    and dL/dc (dc_state). A row absent from step k but present in step k + 1 started there:
    its carried gradient is dL/dh0."""
    d, b, ok = _row(dh0.shape[0], dh0.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    rows_next, _ = step_span(k + 1, d, batch_sizes, offsets)
    if b >= rows:
        if b < rows_next:
            for j in range(hidden):
                dh0[d, b, j] = dh_rec[d, b, j]
        return
    n = off + b
    rows_prev, off_prev = step_span(k - 1, d, batch_sizes, offsets)
    consts = gate_cache.shape[1] - 1  # the cache's last row: gain_hh, gain_c, bias_c
    width = 4 * hidden
    zero = one - one
    inv = gate_cache[d, n, 9 * hidden]
    inv_c = gate_cache[d, n, 9 * hidden + 1]
    sum_dn = zero
    sum_dn_n = zero
    for j in range(hidden):
        carried = dh_rec[d, b, j] if b < rows_next else dh_n[d, b, j]
        dh = dy[d, n, j] + carried
        normed = gate_cache[d, n, 2 * width + j]
        o = gate_cache[d, n, 3 * hidden + j]
        tl = math.tanh(
            gate_cache[d, consts, width + j] * normed + gate_cache[d, consts, 5 * hidden + j]
        )
        dl = dh * o * (one - tl * tl)
        d_cell_norm[d, n, j] = dl
        d_input[d, n, 3 * hidden + j] = dh * tl * o * (one - o)
        dn = dl * gate_cache[d, consts, width + j]
        sum_dn += dn
        sum_dn_n += dn * normed
    mean_dn = sum_dn / (float32(hidden) * one)
    mean_dn_n = sum_dn_n / (float32(hidden) * one)
    for j in range(hidden):
        normed = gate_cache[d, n, 2 * width + j]
        dn = d_cell_norm[d, n, j] * gate_cache[d, consts, width + j]
        dc = dc_state[d, b, j] + inv_c * (dn - mean_dn - normed * mean_dn_n)
        c_prev = cell_cache[d, off_prev + b, j] if b < rows_prev else c0[d, b, j]
        i = gate_cache[d, n, j]
        f = gate_cache[d, n, hidden + j]
        g = gate_cache[d, n, 2 * hidden + j]
        d_input[d, n, j] = dc * g * i * (one - i)
        d_input[d, n, hidden + j] = dc * c_prev * f * (one - f)
        d_input[d, n, 2 * hidden + j] = dc * i * (one - g * g)
        dc_state[d, b, j] = dc * f
    sum_dn = zero
    sum_dn_n = zero
    for j in range(width):
        dn = d_input[d, n, j] * gate_cache[d, consts, j]
        sum_dn += dn
        sum_dn_n += dn * gate_cache[d, n, width + j]
    mean_dn = sum_dn / (float32(width) * one)
    mean_dn_n = sum_dn_n / (float32(width) * one)
    for j in range(width):
        dn = d_input[d, n, j] * gate_cache[d, consts, j]
        d_recurrent[d, n, j] = inv * (dn - mean_dn - gate_cache[d, n, width + j] * mean_dn_n)
