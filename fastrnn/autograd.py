"""torch.autograd.Functions around the CPU kernels: one layer, one direction, whole sequence.

Each Function takes the layer input in the packed time-major layout (x (N, I), rows of step t
back to back; `batch_sizes` (T,) int64 numpy array, non-increasing; dense input is the special
case N = T * B), the initial state(s) (B, P), and the layer-direction's weights exactly as torch
stores them (no copies kept across calls).

Work split: the GEMMs over all steps (input projection; dW_ih, dW_hh, dW_hr, dx) run in torch, on
torch's own thread pool, like the rest of a training step; the kernels run the recurrence (per-step
products and the fused gate math) on zero-copy numpy views, with the batch split across threads.

Double backward is not supported: it raises a RuntimeError instead of returning a wrong value.
"""

from __future__ import annotations

import functools

import numba
import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .kernels.cpu.gru import gru_backward, gru_forward
from .kernels.cpu.lstm import lstm_backward, lstm_forward
from .kernels.cpu.rnn import rnn_backward, rnn_forward
from .kernels.cpu.runtime import single_threaded_blas

_DOUBLE_BACKWARD = (
    "fastrnn: double backward (differentiating a gradient, create_graph=True) is not supported"
)


def _first_order_only(backward):
    """Raise on create_graph=True instead of returning gradients that can't be differentiated."""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(_DOUBLE_BACKWARD)
        return backward(ctx, *grads)

    return wrapper


def _np(t: Tensor) -> np.ndarray:
    """Zero-copy numpy view of a tensor's data (copied first only if not contiguous)."""
    return t.detach().contiguous().numpy()


def _np_transposed(W: Tensor) -> np.ndarray:
    """A contiguous copy of W^T, made per call (never cached: weights may change in place)."""
    return W.detach().t().contiguous().numpy()


def _input_projection(x: Tensor, W_ih: Tensor, bias: Tensor | None) -> Tensor:
    """(N, G*H) = x (N, I) @ W_ih^T (+ bias), one GEMM over every step."""
    x, W_ih = x.detach(), W_ih.detach()
    if bias is None:
        return x @ W_ih.t()
    return torch.addmm(bias.detach(), x, W_ih.t())


def _summed_bias(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    return None if b_ih is None else b_ih.detach() + b_hh.detach()


def _weight_grads(ctx, d_pre: Tensor, x: Tensor, h_prev: Tensor, W_ih: Tensor):
    """dx, dW_ih, dW_hh and the bias gradient from the pre-activation gradients (N, G*H)."""
    need = ctx.needs_input_grad
    dx = d_pre @ W_ih.detach() if need[0] else None
    dW_ih = d_pre.t() @ x.detach() if need[ctx.W_ih_index] else None
    dW_hh = d_pre.t() @ h_prev if need[ctx.W_ih_index + 1] else None
    dbias = d_pre.sum(0) if ctx.has_bias else None
    return dx, dW_ih, dW_hh, dbias


def _states_like(*tensors: Tensor) -> list[Tensor]:
    return [torch.empty(t.shape, dtype=t.dtype) for t in tensors]


class LSTMLayerFunction(torch.autograd.Function):
    """(x (N, I), h0 (B, P), c0 (B, H), W_ih, W_hh, b_ih, b_hh, W_hr) -> y (N, P), h_n, c_n."""

    @staticmethod
    def forward(ctx, x, batch_sizes, reverse, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr):
        hidden = W_hh.shape[0] // 4
        gate_cache = _input_projection(x, W_ih, _summed_bias(b_ih, b_hh))
        y = torch.empty((x.shape[0], h0.shape[1]), dtype=x.dtype)
        h_n, c_n = _states_like(h0, c0)
        cell_cache = torch.empty((x.shape[0], hidden), dtype=x.dtype)
        W_hr_np = _np(W_hr) if W_hr is not None else np.empty((0, hidden), dtype=_np(h0).dtype)
        with single_threaded_blas():
            lstm_forward(
                batch_sizes,
                reverse,
                _np(W_hh),
                W_hr_np,
                _np(h0),
                _np(c0),
                y.numpy(),
                h_n.numpy(),
                c_n.numpy(),
                gate_cache.numpy(),
                cell_cache.numpy(),
                numba.get_num_threads(),
            )
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, h0, c0, W_ih, W_hh, W_hr, y)
            ctx.gate_cache, ctx.cell_cache = gate_cache, cell_cache
            ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
            ctx.has_bias, ctx.W_ih_index = b_ih is not None, 5
        return y, h_n, c_n

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, W_ih, W_hh, W_hr, y = ctx.saved_tensors
        rows, hidden, proj = x.shape[0], c0.shape[1], h0.shape[1]
        projected = W_hr is not None
        d_gates = torch.empty((rows, 4 * hidden), dtype=x.dtype)
        h_prev = torch.empty((rows, proj), dtype=x.dtype)
        dh_total = torch.empty((rows if projected else 0, proj), dtype=x.dtype)
        h_raw = torch.empty((rows if projected else 0, hidden), dtype=x.dtype)
        dh0, dc0 = _states_like(h0, c0)
        W_hr_t = _np_transposed(W_hr) if projected else np.empty((0, proj), dtype=_np(h0).dtype)
        with single_threaded_blas():
            lstm_backward(
                ctx.batch_sizes,
                ctx.reverse,
                _np_transposed(W_hh),
                W_hr_t,
                _np(h0),
                _np(c0),
                _np(y),
                ctx.gate_cache.numpy(),
                ctx.cell_cache.numpy(),
                _np(dy),
                _np(dh_n),
                _np(dc_n),
                d_gates.numpy(),
                h_prev.numpy(),
                dh_total.numpy(),
                h_raw.numpy(),
                dh0.numpy(),
                dc0.numpy(),
                numba.get_num_threads(),
            )
        dx, dW_ih, dW_hh, dbias = _weight_grads(ctx, d_gates, x, h_prev, W_ih)
        dW_hr = dh_total.t() @ h_raw if projected and ctx.needs_input_grad[9] else None
        db_hh = dbias.clone() if dbias is not None else None
        return dx, None, None, dh0, dc0, dW_ih, dW_hh, dbias, db_hh, dW_hr


class GRULayerFunction(torch.autograd.Function):
    """(x (N, I), h0 (B, H), W_ih, W_hh, b_ih, b_hh) -> y (N, H), h_n (B, H)."""

    @staticmethod
    def forward(ctx, x, batch_sizes, reverse, h0, W_ih, W_hh, b_ih, b_hh):
        hidden = W_hh.shape[1]
        projected = _input_projection(x, W_ih, b_ih)
        b_hh_np = _np(b_hh) if b_hh is not None else np.zeros(3 * hidden, dtype=_np(h0).dtype)
        y = torch.empty((x.shape[0], hidden), dtype=x.dtype)
        (h_n,) = _states_like(h0)
        gate_cache = torch.empty((x.shape[0], 4 * hidden), dtype=x.dtype)
        with single_threaded_blas():
            gru_forward(
                batch_sizes,
                reverse,
                _np(W_hh),
                b_hh_np,
                _np(h0),
                projected.numpy(),
                y.numpy(),
                h_n.numpy(),
                gate_cache.numpy(),
                numba.get_num_threads(),
            )
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, h0, W_ih, W_hh, y)
            ctx.gate_cache = gate_cache
            ctx.batch_sizes, ctx.reverse = batch_sizes, reverse
            ctx.has_bias, ctx.W_ih_index = b_ih is not None, 4
        return y, h_n

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx, dy, dh_n):
        x, h0, W_ih, W_hh, y = ctx.saved_tensors
        rows, hidden = x.shape[0], h0.shape[1]
        d_input = torch.empty((rows, 3 * hidden), dtype=x.dtype)
        d_recurrent = torch.empty((rows, 3 * hidden), dtype=x.dtype)
        h_prev = torch.empty((rows, hidden), dtype=x.dtype)
        (dh0,) = _states_like(h0)
        with single_threaded_blas():
            gru_backward(
                ctx.batch_sizes,
                ctx.reverse,
                _np_transposed(W_hh),
                _np(h0),
                _np(y),
                ctx.gate_cache.numpy(),
                _np(dy),
                _np(dh_n),
                h_prev.numpy(),
                d_input.numpy(),
                d_recurrent.numpy(),
                dh0.numpy(),
                numba.get_num_threads(),
            )
        need = ctx.needs_input_grad
        dx = d_input @ W_ih.detach() if need[0] else None
        dW_ih = d_input.t() @ x.detach() if need[4] else None
        dW_hh = d_recurrent.t() @ h_prev if need[5] else None
        db_ih = d_input.sum(0) if ctx.has_bias else None
        db_hh = d_recurrent.sum(0) if ctx.has_bias else None
        return dx, None, None, dh0, dW_ih, dW_hh, db_ih, db_hh


class RNNLayerFunction(torch.autograd.Function):
    """(x (N, I), h0 (B, H), W_ih, W_hh, b_ih, b_hh) -> y (N, H), h_n (B, H); tanh or relu."""

    @staticmethod
    def forward(ctx, x, batch_sizes, reverse, relu, h0, W_ih, W_hh, b_ih, b_hh):
        y = _input_projection(x, W_ih, _summed_bias(b_ih, b_hh))
        (h_n,) = _states_like(h0)
        with single_threaded_blas():
            rnn_forward(
                batch_sizes,
                reverse,
                relu,
                _np(W_hh),
                _np(h0),
                y.numpy(),
                h_n.numpy(),
                numba.get_num_threads(),
            )
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, h0, W_ih, W_hh, y)
            ctx.batch_sizes, ctx.reverse, ctx.relu = batch_sizes, reverse, relu
            ctx.has_bias, ctx.W_ih_index = b_ih is not None, 5
        return y, h_n

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx, dy, dh_n):
        x, h0, W_ih, W_hh, y = ctx.saved_tensors
        rows, hidden = x.shape[0], h0.shape[1]
        d_pre = torch.empty((rows, hidden), dtype=x.dtype)
        h_prev = torch.empty((rows, hidden), dtype=x.dtype)
        (dh0,) = _states_like(h0)
        with single_threaded_blas():
            rnn_backward(
                ctx.batch_sizes,
                ctx.reverse,
                ctx.relu,
                _np_transposed(W_hh),
                _np(h0),
                _np(y),
                _np(dy),
                _np(dh_n),
                d_pre.numpy(),
                h_prev.numpy(),
                dh0.numpy(),
                numba.get_num_threads(),
            )
        dx, dW_ih, dW_hh, dbias = _weight_grads(ctx, d_pre, x, h_prev, W_ih)
        db_hh = dbias.clone() if dbias is not None else None
        return dx, None, None, None, dh0, dW_ih, dW_hh, dbias, db_hh
