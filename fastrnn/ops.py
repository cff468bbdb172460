"""The layer as a torch.library op, `fastrnn::layer`, with its backward `fastrnn::layer_backward`.

This is what `torch.compile` (and anything else that traces through torch's dispatcher) sees of
fastrnn: one opaque op per layer with a fake (shape-only) implementation and a registered
autograd formula, so a compiled graph keeps fastrnn's kernels inside it instead of breaking
around them. Eager calls don't go through the dispatcher (it would add its overhead to every
batch-1 step): they call the same two halves, `autograd.layer_forward` and
`autograd.layer_backward`, through the layer Functions.

Arguments (see `autograd`): cell lstm / gru / rnn_tanh / rnn_relu; x (N, I) rows in packed
time-major order; batch_sizes (T,) int64 CPU tensor; h0 (D, B, P), c0 (D, B, H) (LSTM, else
None); weights stacked over the D directions (W_ih (D, G*H, I), W_hh (D, G*H, P), b_ih / b_hh
(D, G*H) or None, W_hr (D, P, H) or None), or one direction's without the D axis; training:
whether to return the caches a backward needs.
Returns y (N, D * P), h_n (D, B, P), c_n (D, B, H) (empty unless LSTM), gate_cache, cell_cache.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .autograd import layer_backward as _layer_backward
from .autograd import layer_forward as _layer_forward
from .cells import SPECS

_NO_GRADIENT = "fastrnn::layer has no gradient of a gradient (double backward) yet"


def _sizes(batch_sizes: Tensor) -> np.ndarray:
    return batch_sizes.detach().cpu().numpy().astype(np.int64, copy=False)


@torch.library.custom_op("fastrnn::layer", mutates_args=())
def layer(
    cell: str, x: Tensor, batch_sizes: Tensor, h0: Tensor, c0: Tensor | None, W_ih: Tensor,
    W_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, W_hr: Tensor | None, training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """One layer, all its directions, on fastrnn's kernels (see the module docstring)."""
    sizes = _sizes(batch_sizes)
    return _layer_forward(cell, x, sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, training)


@layer.register_fake
def _(cell, x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, training):
    directions = W_hh.shape[0] if W_hh.dim() == 3 else 1
    hidden = W_hh.shape[-2] // SPECS[cell].gates
    rows = x.shape[0]
    y = x.new_empty((rows, directions * h0.shape[-1]))
    h_n = torch.empty_like(h0, memory_format=torch.contiguous_format)
    lstm = cell == "lstm"
    c_n = torch.empty_like(c0, memory_format=torch.contiguous_format) if lstm else x.new_empty(0)
    gate_cache, cell_cache = x.new_empty(0), x.new_empty(0)
    if training and cell in ("lstm", "gru", "gru_reset_before"):
        gate_cache = x.new_empty((directions, rows, 4 * hidden))
    if training and lstm:
        sixteen_bit = x.dtype in (torch.float16, torch.bfloat16)
        cell_dtype = torch.float32 if sixteen_bit else x.dtype
        cell_cache = x.new_empty((directions, rows, hidden), dtype=cell_dtype)
    return y, h_n, c_n, gate_cache, cell_cache


@torch.library.custom_op("fastrnn::layer_backward", mutates_args=())
def layer_backward(
    cell: str, dy: Tensor, dh_n: Tensor, dc_n: Tensor | None, x: Tensor, batch_sizes: Tensor,
    h0: Tensor, c0: Tensor | None, W_ih: Tensor, W_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, W_hr: Tensor | None, y: Tensor, gate_cache: Tensor, cell_cache: Tensor,
    needs: list[bool],
) -> list[Tensor]:  # fmt: skip
    """The gradients [dx, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh, dW_hr] of `layer` (an empty
    tensor where absent or not in `needs`, the same eight inputs' flags)."""
    sizes = _sizes(batch_sizes)
    grads = _layer_backward(
        cell, dy, dh_n, dc_n, x, sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, y,
        gate_cache, cell_cache, needs,
    )  # fmt: skip
    empty = x.new_empty(0)
    return [empty.clone() if g is None else g.contiguous() for g in grads]


@layer_backward.register_fake
def _(cell, dy, dh_n, dc_n, x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, y,
      gate_cache, cell_cache, needs):  # fmt: skip
    like = (x, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr)
    contiguous = torch.contiguous_format
    return [
        x.new_empty(0) if t is None or not want else torch.empty_like(t, memory_format=contiguous)
        for t, want in zip(like, needs, strict=True)
    ]


def _setup_context(ctx, inputs, output) -> None:
    cell, x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, training = inputs
    y, _, _, gate_cache, cell_cache = output
    ctx.cell, ctx.training = cell, training
    ctx.save_for_backward(
        x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, y, gate_cache, cell_cache
    )


def _backward(ctx, dy, dh_n, dc_n, _gate_cache, _cell_cache):
    x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, y, gate_cache, cell_cache = (
        ctx.saved_tensors
    )
    if not ctx.training:
        raise RuntimeError(
            "fastrnn::layer was called with training=False, so it kept nothing for a backward"
        )
    lstm = ctx.cell == "lstm"
    dy = torch.zeros_like(y) if dy is None else dy
    dh_n = torch.zeros_like(h0) if dh_n is None else dh_n
    if lstm and dc_n is None:
        dc_n = torch.zeros_like(c0)
    # inputs of `layer`: cell, x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, training
    needs = [ctx.needs_input_grad[i] for i in (1, 3, 4, 5, 6, 7, 8, 9)]
    grads = layer_backward(
        ctx.cell, dy, dh_n, dc_n if lstm else None, x, batch_sizes, h0, c0, W_ih, W_hh,
        b_ih, b_hh, W_hr, y, gate_cache, cell_cache, needs,
    )  # fmt: skip
    dx, *rest = (g if want else None for g, want in zip(grads, needs, strict=True))
    return None, dx, None, *rest, None


layer.register_autograd(_backward, setup_context=_setup_context)


def _no_double_backward(ctx, *grads):
    raise RuntimeError(_NO_GRADIENT)


layer_backward.register_autograd(_no_double_backward, setup_context=lambda *args: None)
