"""One step of a cell (LSTMCell, GRUCell, RNNCell) on the CPU: the fused gate math, and for a
small batch the two products as well.

A single step has no recurrence to keep inside a kernel. From SMALL_BATCH + 1 rows the caller
computes both products with torch's GEMMs (`x @ W_ih^T + b`, `h @ W_hh^T`), which on one step
beat a parallel region that re-lays the weights for a single product, and these kernels run the
gate math over the batch in one single-threaded pass, reusing the layer kernels' row functions.
Up to SMALL_BATCH rows, `cell_products` computes the products too, as dot products along the
weights' rows in torch's own layout (no packing): torch's addmm handles such skinny products
poorly (1 x 128 @ 128 x 1024: 18.7 against 8.2 us here; 1 x 256 @ 256 x 2048: 74 against 27).
Shapes: B rows, H hidden.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .common import JIT_OPTIONS, copy_row
from .gru import gru_backward_row, gru_forward_row
from .gru_reset_before import backward_gates_row, backward_output_row, gates_row, output_row
from .lstm import lstm_backward_row, lstm_forward_row
from .rnn import rnn_backward_row, rnn_forward_row

_JIT = JIT_OPTIONS
# Dot products vectorise only when LLVM may reorder their sums ("reassoc"); they then add in
# another order than BLAS (a few float32 ulps apart), as any two GEMM libraries do.
_DOT_JIT = {**JIT_OPTIONS, "fastmath": {"contract", "reassoc"}}

# Rows up to which `cell_products` beats torch's addmm (B4: 1.4-1.5x at H128-512; B8: 0.8x).
SMALL_BATCH = 4


@njit(**_DOT_JIT)
def _rows_product(rows, W, bias, out):
    """out (B, N) = rows (B, K) @ W (N, K)^T (+ bias (N), none if empty): for each row of W,
    its dot product with every input row, so W streams through the cache once."""
    biased = bias.shape[0] > 0
    zero = np.zeros(1, dtype=out.dtype)[0]
    for j in range(W.shape[0]):
        weights = W[j]
        for r in range(rows.shape[0]):
            row = rows[r]
            total = bias[j] if biased else zero
            for k in range(rows.shape[1]):
                total += row[k] * weights[k]
            out[r, j] = total


@njit(**_JIT)
def cell_products(x, h, W_ih, W_hh, b_ih, b_hh, projected, rec):
    """projected (B, G*H) = x W_ih^T + b_ih and rec (B, G*H) = h W_hh^T + b_hh, for SMALL_BATCH
    rows or fewer; an empty bias adds nothing."""
    _rows_product(x, W_ih, b_ih, projected)
    _rows_product(h, W_hh, b_hh, rec)


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
def gru_reset_before_cell_gates(projected, rec, b_hh, h, gated):
    """First half of a reset-before GRU step (`gru_reset_before`): projected (B, 3H) =
    x W_ih^T + b_ih; rec (B, 2H): in h W_hr^T, h W_hz^T, out r and z; b_hh (3H); h (B, H);
    out gated (B, H) = r * h, which the caller multiplies by W_hn^T."""
    hidden = h.shape[1]
    for r in range(h.shape[0]):
        gates_row(projected[r], rec[r], b_hh, h[r], gated[r], hidden)


@njit(**_JIT)
def gru_reset_before_cell_output(projected, rec, b_hh, gated_product, gated, h, cache, h_new):
    """Second half: gated_product (B, H) = (r * h) W_hn^T; out cache (B, 4H): r, z, n, r * h,
    and h_new (B, H)."""
    hidden = h.shape[1]
    one = np.ones(1, dtype=h.dtype)[0]
    for r in range(h.shape[0]):
        copy_row(h_new[r], h[r])
        output_row(
            projected[r], rec[r], b_hh, gated_product[r], gated[r], cache[r], h_new[r], hidden,
            one, True,
        )  # fmt: skip


@njit(**_JIT)
def gru_reset_before_cell_backward_output(cache, h, dh, d_input, gated_grads, dh_direct):
    """Backward of `gru_reset_before_cell_output`: dh (B, H) = dL/dh'; out d_input (B, 3H)
    (its z and n blocks), gated_grads (B, H) = dn, which the caller multiplies by W_hn, and
    dh_direct (B, H) = z * dL/dh'."""
    hidden = h.shape[1]
    one = np.ones(1, dtype=h.dtype)[0]
    for r in range(h.shape[0]):
        copy_row(dh_direct[r], dh[r])
        backward_output_row(cache[r], h[r], dh_direct[r], d_input[r], gated_grads[r], hidden, one)


@njit(**_JIT)
def gru_reset_before_cell_backward_gates(cache, through, dh_direct, d_input, rec_grads):
    """Backward of `gru_reset_before_cell_gates`: through (B, H) = dn W_hn; dh_direct (B, H)
    gains through * r; out d_input's r block and rec_grads (B, 2H) = dr, dz (for W_hr, W_hz)."""
    hidden = dh_direct.shape[1]
    one = np.ones(1, dtype=dh_direct.dtype)[0]
    for r in range(dh_direct.shape[0]):
        backward_gates_row(
            cache[r], through[r], dh_direct[r], d_input[r], rec_grads[r], hidden, one
        )


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


@njit(**_JIT)
def lstm_cell_forward_small(x, h, W_ih, W_hh, b_ih, b_hh, gates, rec, c, c_new, h_new):
    """`lstm_cell_forward` with the products computed here (`cell_products`): x (B, I),
    h (B, H), W_ih (4H, I), W_hh (4H, H), biases (4H) or empty; gates, rec (B, 4H) scratch
    (gates out: activated i, f, g, o)."""
    cell_products(x, h, W_ih, W_hh, b_ih, b_hh, gates, rec)
    lstm_cell_forward(gates, rec, c, c_new, h_new)


@njit(**_JIT)
def gru_cell_forward_small(x, h, W_ih, W_hh, b_ih, b_hh, projected, rec, cache, h_new):
    """`gru_cell_forward` with the products computed here; b_hh (3H) (zeros without bias)
    enters the gates there, not rec."""
    cell_products(x, h, W_ih, W_hh, b_ih, b_hh[:0], projected, rec)
    gru_cell_forward(projected, rec, b_hh, h, cache, h_new)


@njit(**_JIT)
def rnn_cell_forward_small(x, h, W_ih, W_hh, b_ih, b_hh, pre, rec, relu):
    """`rnn_cell_forward` with the products computed here; pre (B, H) out: h'."""
    cell_products(x, h, W_ih, W_hh, b_ih, b_hh, pre, rec)
    rnn_cell_forward(pre, rec, relu)
