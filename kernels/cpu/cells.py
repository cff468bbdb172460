"""One step of a cell (LSTMCell, GRUCell, RNNCell) on the CPU: the fused gate math only.

A single step has no recurrence to keep inside a kernel, so the caller computes both products
with torch's GEMMs (`x @ W_ih^T + b`, `h @ W_hh^T`), which on one step beat a parallel region
that re-lays the weights for a single product, and these kernels run the gate math over the
batch in one single-threaded pass, reusing the layer kernels' row functions. Shapes: B rows,
H hidden.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .common import JIT_OPTIONS, copy_row
from .gru import gru_backward_row, gru_forward_row
from .lstm import lstm_backward_row, lstm_forward_row
from .rnn import rnn_backward_row, rnn_forward_row

_JIT = JIT_OPTIONS


@njit(**_JIT)
def lstm_cell_forward(gates, rec, c, c_new, h_new):
    """gates (B, 4H): in x W_ih^T (+ biases), out activated i, f, g, o; rec (B, 4H) =
    h W_hh^T (+ biases): the pre-activations are gates + rec, whichever side holds the biases;
    c (B, H); out c_new, h_new (B, H)."""
    hidden = c.shape[1]
    for r in range(c.shape[0]):
        copy_row(c_new[r], c[r])
        lstm_forward_row(gates[r], rec[r], c_new[r], h_new[r], hidden, True)


@njit(**_JIT)
def lstm_cell_backward(gates, c, c_new, dh, dc, d_gates, dc_prev):
    """Backward of `lstm_cell_forward`: dh, dc (B, H) = dL/dh', dL/dc'; out d_gates (B, 4H),
    the pre-activation gradients, and dc_prev (B, H) = dL/dc."""
    hidden = c.shape[1]
    one = np.ones(1, dtype=c.dtype)[0]
    for r in range(c.shape[0]):
        copy_row(dc_prev[r], dc[r])
        lstm_backward_row(gates[r], c_new[r], c[r], dh[r], dc_prev[r], d_gates[r], hidden, one)


@njit(**_JIT)
def gru_cell_forward(projected, rec, b_hh, h, cache, h_new):
    """projected (B, 3H) = x W_ih^T + b_ih; rec (B, 3H) = h W_hh^T; b_hh (3H); h (B, H);
    out cache (B, 4H): r, z, n, W_hn h + b_hn, and h_new (B, H)."""
    hidden = h.shape[1]
    one = np.ones(1, dtype=h.dtype)[0]
    for r in range(h.shape[0]):
        copy_row(h_new[r], h[r])
        gru_forward_row(projected[r], rec[r], b_hh, cache[r], h_new[r], hidden, one, True)


@njit(**_JIT)
def gru_cell_backward(cache, h, dh, d_input, d_recurrent, dh_direct):
    """Backward of `gru_cell_forward`: dh (B, H) = dL/dh'; out d_input, d_recurrent (B, 3H)
    and dh_direct (B, H), the part of dL/dh that skips W_hh."""
    hidden = h.shape[1]
    one = np.ones(1, dtype=h.dtype)[0]
    for r in range(h.shape[0]):
        copy_row(dh_direct[r], dh[r])
        gru_backward_row(cache[r], h[r], dh_direct[r], d_input[r], d_recurrent[r], hidden, one)


@njit(**_JIT)
def rnn_cell_forward(pre, rec, relu):
    """pre (B, H): in x W_ih^T (+ biases), out h' = act(pre + rec); rec (B, H) = h W_hh^T
    (+ biases)."""
    zero = np.zeros(1, dtype=pre.dtype)[0]
    for r in range(pre.shape[0]):
        rnn_forward_row(pre[r], rec[r], pre.shape[1], relu, zero)


@njit(**_JIT)
def rnn_cell_backward(h_new, dh, relu, d_pre):
    """Backward of `rnn_cell_forward`: h_new, dh (B, H); out d_pre (B, H)."""
    one = np.ones(1, dtype=h_new.dtype)[0]
    zero = np.zeros(1, dtype=h_new.dtype)[0]
    for r in range(h_new.shape[0]):
        rnn_backward_row(h_new[r], dh[r], d_pre[r], h_new.shape[1], relu, one, zero)
