"""torch.autograd.Functions around the CPU kernels: one layer (all its directions), whole sequence.

Each Function takes the layer input in the packed time-major layout (x (N, I), rows of step t
back to back; `batch_sizes` (T,) int64 numpy array, non-increasing; dense input is the special
case N = T * B), the initial state(s) (D, B, P) and the layer's weights stacked over its D
directions (D = 1, or 2 for a bidirectional layer, whose direction 1 runs in reverse): W_ih
(D, G*H, I), W_hh (D, G*H, P), b_ih / b_hh (D, G*H) or None, W_hr (D, P, H) or None. Stacking is
a copy made per call (never cached: weights may change in place between calls); the output is
(N, D*P), the directions' features side by side as torch orders them.

Work split: the GEMMs over all steps (input projection; dW_ih, dW_hh, dW_hr, dx) run in torch, on
torch's own thread pool, like the rest of a training step; the kernels run the recurrence (per-step
products and the fused gate math) on zero-copy numpy views, directions and row chunks of the batch
spread over the threads.

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


def _check_layer(
    x: Tensor,
    batch_sizes: np.ndarray,
    states: tuple[Tensor, ...],
    state_sizes: tuple[int, ...],
    W_ih: Tensor,
    W_hh: Tensor,
    gates: int,
) -> None:
    """Shapes the kernels index without bounds checks: a mismatch raises here instead of reading
    out of bounds (e.g. after a weight was replaced by one of another shape)."""
    directions, rows_hidden = W_hh.shape[0], W_hh.shape[1]
    hidden = rows_hidden // gates
    batch = int(batch_sizes[0]) if batch_sizes.size else 0
    if batch_sizes.size == 0 or int(batch_sizes.sum()) != x.shape[0]:
        raise RuntimeError(
            f"fastrnn: batch_sizes add up to {int(batch_sizes.sum())}, input has {x.shape[0]} rows"
        )
    if (batch_sizes < 0).any() or (np.diff(batch_sizes) > 0).any():
        raise RuntimeError("fastrnn: batch_sizes must be non-negative and non-increasing")
    expected = {
        "weight_ih": (directions, rows_hidden, x.shape[1]),
        "weight_hh": (directions, gates * hidden, state_sizes[0]),
    }
    actual = {"weight_ih": tuple(W_ih.shape), "weight_hh": tuple(W_hh.shape)}
    for index, (state, size) in enumerate(zip(states, state_sizes, strict=True)):
        expected[f"hx[{index}]"] = (directions, batch, size)
        actual[f"hx[{index}]"] = tuple(state.shape)
    for name, shape in expected.items():
        if actual[name] != shape:
            raise RuntimeError(
                f"fastrnn: {name} has shape {list(actual[name])}, expected {list(shape)}"
            )


def _threads() -> int:
    """Threads the kernels may use: torch's setting (what users tune), capped by Numba's pool."""
    return max(1, min(torch.get_num_threads(), numba.get_num_threads()))


def _np(t: Tensor) -> np.ndarray:
    """Zero-copy numpy view of a tensor's data (copied first only if not contiguous)."""
    return t.detach().contiguous().numpy()


def _np_transposed(W: Tensor) -> np.ndarray:
    """(D, A, B) -> contiguous copy of each direction's transpose (D, B, A)."""
    return W.detach().transpose(1, 2).contiguous().numpy()


def _input_projection(x: Tensor, W_ih: Tensor, bias: Tensor | None) -> Tensor:
    """(D, N, G*H) = x (N, I) @ W_ih[d]^T (+ bias[d]), one GEMM per direction over every step."""
    x, W_ih = x.detach(), W_ih.detach()
    out = torch.empty((W_ih.shape[0], x.shape[0], W_ih.shape[1]), dtype=x.dtype)
    for d in range(W_ih.shape[0]):
        if bias is None:
            torch.mm(x, W_ih[d].t(), out=out[d])
        else:
            torch.addmm(bias[d], x, W_ih[d].t(), out=out[d])
    return out


def _summed_bias(b_ih: Tensor | None, b_hh: Tensor | None) -> Tensor | None:
    return None if b_ih is None else b_ih.detach() + b_hh.detach()


def _features_side_by_side(y: Tensor) -> Tensor:
    """(D, N, P) -> (N, D * P) (a view for D = 1)."""
    return y.permute(1, 0, 2).reshape(y.shape[1], y.shape[0] * y.shape[2])


def _per_direction(dy: Tensor, directions: int) -> Tensor:
    """(N, D * P) -> contiguous (D, N, P)."""
    return (
        dy.reshape(dy.shape[0], directions, dy.shape[1] // directions).permute(1, 0, 2).contiguous()
    )


def _input_grad(d_pre: Tensor, W_ih: Tensor) -> Tensor:
    """dx (N, I) = sum over directions of d_pre[d] (N, G*H) @ W_ih[d] (G*H, I)."""
    dx = d_pre[0] @ W_ih[0].detach()
    for d in range(1, d_pre.shape[0]):
        dx.addmm_(d_pre[d], W_ih[d].detach())
    return dx


def _weight_grads(ctx, d_input: Tensor, d_recurrent: Tensor, x: Tensor, h_prev: Tensor, W_ih):
    """dx, dW_ih, dW_hh, db_ih, db_hh from the pre-activation gradients (D, N, G*H) on the input
    side and on the recurrent side (the same tensor for LSTM and RNN, whose two biases are
    summed; GRU's differ in the n block)."""
    need = ctx.needs_input_grad
    dx = _input_grad(d_input, W_ih) if need[0] else None
    dW_ih = torch.matmul(d_input.transpose(1, 2), x.detach()) if need[ctx.W_ih_index] else None
    dW_hh = torch.bmm(d_recurrent.transpose(1, 2), h_prev) if need[ctx.W_ih_index + 1] else None
    if not ctx.has_bias:
        return dx, dW_ih, dW_hh, None, None
    db_ih = d_input.sum(1)
    db_hh = db_ih.clone() if d_recurrent is d_input else d_recurrent.sum(1)
    return dx, dW_ih, dW_hh, db_ih, db_hh


def _states_like(*tensors: Tensor) -> list[Tensor]:
    return [torch.empty(t.shape, dtype=t.dtype) for t in tensors]


class LSTMLayerFunction(torch.autograd.Function):
    """(x (N, I), h0 (D, B, P), c0 (D, B, H), W_ih, W_hh, b_ih, b_hh, W_hr) -> y (N, D * P),
    h_n (D, B, P), c_n (D, B, H)."""

    @staticmethod
    def forward(ctx, x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr):
        hidden = W_hh.shape[1] // 4
        proj = W_hr.shape[1] if W_hr is not None else hidden
        _check_layer(x, batch_sizes, (h0, c0), (proj, hidden), W_ih, W_hh, 4)
        if W_hr is not None and tuple(W_hr.shape) != (W_hh.shape[0], proj, hidden):
            raise RuntimeError(f"fastrnn: weight_hr has shape {list(W_hr.shape)}")
        directions, rows = W_hh.shape[0], x.shape[0]
        gate_cache = _input_projection(x, W_ih, _summed_bias(b_ih, b_hh))
        y = torch.empty((directions, rows, h0.shape[2]), dtype=x.dtype)
        h_n, c_n = _states_like(h0, c0)
        cell_cache = torch.empty((directions, rows, hidden), dtype=x.dtype)
        if W_hr is not None:
            W_hr_np = _np(W_hr)
        else:
            W_hr_np = np.empty((directions, 0, hidden), dtype=_np(h0).dtype)
        with single_threaded_blas():
            lstm_forward(
                batch_sizes,
                _np(W_hh),
                W_hr_np,
                _np(h0),
                _np(c0),
                y.numpy(),
                h_n.numpy(),
                c_n.numpy(),
                gate_cache.numpy(),
                cell_cache.numpy(),
                _threads(),
            )
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, h0, c0, W_ih, W_hh, W_hr, y)
            ctx.gate_cache, ctx.cell_cache = gate_cache, cell_cache
            ctx.batch_sizes = batch_sizes
            ctx.has_bias, ctx.W_ih_index = b_ih is not None, 4
        return _features_side_by_side(y), h_n, c_n

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n):
        x, h0, c0, W_ih, W_hh, W_hr, y = ctx.saved_tensors
        directions, rows, hidden, proj = W_hh.shape[0], x.shape[0], c0.shape[2], h0.shape[2]
        projected = W_hr is not None
        d_gates = torch.empty((directions, rows, 4 * hidden), dtype=x.dtype)
        h_prev = torch.empty((directions, rows, proj), dtype=x.dtype)
        extra_rows = rows if projected else 0
        dh_total = torch.empty((directions, extra_rows, proj), dtype=x.dtype)
        h_raw = torch.empty((directions, extra_rows, hidden), dtype=x.dtype)
        dh0, dc0 = _states_like(h0, c0)
        if projected:
            W_hr_t = _np_transposed(W_hr)
        else:
            W_hr_t = np.empty((directions, 0, proj), dtype=_np(h0).dtype)
        with single_threaded_blas():
            lstm_backward(
                ctx.batch_sizes,
                _np_transposed(W_hh),
                W_hr_t,
                _np(h0),
                _np(c0),
                _np(y),
                ctx.gate_cache.numpy(),
                ctx.cell_cache.numpy(),
                _per_direction(dy, directions).numpy(),
                _np(dh_n),
                _np(dc_n),
                d_gates.numpy(),
                h_prev.numpy(),
                dh_total.numpy(),
                h_raw.numpy(),
                dh0.numpy(),
                dc0.numpy(),
                _threads(),
            )
        dx, dW_ih, dW_hh, db_ih, db_hh = _weight_grads(ctx, d_gates, d_gates, x, h_prev, W_ih)
        dW_hr = torch.bmm(dh_total.transpose(1, 2), h_raw) if projected else None
        return dx, None, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh, dW_hr


class GRULayerFunction(torch.autograd.Function):
    """(x (N, I), h0 (D, B, H), W_ih, W_hh, b_ih, b_hh) -> y (N, D * H), h_n (D, B, H)."""

    @staticmethod
    def forward(ctx, x, batch_sizes, h0, W_ih, W_hh, b_ih, b_hh):
        _check_layer(x, batch_sizes, (h0,), (W_hh.shape[1] // 3,), W_ih, W_hh, 3)
        directions, hidden = W_hh.shape[0], W_hh.shape[2]
        projected = _input_projection(x, W_ih, b_ih)
        if b_hh is not None:
            b_hh_np = _np(b_hh)
        else:
            b_hh_np = np.zeros((directions, 3 * hidden), dtype=_np(h0).dtype)
        y = torch.empty((directions, x.shape[0], hidden), dtype=x.dtype)
        (h_n,) = _states_like(h0)
        gate_cache = torch.empty((directions, x.shape[0], 4 * hidden), dtype=x.dtype)
        with single_threaded_blas():
            gru_forward(
                batch_sizes,
                _np(W_hh),
                b_hh_np,
                _np(h0),
                projected.numpy(),
                y.numpy(),
                h_n.numpy(),
                gate_cache.numpy(),
                _threads(),
            )
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, h0, W_ih, W_hh, y)
            ctx.gate_cache = gate_cache
            ctx.batch_sizes = batch_sizes
            ctx.has_bias, ctx.W_ih_index = b_ih is not None, 3
        return _features_side_by_side(y), h_n

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx, dy, dh_n):
        x, h0, W_ih, W_hh, y = ctx.saved_tensors
        directions, rows, hidden = W_hh.shape[0], x.shape[0], h0.shape[2]
        d_input = torch.empty((directions, rows, 3 * hidden), dtype=x.dtype)
        d_recurrent = torch.empty((directions, rows, 3 * hidden), dtype=x.dtype)
        h_prev = torch.empty((directions, rows, hidden), dtype=x.dtype)
        (dh0,) = _states_like(h0)
        with single_threaded_blas():
            gru_backward(
                ctx.batch_sizes,
                _np_transposed(W_hh),
                _np(h0),
                _np(y),
                ctx.gate_cache.numpy(),
                _per_direction(dy, directions).numpy(),
                _np(dh_n),
                h_prev.numpy(),
                d_input.numpy(),
                d_recurrent.numpy(),
                dh0.numpy(),
                _threads(),
            )
        dx, dW_ih, dW_hh, db_ih, db_hh = _weight_grads(ctx, d_input, d_recurrent, x, h_prev, W_ih)
        return dx, None, dh0, dW_ih, dW_hh, db_ih, db_hh


class RNNLayerFunction(torch.autograd.Function):
    """(x (N, I), h0 (D, B, H), W_ih, W_hh, b_ih, b_hh) -> y (N, D * H), h_n (D, B, H);
    tanh or relu."""

    @staticmethod
    def forward(ctx, x, batch_sizes, relu, h0, W_ih, W_hh, b_ih, b_hh):
        _check_layer(x, batch_sizes, (h0,), (W_hh.shape[1],), W_ih, W_hh, 1)
        y = _input_projection(x, W_ih, _summed_bias(b_ih, b_hh))
        (h_n,) = _states_like(h0)
        with single_threaded_blas():
            rnn_forward(
                batch_sizes,
                relu,
                _np(W_hh),
                _np(h0),
                y.numpy(),
                h_n.numpy(),
                _threads(),
            )
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, h0, W_ih, W_hh, y)
            ctx.batch_sizes, ctx.relu = batch_sizes, relu
            ctx.has_bias, ctx.W_ih_index = b_ih is not None, 4
        return _features_side_by_side(y), h_n

    @staticmethod
    @_first_order_only
    @once_differentiable
    def backward(ctx, dy, dh_n):
        x, h0, W_ih, W_hh, y = ctx.saved_tensors
        directions, rows, hidden = W_hh.shape[0], x.shape[0], h0.shape[2]
        d_pre = torch.empty((directions, rows, hidden), dtype=x.dtype)
        h_prev = torch.empty((directions, rows, hidden), dtype=x.dtype)
        (dh0,) = _states_like(h0)
        with single_threaded_blas():
            rnn_backward(
                ctx.batch_sizes,
                ctx.relu,
                _np_transposed(W_hh),
                _np(h0),
                _np(y),
                _per_direction(dy, directions).numpy(),
                _np(dh_n),
                d_pre.numpy(),
                h_prev.numpy(),
                dh0.numpy(),
                _threads(),
            )
        dx, dW_ih, dW_hh, db_ih, db_hh = _weight_grads(ctx, d_pre, d_pre, x, h_prev, W_ih)
        return dx, None, None, dh0, dW_ih, dW_hh, db_ih, db_hh
