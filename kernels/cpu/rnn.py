"""Elman RNN, one layer and one direction over a whole sequence, forward and backward.

    h' = act(W_ih x + b_ih + W_hh h + b_hh),  act = tanh (relu=False) or relu (relu=True)

Shapes (packed time-major rows, see `common`; N = sum(batch_sizes), B = batch_sizes[0]):
    x (N, I); W_ih (H, I); W_hh (H, H); bias (H,) = b_ih + b_hh (zeros without bias);
    h0 (B, H); y (N, H); h_n (B, H). The outputs y are all backward needs (act' from act).
"""

from __future__ import annotations

import numpy as np
from numba import njit

from ..math import tanh
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
def rnn_forward(x, batch_sizes, reverse, relu, W_ih, W_hh, bias, h0, y, h_n):
    """Run the recurrence, filling y and h_n."""
    num_steps = batch_sizes.shape[0]
    hidden = h0.shape[1]
    zero = np.zeros(1, dtype=x.dtype)[0]
    offsets = step_offsets(batch_sizes)
    input_projection(x, W_ih, y)
    h_n[:] = h0
    recurrent = np.empty((h0.shape[0], hidden), dtype=x.dtype)
    for k in range(num_steps):
        t = step_time(k, num_steps, reverse)
        rows = batch_sizes[t]
        off = offsets[t]
        matmul_into(h_n[:rows], W_hh.T, recurrent[:rows])
        for r in range(rows):
            out = y[off + r]
            rec = recurrent[r]
            h_row = h_n[r]
            if relu:
                for j in range(hidden):
                    pre = out[j] + rec[j] + bias[j]
                    # max() would turn NaN into 0; torch's relu keeps it.
                    h = pre if (pre > zero or pre != pre) else zero
                    out[j] = h
                    h_row[j] = h
            else:
                for j in range(hidden):
                    h = tanh(out[j] + rec[j] + bias[j])
                    out[j] = h
                    h_row[j] = h


@njit(**_JIT)
def rnn_backward(
    x,
    batch_sizes,
    reverse,
    relu,
    W_ih,
    W_hh,
    h0,
    y,
    dy,
    dh_n,
    dx,
    dh0,
    dW_ih,
    dW_hh,
    dbias,
    need_dx,
):
    """Backward of `rnn_forward`: fills dx (if need_dx) and dh0, adds into dW_ih, dW_hh and dbias
    (H,). dy (N, H) and dh_n (B, H) are the incoming gradients."""
    num_steps = batch_sizes.shape[0]
    hidden = h0.shape[1]
    n_rows = x.shape[0]
    one = np.ones(1, dtype=x.dtype)[0]
    zero = np.zeros(1, dtype=x.dtype)[0]
    offsets = step_offsets(batch_sizes)
    d_pre = np.empty((n_rows, hidden), dtype=x.dtype)
    dh0[:] = dh_n
    for k in range(num_steps - 1, -1, -1):
        t = step_time(k, num_steps, reverse)
        rows = batch_sizes[t]
        off = offsets[t]
        for r in range(rows):
            h_out = y[off + r]
            dyr = dy[off + r]
            dp = d_pre[off + r]
            dh_row = dh0[r]
            if relu:
                for j in range(hidden):
                    dp[j] = (dh_row[j] + dyr[j]) if h_out[j] > zero else zero
            else:
                for j in range(hidden):
                    h = h_out[j]
                    dp[j] = (dh_row[j] + dyr[j]) * (one - h * h)
        matmul_into(d_pre[off : off + rows], W_hh, dh0[:rows])

    h_prev = np.empty((n_rows, hidden), dtype=x.dtype)
    gather_previous_hidden(y, h0, batch_sizes, offsets, reverse, h_prev)
    accumulate_matmul_tn(d_pre, x, dW_ih)
    accumulate_matmul_tn(d_pre, h_prev, dW_hh)
    column_sums(d_pre, dbias)
    if need_dx:
        matmul_into(d_pre, W_ih, dx)
