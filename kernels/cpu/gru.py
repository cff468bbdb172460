"""GRU (PyTorch/cuDNN "reset after" form), one layer and one direction over a whole sequence.

Gate order r, z, n (torch's):
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h

Shapes (packed time-major rows, see `common`; N = sum(batch_sizes), B = batch_sizes[0]):
    x (N, I); W_ih (3H, I); W_hh (3H, H); b_ih (3H,); b_hh (3H,) (zeros without bias);
    h0 (B, H); y (N, H); h_n (B, H);
    gate_cache (N, 4H): r, z, n and W_hn h + b_hn of every row (backward needs the last for dr).
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
    step_offsets,
    step_time,
)

_JIT = {"cache": True, "error_model": "numpy", "nogil": True}


@njit(**_JIT)
def gru_forward(x, batch_sizes, reverse, W_ih, W_hh, b_ih, b_hh, h0, y, h_n, gate_cache):
    """Run the recurrence, filling y, h_n and gate_cache."""
    num_steps = batch_sizes.shape[0]
    hidden = h0.shape[1]
    one = np.ones(1, dtype=x.dtype)[0]
    offsets = step_offsets(batch_sizes)
    projected = np.empty((x.shape[0], 3 * hidden), dtype=x.dtype)
    input_projection(x, W_ih, projected)
    h_n[:] = h0
    recurrent = np.empty((h0.shape[0], 3 * hidden), dtype=x.dtype)
    for k in range(num_steps):
        t = step_time(k, num_steps, reverse)
        rows = batch_sizes[t]
        off = offsets[t]
        matmul_into(h_n[:rows], W_hh.T, recurrent[:rows])
        for r in range(rows):
            xp = projected[off + r]
            rec = recurrent[r]
            cache = gate_cache[off + r]
            h_row = h_n[r]
            for j in range(hidden):
                reset = sigmoid(xp[j] + b_ih[j] + rec[j] + b_hh[j])
                update = sigmoid(xp[hidden + j] + b_ih[hidden + j] + rec[hidden + j] + b_hh[hidden + j])
                hn = rec[2 * hidden + j] + b_hh[2 * hidden + j]
                n = tanh(xp[2 * hidden + j] + b_ih[2 * hidden + j] + reset * hn)
                cache[j] = reset
                cache[hidden + j] = update
                cache[2 * hidden + j] = n
                cache[3 * hidden + j] = hn
                h_row[j] = (one - update) * n + update * h_row[j]
        y[off : off + rows] = h_n[:rows]


@njit(**_JIT)
def gru_backward(
    x,
    batch_sizes,
    reverse,
    W_ih,
    W_hh,
    h0,
    y,
    gate_cache,
    dy,
    dh_n,
    dx,
    dh0,
    dW_ih,
    dW_hh,
    db_ih,
    db_hh,
    need_dx,
):
    """Backward of `gru_forward`: fills dx (if need_dx) and dh0, adds into dW_ih, dW_hh, db_ih,
    db_hh. dy (N, H) and dh_n (B, H) are the incoming gradients."""
    num_steps = batch_sizes.shape[0]
    hidden = h0.shape[1]
    n_rows = x.shape[0]
    one = np.ones(1, dtype=x.dtype)[0]
    offsets = step_offsets(batch_sizes)
    h_prev = np.empty((n_rows, hidden), dtype=x.dtype)
    gather_previous_hidden(y, h0, batch_sizes, offsets, reverse, h_prev)
    # Gradients of the gate pre-activations on the input side (r, z, n) and on the recurrent
    # side, which differ only in the n block (scaled by r there).
    d_input = np.empty((n_rows, 3 * hidden), dtype=x.dtype)
    d_recurrent = np.empty((n_rows, 3 * hidden), dtype=x.dtype)
    dh0[:] = dh_n
    through_weights = np.empty((h0.shape[0], hidden), dtype=x.dtype)
    for k in range(num_steps - 1, -1, -1):
        t = step_time(k, num_steps, reverse)
        rows = batch_sizes[t]
        off = offsets[t]
        for r in range(rows):
            cache = gate_cache[off + r]
            hp = h_prev[off + r]
            dyr = dy[off + r]
            di = d_input[off + r]
            dr_ = d_recurrent[off + r]
            dh_row = dh0[r]
            for j in range(hidden):
                reset = cache[j]
                update = cache[hidden + j]
                n = cache[2 * hidden + j]
                hn = cache[3 * hidden + j]
                dh = dh_row[j] + dyr[j]
                dn = dh * (one - update) * (one - n * n)
                dz = dh * (hp[j] - n) * update * (one - update)
                drs = dn * hn * reset * (one - reset)
                di[j] = drs
                di[hidden + j] = dz
                di[2 * hidden + j] = dn
                dr_[j] = drs
                dr_[hidden + j] = dz
                dr_[2 * hidden + j] = dn * reset
                dh_row[j] = dh * update
        matmul_into(d_recurrent[off : off + rows], W_hh, through_weights[:rows])
        dh0[:rows] += through_weights[:rows]

    accumulate_matmul_tn(d_input, x, dW_ih)
    accumulate_matmul_tn(d_recurrent, h_prev, dW_hh)
    column_sums(d_input, db_ih)
    column_sums(d_recurrent, db_hh)
    if need_dx:
        matmul_into(d_input, W_ih, dx)
