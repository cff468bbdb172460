"""torch.autograd.Functions around the CPU kernels: one layer, one direction, whole sequence.

Each Function takes the layer input in the packed time-major layout (x (N, I), rows of step t
back to back; `batch_sizes` (T,) int64 numpy array, non-increasing; dense input is the special
case N = T * B), the initial state(s) (B, P), and the layer-direction's weights exactly as torch
stores them (no copies kept across calls). Kernels get zero-copy numpy views of contiguous
tensors; forward saves what backward needs only when something requires grad.

Double backward is not supported: backward is `once_differentiable`, so differentiating it again
raises a RuntimeError instead of returning a wrong value.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .kernels.cpu.gru import gru_backward, gru_forward
from .kernels.cpu.lstm import lstm_backward, lstm_forward
from .kernels.cpu.rnn import rnn_backward, rnn_forward


def _array(t: Tensor) -> np.ndarray:
    """Zero-copy numpy view of a tensor's data (copied only if not contiguous)."""
    return t.detach().contiguous().numpy()


def _summed_bias(b_ih: Tensor | None, b_hh: Tensor | None, size: int, like: Tensor) -> np.ndarray:
    if b_ih is None:
        return np.zeros(size, dtype=_array(like).dtype)
    return (b_ih.detach() + b_hh.detach()).numpy()


def _bias_or_zeros(b: Tensor | None, size: int, like: Tensor) -> np.ndarray:
    if b is None:
        return np.zeros(size, dtype=_array(like).dtype)
    return _array(b)


def _zeros_like_np(t: Tensor) -> tuple[Tensor, np.ndarray]:
    z = torch.zeros(t.shape, dtype=t.dtype)
    return z, z.numpy()


class LSTMLayerFunction(torch.autograd.Function):
    """(x (N, I), h0 (B, P), c0 (B, H), W_ih, W_hh, b_ih, b_hh, W_hr) -> y (N, P), h_n, c_n."""

    @staticmethod
    def forward(ctx, x, batch_sizes, reverse, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr):
        hidden = W_hh.shape[0] // 4
        rows = x.shape[0]
        x_np, h0_np, c0_np = _array(x), _array(h0), _array(c0)
        W_hr_np = _array(W_hr) if W_hr is not None else np.empty((0, hidden), dtype=x_np.dtype)
        y = torch.empty((rows, h0.shape[1]), dtype=x.dtype)
        h_n = torch.empty_like(h0, memory_format=torch.contiguous_format)
        c_n = torch.empty_like(c0, memory_format=torch.contiguous_format)
        gate_cache = torch.empty((rows, 4 * hidden), dtype=x.dtype)
        cell_cache = torch.empty((rows, hidden), dtype=x.dtype)
        lstm_forward(
            x_np,
            batch_sizes,
            reverse,
            _array(W_ih),
            _array(W_hh),
            _summed_bias(b_ih, b_hh, 4 * hidden, x),
            W_hr_np,
            h0_np,
            c0_np,
            y.numpy(),
            h_n.numpy(),
            c_n.numpy(),
            gate_cache.numpy(),
            cell_cache.numpy(),
        )
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, h0, c0, W_ih, W_hh, W_hr, y)
            ctx.gate_cache, ctx.cell_cache = gate_cache, cell_cache
            ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
            ctx.has_bias = b_ih is not None
        return y, h_n, c_n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, W_ih, W_hh, W_hr, y = ctx.saved_tensors
        hidden = W_hh.shape[0] // 4
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dh0 = torch.empty_like(h0, memory_format=torch.contiguous_format)
        dc0 = torch.empty_like(c0, memory_format=torch.contiguous_format)
        dW_ih, dW_ih_np = _zeros_like_np(W_ih)
        dW_hh, dW_hh_np = _zeros_like_np(W_hh)
        dbias = torch.zeros(4 * hidden, dtype=x.dtype)
        if W_hr is not None:
            dW_hr, dW_hr_np = _zeros_like_np(W_hr)
            W_hr_np = _array(W_hr)
        else:
            dW_hr, dW_hr_np = None, np.zeros((0, hidden), dtype=dbias.numpy().dtype)
            W_hr_np = dW_hr_np
        lstm_backward(
            _array(x),
            ctx.batch_sizes,
            ctx.reverse,
            _array(W_ih),
            _array(W_hh),
            W_hr_np,
            _array(h0),
            _array(c0),
            _array(y),
            ctx.gate_cache.numpy(),
            ctx.cell_cache.numpy(),
            _array(dy),
            _array(dh_n),
            _array(dc_n),
            dx.numpy(),
            dh0.numpy(),
            dc0.numpy(),
            dW_ih_np,
            dW_hh_np,
            dbias.numpy(),
            dW_hr_np,
            ctx.needs_input_grad[0],
        )
        db_ih, db_hh = (dbias, dbias.clone()) if ctx.has_bias else (None, None)
        return dx, None, None, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh, dW_hr


class GRULayerFunction(torch.autograd.Function):
    """(x (N, I), h0 (B, H), W_ih, W_hh, b_ih, b_hh) -> y (N, H), h_n (B, H)."""

    @staticmethod
    def forward(ctx, x, batch_sizes, reverse, h0, W_ih, W_hh, b_ih, b_hh):
        hidden = W_hh.shape[1]
        rows = x.shape[0]
        y = torch.empty((rows, hidden), dtype=x.dtype)
        h_n = torch.empty_like(h0, memory_format=torch.contiguous_format)
        gate_cache = torch.empty((rows, 4 * hidden), dtype=x.dtype)
        gru_forward(
            _array(x),
            batch_sizes,
            reverse,
            _array(W_ih),
            _array(W_hh),
            _bias_or_zeros(b_ih, 3 * hidden, x),
            _bias_or_zeros(b_hh, 3 * hidden, x),
            _array(h0),
            y.numpy(),
            h_n.numpy(),
            gate_cache.numpy(),
        )
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, h0, W_ih, W_hh, y)
            ctx.gate_cache = gate_cache
            ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
            ctx.has_bias = b_ih is not None
        return y, h_n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        x, h0, W_ih, W_hh, y = ctx.saved_tensors
        hidden = W_hh.shape[1]
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dh0 = torch.empty_like(h0, memory_format=torch.contiguous_format)
        dW_ih, dW_ih_np = _zeros_like_np(W_ih)
        dW_hh, dW_hh_np = _zeros_like_np(W_hh)
        db_ih = torch.zeros(3 * hidden, dtype=x.dtype)
        db_hh = torch.zeros(3 * hidden, dtype=x.dtype)
        gru_backward(
            _array(x),
            ctx.batch_sizes,
            ctx.reverse,
            _array(W_ih),
            _array(W_hh),
            _array(h0),
            _array(y),
            ctx.gate_cache.numpy(),
            _array(dy),
            _array(dh_n),
            dx.numpy(),
            dh0.numpy(),
            dW_ih_np,
            dW_hh_np,
            db_ih.numpy(),
            db_hh.numpy(),
            ctx.needs_input_grad[0],
        )
        if not ctx.has_bias:
            db_ih = db_hh = None
        return dx, None, None, dh0, dW_ih, dW_hh, db_ih, db_hh


class RNNLayerFunction(torch.autograd.Function):
    """(x (N, I), h0 (B, H), W_ih, W_hh, b_ih, b_hh) -> y (N, H), h_n (B, H); tanh or relu."""

    @staticmethod
    def forward(ctx, x, batch_sizes, reverse, relu, h0, W_ih, W_hh, b_ih, b_hh):
        hidden = W_hh.shape[1]
        y = torch.empty((x.shape[0], hidden), dtype=x.dtype)
        h_n = torch.empty_like(h0, memory_format=torch.contiguous_format)
        rnn_forward(
            _array(x),
            batch_sizes,
            reverse,
            relu,
            _array(W_ih),
            _array(W_hh),
            _summed_bias(b_ih, b_hh, hidden, x),
            _array(h0),
            y.numpy(),
            h_n.numpy(),
        )
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, h0, W_ih, W_hh, y)
            ctx.batch_sizes, ctx.reverse, ctx.relu = batch_sizes, reverse, relu
            ctx.has_bias = b_ih is not None
        return y, h_n

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, dh_n):
        x, h0, W_ih, W_hh, y = ctx.saved_tensors
        hidden = W_hh.shape[1]
        dx = torch.empty_like(x, memory_format=torch.contiguous_format)
        dh0 = torch.empty_like(h0, memory_format=torch.contiguous_format)
        dW_ih, dW_ih_np = _zeros_like_np(W_ih)
        dW_hh, dW_hh_np = _zeros_like_np(W_hh)
        dbias = torch.zeros(hidden, dtype=x.dtype)
        rnn_backward(
            _array(x),
            ctx.batch_sizes,
            ctx.reverse,
            ctx.relu,
            _array(W_ih),
            _array(W_hh),
            _array(h0),
            _array(y),
            _array(dy),
            _array(dh_n),
            dx.numpy(),
            dh0.numpy(),
            dW_ih_np,
            dW_hh_np,
            dbias.numpy(),
            ctx.needs_input_grad[0],
        )
        db_ih, db_hh = (dbias, dbias.clone()) if ctx.has_bias else (None, None)
        return dx, None, None, None, dh0, dW_ih, dW_hh, db_ih, db_hh
