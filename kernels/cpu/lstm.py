"""LSTM, one layer and one direction over a whole (packed) sequence, forward and backward.

Gate order i, f, g, o (torch's). With a projection (proj_size P > 0), h = (o * tanh(c)) @ W_hr^T;
without, P = H and h = o * tanh(c).

Shapes (rows in the packed time-major layout of `common`, N = sum(batch_sizes), B = batch_sizes[0]):
    x (N, I); W_ih (4H, I); W_hh (4H, P); bias (4H,) = b_ih + b_hh (zeros without bias);
    W_hr (P, H) or (0, H) without projection; h0 (B, P); c0 (B, H);
    y (N, P); h_n (B, P); c_n (B, H);
    gate_cache (N, 4H): activated gates i, f, g, o of every row; cell_cache (N, H): c of every row.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..math import sigmoid, tanh
from .common import (
    accumulate_matmul_tn,
    column_sums,
    gather_previous_hidden,
    input_projection,
    matmul_into,
    previous_step_rows,
    step_offsets,
    step_time,
)

_JIT = {"cache": True, "error_model": "numpy", "nogil": True}


@njit(**_JIT)
def lstm_forward(
    x, batch_sizes, reverse, W_ih, W_hh, bias, W_hr, h0, c0, y, h_n, c_n, gate_cache, cell_cache
):
    """Run the recurrence, filling y, h_n, c_n and the caches backward needs."""
    num_steps = batch_sizes.shape[0]
    hidden = c0.shape[1]
    has_proj = W_hr.shape[0] > 0
    offsets = step_offsets(batch_sizes)
    input_projection(x, W_ih, gate_cache)
    h_n[:] = h0
    c_n[:] = c0
    recurrent = np.empty((h0.shape[0], 4 * hidden), dtype=x.dtype)
    h_raw = np.empty((h0.shape[0], hidden), dtype=x.dtype)
    for k in range(num_steps):
        t = step_time(k, num_steps, reverse)
        rows = batch_sizes[t]
        off = offsets[t]
        matmul_into(h_n[:rows], W_hh.T, recurrent[:rows])
        for r in range(rows):
            g_row = gate_cache[off + r]
            rec = recurrent[r]
            c_row = c_n[r]
            out = h_raw[r] if has_proj else h_n[r]
            for j in range(hidden):
                i = sigmoid(g_row[j] + rec[j] + bias[j])
                f = sigmoid(g_row[hidden + j] + rec[hidden + j] + bias[hidden + j])
                g = tanh(g_row[2 * hidden + j] + rec[2 * hidden + j] + bias[2 * hidden + j])
                o = sigmoid(g_row[3 * hidden + j] + rec[3 * hidden + j] + bias[3 * hidden + j])
                c = f * c_row[j] + i * g
                g_row[j] = i
                g_row[hidden + j] = f
                g_row[2 * hidden + j] = g
                g_row[3 * hidden + j] = o
                c_row[j] = c
                out[j] = o * tanh(c)
        cell_cache[off : off + rows] = c_n[:rows]
        if has_proj:
            matmul_into(h_raw[:rows], W_hr.T, h_n[:rows])
        y[off : off + rows] = h_n[:rows]


@njit(**_JIT)
def lstm_backward(
    x,
    batch_sizes,
    reverse,
    W_ih,
    W_hh,
    W_hr,
    h0,
    c0,
    y,
    gate_cache,
    cell_cache,
    dy,
    dh_n,
    dc_n,
    dx,
    dh0,
    dc0,
    dW_ih,
    dW_hh,
    dbias,
    dW_hr,
    need_dx,
):
    """Backward of `lstm_forward`: fills dx (if need_dx), dh0, dc0 and adds into dW_ih, dW_hh,
    dbias (4H,) and dW_hr. dy (N, P), dh_n (B, P), dc_n (B, H) are the incoming gradients."""
    num_steps = batch_sizes.shape[0]
    hidden = c0.shape[1]
    proj = h0.shape[1]
    has_proj = W_hr.shape[0] > 0
    n_rows = x.shape[0]
    one = np.ones(1, dtype=x.dtype)[0]
    offsets = step_offsets(batch_sizes)
    d_gates = np.empty((n_rows, 4 * hidden), dtype=x.dtype)
    if has_proj:
        dh_total = np.empty((n_rows, proj), dtype=x.dtype)
        h_raw_all = np.empty((n_rows, hidden), dtype=x.dtype)
    else:
        dh_total = np.empty((0, proj), dtype=x.dtype)
        h_raw_all = np.empty((0, hidden), dtype=x.dtype)
    dh0[:] = dh_n
    dc0[:] = dc_n
    dh_raw = np.empty((h0.shape[0], hidden), dtype=x.dtype)
    for k in range(num_steps - 1, -1, -1):
        t = step_time(k, num_steps, reverse)
        rows = batch_sizes[t]
        off = offsets[t]
        prev, prev_rows = previous_step_rows(t, batch_sizes, reverse)
        # dh0 holds dL/dh of each row's latest state; add this step's output gradient.
        dh0[:rows] += dy[off : off + rows]
        if has_proj:
            dh_total[off : off + rows] = dh0[:rows]
            matmul_into(dh0[:rows], W_hr, dh_raw[:rows])
        else:
            dh_raw[:rows] = dh0[:rows]
        for r in range(rows):
            gates = gate_cache[off + r]
            dg_row = d_gates[off + r]
            c_row = cell_cache[off + r]
            c_prev = cell_cache[offsets[prev] + r] if r < prev_rows else c0[r]
            dc_row = dc0[r]
            dh_row = dh_raw[r]
            for j in range(hidden):
                i = gates[j]
                f = gates[hidden + j]
                g = gates[2 * hidden + j]
                o = gates[3 * hidden + j]
                tc = tanh(c_row[j])
                dh = dh_row[j]
                dc = dc_row[j] + dh * o * (one - tc * tc)
                dg_row[j] = dc * g * i * (one - i)
                dg_row[hidden + j] = dc * c_prev[j] * f * (one - f)
                dg_row[2 * hidden + j] = dc * i * (one - g * g)
                dg_row[3 * hidden + j] = dh * tc * o * (one - o)
                dc_row[j] = dc * f
            if has_proj:
                h_raw_row = h_raw_all[off + r]
                for j in range(hidden):
                    h_raw_row[j] = gates[3 * hidden + j] * tanh(c_row[j])
        matmul_into(d_gates[off : off + rows], W_hh, dh0[:rows])

    h_prev = np.empty((n_rows, proj), dtype=x.dtype)
    gather_previous_hidden(y, h0, batch_sizes, offsets, reverse, h_prev)
    accumulate_matmul_tn(d_gates, x, dW_ih)
    accumulate_matmul_tn(d_gates, h_prev, dW_hh)
    column_sums(d_gates, dbias)
    if has_proj:
        accumulate_matmul_tn(dh_total, h_raw_all, dW_hr)
    if need_dx:
        matmul_into(d_gates, W_ih, dx)
