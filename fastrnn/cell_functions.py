"""The torch.autograd.Function for one step of a cell on the CPU (LSTMCell, GRUCell, RNNCell).

A step has no recurrence to keep inside a kernel: both products run as torch GEMMs
(x @ W_ih^T + b and h @ W_hh^T) and the gate math as one fused single-threaded Numba pass
(`kernels/cpu/cells.py`), which saves and reuses the activated gates in backward; up to
SMALL_BATCH rows that pass computes the products too (`*_cell_forward_small`), faster than
torch's addmm on such skinny products. Backward
runs that pass's gradient kernel and then torch GEMMs for dx, dh, dW_ih, dW_hh. Shapes: x (B, I),
h and c (B, H), W_ih (G*H, I), W_hh (G*H, H), biases (G*H,) or None; G = 4, 3, 1.

On one step this beats the layer kernels: their parallel region and per-call weight packing
(per-thread BLAS calls) cost more than the work (see bench/decisions.md).
CUDA tensors take the layer path (`autograd`).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import reference
from .autograd import check_shapes, double_backward_through
from .cells import SPECS
from .kernels.cpu.cells import (
    SMALL_BATCH,
    gru_cell_backward,
    gru_cell_forward,
    gru_cell_forward_small,
    gru_reset_before_cell_backward_gates,
    gru_reset_before_cell_backward_output,
    gru_reset_before_cell_gates,
    gru_reset_before_cell_output,
    lstm_cell_backward,
    lstm_cell_forward,
    lstm_cell_forward_small,
    rnn_cell_backward,
    rnn_cell_forward,
    rnn_cell_forward_small,
)
from .recurrence_cpu import NUMPY_DTYPES, empty_array, numpy_view


def check_cell(x: Tensor, h: Tensor, c, W_ih: Tensor, W_hh: Tensor, b_ih, b_hh, gates: int) -> None:
    """The shapes the kernels index by without bounds checks (x (B, I), h and c (B, H), W_ih
    (G*H, I), W_hh (G*H, H), biases (G*H,)): a mismatch, such as a weight replaced by one of
    another shape, raises here instead of reading out of bounds."""
    batch, hidden = x.shape[0], W_hh.shape[1]
    rows = gates * hidden
    shapes = [W_ih.shape, W_hh.shape, h.shape]
    expected = [(rows, x.shape[1]), (rows, hidden), (batch, hidden)]
    names = ("weight_ih", "weight_hh", "hx[0]")
    if c is not None:
        shapes.append(c.shape)
        expected.append((batch, hidden))
        names += ("hx[1]",)
    if b_ih is not None:
        shapes += [b_ih.shape, b_hh.shape]
        expected += [(rows,), (rows,)]
        names += ("bias_ih", "bias_hh")
    check_shapes(names, shapes, expected)


def _product(rows: Tensor, W: Tensor, bias: Tensor | None) -> Tensor:
    """rows (B, K) @ W^T (+ bias), a new contiguous (B, G*H) tensor. Each side gets its own
    bias, as in torch's cells: (x W_ih^T + b_ih) + (h W_hh^T + b_hh), one addmm each instead of
    a bias sum plus two products. (Forward never records a graph: it runs under no_grad, or
    nothing requires grad, so no detach.)"""
    if bias is None:
        return torch.mm(rows, W.t())
    return torch.addmm(bias, rows, W.t())


def _product_inputs(x, h, W_ih, W_hh, b_ih, b_hh) -> list:
    """The arrays a `*_cell_forward_small` kernel computes the products from (SMALL_BATCH rows
    or fewer: its own dot products beat torch's addmm there); an absent bias as an empty
    array."""
    arrays = [numpy_view(x), numpy_view(h), numpy_view(W_ih), numpy_view(W_hh)]
    for bias in (b_ih, b_hh):
        arrays.append(
            numpy_view(bias) if bias is not None else empty_array((0,), NUMPY_DTYPES[x.dtype])
        )
    return arrays


def _new_rows(like: Tensor, rows: int, columns: int) -> Tensor:
    return torch.empty((rows, columns), dtype=like.dtype)


def _weight_grads(ctx, d_input: Tensor, d_recurrent: Tensor, x: Tensor, h: Tensor, W_ih, W_hh):
    """dx, dh (through W_hh only), dW_ih, dW_hh, db_ih, db_hh from the pre-activation gradients
    (B, G*H) on the input and the recurrent side (the same tensor for LSTM and RNN), each
    gradient only where its input needs one. Plain 2-D products: going through the layer
    Functions' (D, ...) rules cost a batch-1 backward ~10 us in views and batched matmuls."""
    need = ctx.needs_input_grad  # (cell, x, h, c, W_ih, W_hh, b_ih, b_hh)
    dx = d_input @ W_ih.detach() if need[1] else None
    dh = d_recurrent @ W_hh.detach() if need[2] else None
    dW_ih = d_input.t() @ x.detach() if need[4] else None
    dW_hh = d_recurrent.t() @ h.detach() if need[5] else None
    if not ctx.has_bias:
        return dx, dh, dW_ih, dW_hh, None, None
    db_ih = d_input.sum(0)
    db_hh = db_ih.clone() if d_recurrent is d_input else d_recurrent.sum(0)
    return dx, dh, dW_ih, dW_hh, db_ih, db_hh


def _reference_recompute(ctx):
    """(the cell Function's arguments, its outputs recomputed by `reference.step`)."""
    x, h, c, W_ih, W_hh, _, b_ih, b_hh = ctx.saved_tensors
    states = (h,) if c is None else (h, c)
    outputs = reference.step(ctx.cell, x, states, (W_ih, W_hh, b_ih, b_hh))
    return [ctx.cell, x, h, c, W_ih, W_hh, b_ih, b_hh], outputs


def _lstm_forward(x, h, c, W_ih, W_hh, b_ih, b_hh):
    """-> (h', c'), the activated gates (B, 4H) for a backward."""
    c_new = torch.empty_like(c, memory_format=torch.contiguous_format)
    h_new = torch.empty_like(c_new)
    if x.shape[0] <= SMALL_BATCH:
        gates = _new_rows(x, x.shape[0], W_ih.shape[0])
        rec = torch.empty_like(gates)
        lstm_cell_forward_small(
            *_product_inputs(x, h, W_ih, W_hh, b_ih, b_hh), gates.numpy(), rec.numpy(),
            numpy_view(c), c_new.numpy(), h_new.numpy(),
        )  # fmt: skip
    else:
        gates = _product(x, W_ih, b_ih)
        rec = _product(h, W_hh, b_hh)
        lstm_cell_forward(gates.numpy(), rec.numpy(), numpy_view(c), c_new.numpy(), h_new.numpy())
    return (h_new, c_new), gates


def _gru_forward(x, h, W_ih, W_hh, b_ih, b_hh):
    """-> (h',), the cache (B, 4H) of r, z, n and W_hn h + b_hn for a backward."""
    if b_hh is None:
        b_hh_np = torch.zeros(W_hh.shape[0], dtype=h.dtype).numpy()
    else:
        b_hh_np = numpy_view(b_hh)
    cache = _new_rows(h, h.shape[0], 4 * h.shape[1])
    h_new = torch.empty_like(h, memory_format=torch.contiguous_format)
    if x.shape[0] <= SMALL_BATCH:
        projected = _new_rows(x, x.shape[0], W_ih.shape[0])
        rec = torch.empty_like(projected)
        arrays = _product_inputs(x, h, W_ih, W_hh, b_ih, None)
        arrays[-1] = b_hh_np  # b_hn enters the reset gate, not rec
        gru_cell_forward_small(
            *arrays, projected.numpy(), rec.numpy(), cache.numpy(), h_new.numpy()
        )
    else:
        projected = _product(x, W_ih, b_ih)
        rec = _product(h, W_hh, None)  # b_hn is applied inside the reset gate
        gru_cell_forward(
            projected.numpy(), rec.numpy(), b_hh_np, numpy_view(h), cache.numpy(), h_new.numpy()
        )
    return (h_new,), cache


def _gru_reset_before_forward(x, h, W_ih, W_hh, b_ih, b_hh):
    """-> (h',), the cache (B, 4H) of r, z, n and r * h for a backward: torch GEMMs for
    x W_ih^T + b_ih, h W_hr^T, h W_hz^T and (r * h) W_hn^T, the gate math between them in two
    fused passes (`kernels.cpu.cells.gru_reset_before_cell_*`)."""
    rows, hidden = h.shape
    if b_hh is None:
        b_hh_np = torch.zeros(W_hh.shape[0], dtype=h.dtype).numpy()
    else:
        b_hh_np = numpy_view(b_hh)
    h_np = numpy_view(h)
    projected = _product(x, W_ih, b_ih)
    rec = _product(h, W_hh[: 2 * hidden], None)  # b_hh enters in the gate math
    gated = _new_rows(h, rows, hidden)
    gru_reset_before_cell_gates(projected.numpy(), rec.numpy(), b_hh_np, h_np, gated.numpy())
    gated_product = _product(gated, W_hh[2 * hidden :], None)
    cache = _new_rows(h, rows, 4 * hidden)
    h_new = torch.empty_like(h, memory_format=torch.contiguous_format)
    gru_reset_before_cell_output(
        projected.numpy(), rec.numpy(), b_hh_np, gated_product.numpy(), gated.numpy(), h_np,
        cache.numpy(), h_new.numpy(),
    )  # fmt: skip
    return (h_new,), cache


def _gru_reset_before_backward(ctx, dh: Tensor):
    """The reset-before cell's gradients (dx, dh, dW_ih, dW_hh, db_ih, db_hh), each only where
    its input needs one: dW_hh's n rows take dn and r * h (the cache's last block)."""
    x, h, _, W_ih, W_hh, _, _, _ = ctx.saved_tensors
    rows, hidden = h.shape
    cache = ctx.cache
    W_hh = W_hh.detach()
    d_input = _new_rows(h, rows, 3 * hidden)
    gated_grads = _new_rows(h, rows, hidden)
    dh_direct = torch.empty_like(h, memory_format=torch.contiguous_format)
    gru_reset_before_cell_backward_output(
        cache.numpy(), numpy_view(h), numpy_view(dh), d_input.numpy(), gated_grads.numpy(),
        dh_direct.numpy(),
    )  # fmt: skip
    through = gated_grads @ W_hh[2 * hidden :]
    rec_grads = _new_rows(h, rows, 2 * hidden)
    gru_reset_before_cell_backward_gates(
        cache.numpy(), through.numpy(), dh_direct.numpy(), d_input.numpy(), rec_grads.numpy()
    )
    need = ctx.needs_input_grad  # (cell, x, h, c, W_ih, W_hh, b_ih, b_hh)
    dx = d_input @ W_ih.detach() if need[1] else None
    dh_prev = torch.addmm(dh_direct, rec_grads, W_hh[: 2 * hidden]) if need[2] else None
    dW_ih = d_input.t() @ x.detach() if need[4] else None
    dW_hh = None
    if need[5]:
        gated = cache[:, 3 * hidden :]
        dW_hh = torch.cat([rec_grads.t() @ h.detach(), d_input[:, 2 * hidden :].t() @ gated])
    db_ih = d_input.sum(0) if ctx.has_bias else None
    db_hh = db_ih.clone() if ctx.has_bias else None
    return dx, dh_prev, dW_ih, dW_hh, db_ih, db_hh


def _rnn_forward(x, h, W_ih, W_hh, b_ih, b_hh, relu):
    """-> (h',), None (h' is all a backward needs)."""
    if x.shape[0] <= SMALL_BATCH:
        h_new = _new_rows(x, x.shape[0], W_ih.shape[0])
        rec = torch.empty_like(h_new)
        arrays = _product_inputs(x, h, W_ih, W_hh, b_ih, b_hh)
        rnn_cell_forward_small(*arrays, h_new.numpy(), rec.numpy(), relu)
    else:
        h_new = _product(x, W_ih, b_ih)
        rnn_cell_forward(h_new.numpy(), _product(h, W_hh, b_hh).numpy(), relu)
    return (h_new,), None


class CellFunction(torch.autograd.Function):
    """(cell, x (B, I), h (B, H), c (B, H) or None, W_ih (G*H, I), W_hh (G*H, H), b_ih, b_hh
    (G*H,) or None) -> h' (B, H), or (h', c') for the LSTM; cell: lstm, gru, gru_reset_before,
    rnn_tanh or rnn_relu (`cells.SPECS`)."""

    @staticmethod
    def forward(ctx, cell, x, h, c, W_ih, W_hh, b_ih, b_hh):
        check_cell(x, h, c, W_ih, W_hh, b_ih, b_hh, SPECS[cell].gates)
        # `kept`: the output a backward reads (LSTM c', RNN h'); a graph-recording call
        # returns a copy of it, which the caller may change in place, as torch's cells allow
        if cell == "lstm":
            (h_new, kept), cache = _lstm_forward(x, h, c, W_ih, W_hh, b_ih, b_hh)
        elif cell == "gru":
            (h_new,), cache = _gru_forward(x, h, W_ih, W_hh, b_ih, b_hh)
            kept = None
        elif cell == "gru_reset_before":
            (h_new,), cache = _gru_reset_before_forward(x, h, W_ih, W_hh, b_ih, b_hh)
            kept = None
        else:
            (h_new,), cache = _rnn_forward(x, h, W_ih, W_hh, b_ih, b_hh, cell == "rnn_relu")
            kept = h_new
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, h, c, W_ih, W_hh, kept, b_ih, b_hh)
            ctx.cell, ctx.cache, ctx.has_bias = cell, cache, b_ih is not None
            if kept is not None:
                kept = kept.clone()
                if cell != "lstm":
                    h_new = kept
        return (h_new, kept) if cell == "lstm" else h_new

    @staticmethod
    @double_backward_through(_reference_recompute)
    @once_differentiable
    def backward(ctx, dh, dc=None):
        if ctx.cell == "gru_reset_before":
            dx, dh_prev, dW_ih, dW_hh, db_ih, db_hh = _gru_reset_before_backward(ctx, dh)
            return None, dx, dh_prev, None, dW_ih, dW_hh, db_ih, db_hh
        x, h, c, W_ih, W_hh, kept, _, _ = ctx.saved_tensors
        dc_prev = None
        if ctx.cell == "lstm":
            d_input = d_recurrent = torch.empty_like(ctx.cache)
            dc_prev = torch.empty_like(c, memory_format=torch.contiguous_format)
            lstm_cell_backward(
                ctx.cache.numpy(), numpy_view(c), kept.numpy(), numpy_view(dh), numpy_view(dc),
                d_input.numpy(), dc_prev.numpy(),
            )  # fmt: skip
        elif ctx.cell == "gru":
            rows, hidden = h.shape
            d_input = _new_rows(h, rows, 3 * hidden)
            d_recurrent = torch.empty_like(d_input)
            dh_direct = torch.empty_like(h, memory_format=torch.contiguous_format)
            gru_cell_backward(
                ctx.cache.numpy(), numpy_view(h), numpy_view(dh), d_input.numpy(),
                d_recurrent.numpy(), dh_direct.numpy(),
            )  # fmt: skip
        else:
            d_input = d_recurrent = torch.empty_like(kept)
            rnn_cell_backward(kept.numpy(), numpy_view(dh), ctx.cell == "rnn_relu", d_input.numpy())
        dx, dh_prev, dW_ih, dW_hh, db_ih, db_hh = _weight_grads(
            ctx, d_input, d_recurrent, x, h, W_ih, W_hh
        )
        if ctx.cell == "gru" and dh_prev is not None:
            dh_prev += dh_direct
        return None, dx, dh_prev, dc_prev, dW_ih, dW_hh, db_ih, db_hh
