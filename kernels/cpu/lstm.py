"""LSTM recurrence, one layer and one direction over a whole (packed) sequence.

Gate order i, f, g, o (torch's). With a projection (proj_size P > 0), h = (o * tanh(c)) @ W_hr^T;
without, P = H and h = o * tanh(c). The GEMMs over all steps (input projection before, weight and
input gradients after) are the caller's; these kernels run the per-step part.

Shapes (rows in the packed time-major layout of `common`, N = sum(batch_sizes), B = batch_sizes[0]):
    W_hh (4H, P); W_hr (P, H), or (0, H) without projection; h0 (B, P); c0 (B, H);
    y (N, P); h_n (B, P); c_n (B, H);
    gate_cache (N, 4H): in: x @ W_ih^T + b_ih + b_hh; out: activated gates i, f, g, o;
    cell_cache (N, H): c of every row.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..math import sigmoid, tanh
from .common import (
    chunk_count,
    chunk_rows,
    copy_previous_hidden,
    matmul_weights_t,
    previous_step_rows,
    step_offsets,
    step_span,
)

_JIT = {"cache": True, "error_model": "numpy", "nogil": True, "parallel": True}


@njit(**_JIT)
def lstm_forward(
    batch_sizes, reverse, W_hh, W_hr, h0, c0, y, h_n, c_n, gate_cache, cell_cache, threads
):
    """Run the recurrence: fills y, h_n, c_n, and turns gate_cache into activated gates."""
    num_steps = batch_sizes.shape[0]
    batch = h0.shape[0]
    hidden = c0.shape[1]
    has_proj = W_hr.shape[0] > 0
    offsets = step_offsets(batch_sizes)
    h_n[:] = h0
    c_n[:] = c0
    recurrent = np.empty((batch, 4 * hidden), dtype=y.dtype)
    h_raw = np.empty((batch, hidden), dtype=y.dtype)
    n_chunks = chunk_count(batch, threads)
    for chunk in prange(n_chunks):
        first, last = chunk_rows(chunk, n_chunks, batch)
        scratch = np.empty(W_hh.shape[0] * (last - first), dtype=y.dtype)
        for k in range(num_steps):
            t, off, end = step_span(k, batch_sizes, offsets, reverse, first, last)
            if end == first:
                continue
            matmul_weights_t(h_n[first:end], W_hh, scratch, recurrent[first:end])
            for r in range(first, end):
                gates = gate_cache[off + r]
                rec = recurrent[r]
                c_row = c_n[r]
                out = h_raw[r] if has_proj else h_n[r]
                for j in range(hidden):
                    i = sigmoid(gates[j] + rec[j])
                    f = sigmoid(gates[hidden + j] + rec[hidden + j])
                    g = tanh(gates[2 * hidden + j] + rec[2 * hidden + j])
                    o = sigmoid(gates[3 * hidden + j] + rec[3 * hidden + j])
                    c = f * c_row[j] + i * g
                    gates[j] = i
                    gates[hidden + j] = f
                    gates[2 * hidden + j] = g
                    gates[3 * hidden + j] = o
                    c_row[j] = c
                    out[j] = o * tanh(c)
                cell_cache[off + r] = c_row
            if has_proj:
                matmul_weights_t(h_raw[first:end], W_hr, scratch, h_n[first:end])
            y[off + first : off + end] = h_n[first:end]


@njit(**_JIT)
def lstm_backward(
    batch_sizes,
    reverse,
    W_hh_t,
    W_hr_t,
    h0,
    c0,
    y,
    gate_cache,
    cell_cache,
    dy,
    dh_n,
    dc_n,
    d_gates,
    h_prev,
    dh_total,
    h_raw,
    dh0,
    dc0,
    threads,
):
    """Backward of `lstm_forward`, per step; the caller does the GEMMs over all rows.

    Takes the weights transposed and contiguous, W_hh_t (P, 4H) and W_hr_t (H, P) (or (0, P)
    without projection): the per-step products are then W @ rows^T, BLAS's fast shape.

    In: dy (N, P), dh_n (B, P), dc_n (B, H). Out: d_gates (N, 4H), the gradients of the gate
    pre-activations; h_prev (N, P), the hidden state each row consumed; with a projection also
    dh_total (N, P), dL/dh of each row, and h_raw (N, H) = o * tanh(c) (else both are (0, *));
    dh0 (B, P), dc0 (B, H).
    So dW_ih = d_gates^T x, dW_hh = d_gates^T h_prev, db = sum(d_gates), dx = d_gates W_ih,
    dW_hr = dh_total^T h_raw.
    """
    num_steps = batch_sizes.shape[0]
    batch = h0.shape[0]
    hidden = c0.shape[1]
    has_proj = W_hr_t.shape[0] > 0
    one = np.ones(1, dtype=y.dtype)[0]
    offsets = step_offsets(batch_sizes)
    dh0[:] = dh_n
    dc0[:] = dc_n
    dh_raw = np.empty((batch, hidden), dtype=y.dtype)
    n_chunks = chunk_count(batch, threads)
    for chunk in prange(n_chunks):
        first, last = chunk_rows(chunk, n_chunks, batch)
        scratch = np.empty(max(W_hh_t.shape[0], W_hr_t.shape[0]) * (last - first), dtype=y.dtype)
        for k in range(num_steps - 1, -1, -1):
            t, off, end = step_span(k, batch_sizes, offsets, reverse, first, last)
            if end == first:
                continue
            rows = end - first
            prev, prev_rows = previous_step_rows(t, batch_sizes, reverse)
            copy_previous_hidden(y, h0, offsets, t, prev, prev_rows, first, rows, h_prev)
            # dh0 holds dL/dh of each row's latest state; add this step's output gradient.
            dh0[first:end] += dy[off + first : off + end]
            if has_proj:
                dh_total[off + first : off + end] = dh0[first:end]
                matmul_weights_t(dh0[first:end], W_hr_t, scratch, dh_raw[first:end])
            else:
                dh_raw[first:end] = dh0[first:end]
            for r in range(first, end):
                gates = gate_cache[off + r]
                d_row = d_gates[off + r]
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
                    d_row[j] = dc * g * i * (one - i)
                    d_row[hidden + j] = dc * c_prev[j] * f * (one - f)
                    d_row[2 * hidden + j] = dc * i * (one - g * g)
                    d_row[3 * hidden + j] = dh * tc * o * (one - o)
                    dc_row[j] = dc * f
                if has_proj:
                    raw = h_raw[off + r]
                    for j in range(hidden):
                        raw[j] = gates[3 * hidden + j] * tanh(c_row[j])
            matmul_weights_t(d_gates[off + first : off + end], W_hh_t, scratch, dh0[first:end])
