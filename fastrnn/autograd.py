"""torch.autograd.Functions around the kernels: one layer (all its directions), whole sequence.

Each Function takes the layer input in the packed time-major layout (x (N, I), rows of step t
back to back; `batch_sizes` (T,) int64 numpy array, non-increasing; dense input is the special
case N = T * B), the initial state(s) (D, B, P) and the layer's weights stacked over its D
directions (D = 1, or 2 for a bidirectional layer, whose direction 1 runs in reverse): W_ih
(D, G*H, I), W_hh (D, G*H, P), b_ih / b_hh (D, G*H) or None, W_hr (D, P, H) or None. Stacking is
a copy made per call (never cached: weights may change in place between calls); a one-direction
layer passes its weights as they are, without the D axis (`_direction_axis`). The output is
(N, D*P), the directions' features side by side as torch orders them.

Work split: the GEMMs over all steps (input projection; dW_ih, dW_hh, dW_hr, dx) run in torch
(on torch's thread pool, or cuBLAS), like the rest of a training step; the recurrence (per-step
products and the fused gate math) runs in fastrnn's kernels for the tensors' device:
`recurrence_cpu` (Numba CPU) or `recurrence_cuda` (numba-cuda), which take the same arguments
and say what the Functions may leave out for them (`SKIPS_INFERENCE_CACHES`, ...).

Double backward (create_graph=True: gradient penalties, Hessian-vector products, second-order
meta-learning) takes a slow path: the backward recomputes the layer with plain torch ops
(`reference`) and lets autograd differentiate that, so the gradients have a graph of their own
(`double_backward_through`).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence
from types import ModuleType

import numpy as np
import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import recurrence_cpu, recurrence_cuda, reference
from .cells import LAYERNORM_EPS, SPECS, layernorm_widths
from .kernels.cpu.common import batch_sizes_problem
from .scratch import scratch

# Test hook: True sends CPU tensors through the GPU path (`recurrence_cuda`, under Numba's CUDA
# simulator), so the GPU code runs end to end on a machine without a GPU.
CUDA_KERNELS_ON_CPU = False


def _recurrence(x: Tensor) -> ModuleType:
    """The kernels for x's device: `recurrence_cpu` or `recurrence_cuda` (same functions)."""
    if x.is_cuda:
        reason = recurrence_cuda.unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"fastrnn can't run its CUDA kernels: {reason}")
        return recurrence_cuda
    if CUDA_KERNELS_ON_CPU:
        return recurrence_cuda
    if not x.is_cpu:
        raise RuntimeError(f"fastrnn has no kernel for device '{x.device.type}'")
    return recurrence_cpu


def double_backward_through(recompute):
    """Decorator of a Function's backward: the kernels' backward as it is, unless autograd
    records the gradients' own graph (create_graph=True), which that backward can't give.
    Then `recompute(ctx)` -> (the forward's arguments, its outputs) runs the Function again
    with plain torch ops (`reference`, slow: a Python loop over the steps), from the saved
    inputs, and autograd differentiates that with create_graph=True: gradients equal to the
    first-order ones up to rounding, differentiable again like torch.nn's."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            if not torch.is_grad_enabled():
                return backward(ctx, *grads)
            arguments, outputs = recompute(ctx)
            wanted = [i for i, a in enumerate(arguments) if ctx.needs_input_grad[i]]
            given = [(o, g) for o, g in zip(outputs, grads, strict=True) if o.requires_grad]
            found = torch.autograd.grad(
                [o for o, _ in given],
                [arguments[i] for i in wanted],
                [g for _, g in given],
                create_graph=True,
                allow_unused=True,
            )
            result: list[Tensor | None] = [None] * len(arguments)
            for i, gradient in zip(wanted, found, strict=True):
                result[i] = gradient
            return tuple(result)

        return wrapper

    return decorate


def _reference_recompute(ctx):
    """(the layer Function's arguments, its outputs recomputed by `reference.layer`)."""
    x, h0, c0, W_ih, W_hh, W_hr, _, b_ih, b_hh, norms = ctx.saved_tensors
    arguments = [ctx.cell, x, ctx.batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, norms]
    arguments += ctx.masks or (None, None, None)
    return arguments[: len(ctx.needs_input_grad)], reference.layer(*arguments)


class _InferenceContext:
    """Stands in for autograd's ctx when a layer's forward runs without autograd."""

    needs_input_grad: tuple[bool, ...] = ()


def cuda_autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The 16-bit dtype a CUDA tensor's layer runs in under `torch.autocast("cuda")` (float16,
    the default, or bfloat16), or None outside autocast."""
    if x.is_cuda and torch.is_autocast_enabled("cuda"):
        dtype = torch.get_autocast_dtype("cuda")
        if dtype in (torch.float16, torch.bfloat16):
            return dtype
    return None


def apply_layer(function: type[torch.autograd.Function], *args):
    """Run one layer Function (see `_apply_layer`). Under torch.compile the call goes through a
    `torch.compiler.disable`d copy: dynamo can't trace into Numba, so fastrnn runs eagerly there
    (a graph break). In eager mode that wrapper would only cost ~5 us a call."""
    if torch.compiler.is_compiling():
        return _apply_layer_eagerly()(function, *args)
    return _apply_layer(function, *args)


def _apply_layer(function: type[torch.autograd.Function], *args):
    """`function.apply(*args)`, or only its forward when no gradient can flow (no_grad or
    inference_mode, or nothing requires grad): autograd's bookkeeping costs ~30 us a call, a
    tenth of a batch-1 forward. Traced calls keep the Function so the trace records it.

    Under CUDA autocast, the layer runs as torch's cuDNN RNN does there: input, states and
    weights cast to the autocast dtype (differentiably, so float32 parameters get float32
    gradients), results in that dtype."""
    x = args[1] if type(args[0]) is str else args[0]  # after the cell kind, if one leads
    autocast_dtype = cuda_autocast_dtype(x) if isinstance(x, Tensor) else None
    if autocast_dtype is not None:
        cast = [
            a.to(autocast_dtype) if isinstance(a, Tensor) and a.is_floating_point() else a
            for a in args
        ]
        with torch.autocast("cuda", enabled=False):
            return _apply_layer(function, *cast)
    if (
        torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args)
    ) or torch.jit.is_tracing():
        return function.apply(*args)
    return function.forward(_InferenceContext(), *args)


@functools.cache
def _apply_layer_eagerly():
    """`_apply_layer` as a `torch.compiler.disable`d function, made on first use: making it
    imports torch._dynamo, 1.1 s of every process's `import fastrnn` when made at import (a
    process that compiles has imported it already)."""
    return torch.compiler.disable(_apply_layer)


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
    check_batch_sizes(batch_sizes, x)
    directions, rows_hidden = W_hh.shape[0], W_hh.shape[1]
    batch = int(batch_sizes[0])
    shapes = [W_ih.shape, W_hh.shape, *(state.shape for state in states)]
    expected = [
        (directions, rows_hidden, x.shape[1]),
        (directions, rows_hidden - rows_hidden % gates, state_sizes[0]),
        *((directions, batch, size) for size in state_sizes),
    ]
    check_shapes(("weight_ih", "weight_hh", "hx[0]", "hx[1]"), shapes, expected)


def check_batch_sizes(batch_sizes: np.ndarray, x: Tensor) -> None:
    """batch_sizes (T,) must describe x's rows: add up to them, non-negative, non-increasing."""
    problem = batch_sizes_problem(batch_sizes, int(x.shape[0]))  # a tensor while tracing
    if problem == 1:
        raise RuntimeError(
            f"fastrnn: batch_sizes add up to {int(batch_sizes.sum())}, input has {x.shape[0]} rows"
        )
    if problem:
        raise RuntimeError("fastrnn: batch_sizes must be non-negative and non-increasing")


def check_shapes(names: tuple[str, ...], shapes: list, expected: list) -> None:
    """Raise a RuntimeError naming the first of `shapes` that differs from its `expected` tuple
    (one list comparison when all match: a torch.Size equals the tuple of its ints)."""
    if shapes != expected:
        for name, got, shape in zip(names, shapes, expected, strict=False):
            if got != shape:
                raise RuntimeError(f"fastrnn: {name} has shape {list(got)}, expected {list(shape)}")


def _input_projection(x: Tensor, W_ih: Tensor, bias: Tensor | None, out: Tensor) -> None:
    """out (D, N, G*H) = x (N, I) @ W_ih[d]^T (+ bias[d]), one GEMM per direction over every
    step."""
    x, W_ih = x.detach(), W_ih.detach()
    for d in range(W_ih.shape[0]):
        if bias is None:
            torch.mm(x, W_ih[d].t(), out=out[d])
        else:
            torch.addmm(bias[d], x, W_ih[d].t(), out=out[d])


def _buffer(ctx, slot: str, shape: tuple[int, ...], like: Tensor, dtype=None) -> Tensor:
    """A tensor for values the backward needs, or, when no backward will run, a reused scratch
    buffer (`scratch`)."""
    if any(ctx.needs_input_grad):
        return like.new_empty(shape, dtype=dtype)
    return scratch(slot, shape, like, dtype)


def _features_side_by_side(y: Tensor) -> Tensor:
    """(D, N, P) -> contiguous (N, D * P) (a view for D = 1). With P = 1, `reshape` returned a
    strided view, and dropout draws its mask in memory order: the next layer's mask then
    differed from torch's (and the output wasn't contiguous, as torch's is)."""
    if y.shape[0] == 1:
        return y[0]
    return y.permute(1, 0, 2).reshape(y.shape[1], y.shape[0] * y.shape[2]).contiguous()


def _per_direction(dy: Tensor, directions: int) -> Tensor:
    """(N, D * P) -> contiguous (D, N, P)."""
    if directions == 1:
        return dy.contiguous().unsqueeze(0)
    return (
        dy.reshape(dy.shape[0], directions, dy.shape[1] // directions).permute(1, 0, 2).contiguous()
    )


def _product(a: Tensor, b: Tensor, more: Tensor | None = None, out: Tensor | None = None):
    """out (M, N) = a (M, K) @ b (K, N), or with `more` (K2, N) a (M, K + K2) @ [b; more]: a
    sequence-wide product of the backward, on the kernels' panels where the recurrence says they
    are faster (`recurrence_cpu.panel_product`), else on torch's GEMM."""
    if out is None:
        out = a.new_empty((a.shape[0], b.shape[1]))
    if not _recurrence(a).panel_product(a, b, more, out):
        torch.mm(a[:, : b.shape[0]], b, out=out)
        if more is not None:
            out.addmm_(a[:, b.shape[0] :], more)
    return out


def _input_grad(d_pre: Tensor, W_ih: Tensor) -> Tensor:
    """dx (N, I) = sum over directions of d_pre[d] (N, G*H) @ W_ih[d] (G*H, I)."""
    dx = _product(d_pre[0], W_ih[0].detach())
    for d in range(1, d_pre.shape[0]):
        dx.addmm_(d_pre[d], W_ih[d].detach())
    return dx


def _transposed_products(a: Tensor, b: Tensor) -> Tensor:
    """(D, G, P): a[d]^T (G, N) @ b[d] (N, P) for each direction (b 2-D: the same for all)."""
    out = a.new_empty((a.shape[0], a.shape[2], b.shape[-1]))
    for d in range(a.shape[0]):
        _product(a[d].t(), b[d] if b.dim() == 3 else b, out=out[d])
    return out


def _previous_states(directions: int, x: Tensor, batch_sizes: np.ndarray, width: int) -> Tensor:
    """The (D, N, width) buffer for the state each row consumed, which the backward kernels fill;
    empty (D, 0, width) for dense input where the kernels skip it (the CPU's) and
    `_recurrent_weight_grad` reads those states from y and h0 instead (no copy of N rows)."""
    dense = int(batch_sizes[0]) == int(batch_sizes[-1])
    rows = 0 if dense and _recurrence(x).DERIVES_DENSE_STATES else x.shape[0]
    return scratch("h_prev", (directions, rows, width), x)


def _recurrent_weight_grad(d_recurrent: Tensor, h_prev: Tensor, y: Tensor, h0: Tensor) -> Tensor:
    """dW_hh (D, G*H, P) = d_recurrent[d]^T (N, G*H)^T @ (the state each row consumed) (N, P).
    Those states are h_prev, or, when it is empty (dense input, see `_previous_states`), y one
    step back in each direction's processing order and h0 for its first step."""
    if h_prev.shape[1] > 0 or d_recurrent.shape[1] == 0:
        return _transposed_products(d_recurrent, h_prev)
    batch = h0.shape[1]
    y, h0 = y.detach(), h0.detach()
    grads = d_recurrent.new_empty((d_recurrent.shape[0], d_recurrent.shape[2], y.shape[2]))
    for d in range(d_recurrent.shape[0]):
        # in row order: forward, h0 then y up to the last step; reverse, y from the second
        # step then h0 (its first step is the last)
        consumed = (h0[d], y[d, :-batch]) if d == 0 else (y[d, batch:], h0[d])
        _product(d_recurrent[d].t(), *consumed, out=grads[d])
    return grads


def _weight_grads(
    ctx, d_input: Tensor, d_recurrent: Tensor, x: Tensor, h_prev: Tensor, W_ih, y=None, h0=None,
    gated: Tensor | None = None,
):  # fmt: skip
    """dx, dW_ih, dW_hh, db_ih, db_hh from the pre-activation gradients (D, N, G*H) on the input
    side and on the recurrent side (the same tensor for LSTM and RNN, whose two biases are
    summed; GRU's differ in the n block). h_prev: the states the rows consumed, or empty with
    y and h0 given (`_recurrent_weight_grad`). gated (D, N, G2*H): what W_hh's last G2*H rows
    multiplied instead of those states (the "reset before" GRU's r * h), or None."""
    need = ctx.needs_input_grad  # (cell, x, batch_sizes, h0, c0, W_ih, W_hh, ...)
    shared = d_recurrent is d_input
    dx = _input_grad(d_input, W_ih) if need[1] else None
    dW_ih = _transposed_products(d_input, x.detach()) if need[5] else None
    db_ih = d_input.sum(1) if ctx.has_bias else None
    if d_recurrent.shape[2] < d_input.shape[2]:
        # only the last block given (the GRU's n block, `kernels.cpu.gru.gru_backward`): the
        # rest is d_input's, which nothing reads any more, so it becomes the recurrent side
        d_input[:, :, d_input.shape[2] - d_recurrent.shape[2] :] = d_recurrent
        d_recurrent = d_input
    if need[6] and gated is not None:
        lead = d_recurrent.shape[2] - gated.shape[2]
        dW_hh = torch.cat(
            [
                _recurrent_weight_grad(d_recurrent[:, :, :lead], h_prev, y, h0),
                _transposed_products(d_recurrent[:, :, lead:], gated),
            ],
            1,
        )
    elif need[6]:
        dW_hh = _recurrent_weight_grad(d_recurrent, h_prev, y, h0)
    else:
        dW_hh = None
    if not ctx.has_bias:
        return dx, dW_ih, dW_hh, None, None
    db_hh = db_ih.clone() if shared else d_recurrent.sum(1)
    return dx, dW_ih, dW_hh, db_ih, db_hh


def _direction_axis(ctx, *weights: Tensor | None) -> list[Tensor | None]:
    """A layer's weights as (D, ...) stacks. A one-direction layer may pass its weights without
    the D axis (W_hh 2-D): adding it here, where autograd doesn't record it, saves the autograd
    view (~3 us each, plus a backward node) that stacking outside the Function cost a batch-1
    training step; `_gradients_as_given` takes it off their gradients again."""
    ctx.one_direction = weights[1] is not None and weights[1].dim() == 2
    if not ctx.one_direction:
        return list(weights)
    return [None if w is None else w.unsqueeze(0) for w in weights]


def _gradients_as_given(ctx, *grads: Tensor | None) -> tuple[Tensor | None, ...]:
    """Weight gradients shaped as the Function got the weights (see `_direction_axis`)."""
    if not ctx.one_direction:
        return grads
    return tuple(None if g is None else g[0] for g in grads)


def _states_like(*tensors: Tensor) -> list[Tensor]:
    return [torch.empty_like(t, memory_format=torch.contiguous_format) for t in tensors]


def _forward(ctx, recurrence, cell, x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, masks):
    """The layer of an LSTM, GRU (either form) or RNN on its kernels (`cells.SPECS[cell]`):
    -> (y (D, N, P), final states, gate cache, cell cache). The input projection of every step
    (with both biases summed; the GRU's b_hh stays apart for its n gate) goes where the kernel
    reads it: LSTM into the gate cache, which then keeps the activated gates, GRU into a
    buffer of its own (its cache keeps r, z, n and W_hn h + b_hn, or r * h reset before), RNN
    into y, which the kernel turns into the states (with zoneout a gate cache keeps the states
    before it). A kernel that fuses the projection (`fuses_input_projection`) gets x, W_ih and
    that bias instead."""
    spec = SPECS[cell]
    directions, rows, hidden = W_hh.shape[0], x.shape[0], W_hh.shape[1] // spec.gates
    width = W_hr.shape[1] if W_hr is not None else hidden
    states = (h0, c0)[: spec.states]
    _check_layer(x, batch_sizes, states, (width, hidden)[: spec.states], W_ih, W_hh, spec.gates)
    if W_hr is not None and tuple(W_hr.shape) != (directions, width, hidden):
        raise RuntimeError(f"fastrnn: weight_hr has shape {list(W_hr.shape)}")
    # outside autograd (forward runs under no_grad, or nothing requires grad)
    bias = b_ih if spec.gates == 3 or b_ih is None else b_ih + b_hh
    fused = recurrence.fuses_input_projection(batch_sizes, x, W_hh, h0)
    y = x.new_empty((directions, rows, width))
    finals = _states_like(*states)
    inputs = {"x": x, "W_ih": W_ih, "bias": bias} if fused else {}
    if masks is not None:
        inputs["masks"] = masks
    # rows of the caches only a backward reads (LSTM's cells, GRU's gates): none in inference
    # where the kernels can skip writing them (the CPU's: GRU B16 forward 4.97 -> 4.77 ms)
    training = any(ctx.needs_input_grad) or not recurrence.SKIPS_INFERENCE_CACHES
    cache_rows = rows if training else 0
    if cell == "lstm":
        # fused, the kernel only writes the activated gates, for a backward
        gates = _buffer(ctx, "gates", (directions, cache_rows if fused else rows, 4 * hidden), x)
        # 16-bit storage keeps LSTM's cell state in float32 (GPU path only)
        cell_dtype = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
        cells = _buffer(ctx, "cells", (directions, cache_rows, hidden), x, cell_dtype)
        if not fused:
            _input_projection(x, W_ih, bias, gates)
        recurrence.lstm_forward(batch_sizes, W_hh, W_hr, h0, c0, y, *finals, gates, cells, **inputs)
        return y, finals, gates, cells
    if spec.gates == 3:
        projected = _buffer(ctx, "projected", (directions, 0 if fused else rows, 3 * hidden), x)
        if not fused:
            _input_projection(x, W_ih, bias, projected)
        gates = _buffer(ctx, "gates", (directions, cache_rows, 4 * hidden), x)
        if cell == "gru_reset_before":
            inputs["reset_before"] = True
        b_hh = None if b_hh is None else b_hh.detach()
        recurrence.gru_forward(batch_sizes, W_hh, b_hh, h0, projected, y, *finals, gates, **inputs)
        return y, finals, gates, None
    if not fused:
        _input_projection(x, W_ih, bias, y)
    gates = None
    if masks is not None and masks[1] is not None:  # zoneout: act' needs the states before it
        gates = inputs["gate_cache"] = _buffer(ctx, "gates", (directions, cache_rows, hidden), x)
    recurrence.rnn_forward(batch_sizes, cell == "rnn_relu", W_hh, h0, y, *finals, **inputs)
    return y, finals, gates, None


def _backward(ctx, recurrence, x, h0, c0, W_hh, W_hr, y, dy, dh_n, dc_n):
    """-> (d_input, d_recurrent, h_prev, dh0, dc0, dW_hr) of an LSTM, GRU or RNN layer: the
    gate gradients on the input and on the recurrent side (one tensor where they are the
    same), the states each row consumed, the initial states' gradients and the projection's."""
    cell, sizes, gates = ctx.cell, ctx.batch_sizes, SPECS[ctx.cell].gates
    directions, rows, width = W_hh.shape[0], x.shape[0], h0.shape[2]
    hidden = W_hh.shape[1] // gates
    # dead once backward returns: reused buffers (see `scratch`)
    d_input = d_recurrent = scratch("d_gates", (directions, rows, gates * hidden), x)
    if ctx.masks is not None and ctx.masks[0] is not None:
        # recurrent dropout: the kernels write h_mask * h, the states W_hh read, on every row
        h_prev = scratch("h_prev", (directions, rows, width), x)
    else:
        h_prev = _previous_states(directions, x, sizes, width)
    dh0, *dc0 = _states_like(h0) if c0 is None else _states_like(h0, c0)
    masks = {} if ctx.masks is None else {"masks": ctx.masks}
    dW_hr = None
    if cell == "lstm":
        extra_rows = rows if W_hr is not None else 0
        dh_total = scratch("dh_total", (directions, extra_rows, width), x)
        h_raw = scratch("h_raw", (directions, extra_rows, hidden), x)
        recurrence.lstm_backward(
            sizes, W_hh, W_hr, h0, c0, y, ctx.gate_cache, ctx.cell_cache, dy, dh_n, dc_n,
            d_input, h_prev, dh_total, h_raw, dh0, *dc0, **masks,
        )  # fmt: skip
        if W_hr is not None:
            dW_hr = _transposed_products(dh_total, h_raw)
    elif gates == 3:
        # a kernel may write only the recurrent side's n block (the rest equals d_input's);
        # reset before, both sides' are the same (see `_weight_grads`' gated)
        before = cell == "gru_reset_before"
        narrow = before or recurrence.GRU_RECURRENT_N_ONLY
        shape = (directions, 0 if before else rows, hidden if narrow else 3 * hidden)
        recurrent = scratch("d_recurrent", shape, x)
        if before:
            masks["reset_before"] = True
        recurrence.gru_backward(
            sizes, W_hh, h0, y, ctx.gate_cache, dy, dh_n, h_prev, d_input, recurrent, dh0, **masks
        )
        d_recurrent = d_input if before else recurrent
    else:
        if masks and ctx.gate_cache is not None:
            masks["gate_cache"] = ctx.gate_cache
        relu = cell == "rnn_relu"
        recurrence.rnn_backward(sizes, relu, W_hh, h0, y, dy, dh_n, d_input, h_prev, dh0, **masks)
    return d_input, d_recurrent, h_prev, dh0, dc0[0] if dc0 else None, dW_hr


def _layernorm_lstm_forward(ctx, recurrence, x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, norms):
    """Layer-norm LSTM (`kernels/cpu/layernorm_lstm`): the input side's norm runs here over
    every step at once (torch's layer_norm: it doesn't depend on h), with every bias of the
    gates; the recurrence normalises the recurrent side and the cell. Kept for a backward: the
    input projection and its norm's moments (ctx.input_norm), the gate cache (its last row the
    constants the backward kernel reads) and the cells."""
    directions, rows, hidden = W_hh.shape[0], x.shape[0], W_hh.shape[1] // 4
    _check_layer(x, batch_sizes, (h0, c0), (hidden, hidden), W_ih, W_hh, 4)
    if norms is None or tuple(norms.shape) != (directions, 18 * hidden):
        shape = None if norms is None else list(norms.shape)
        raise RuntimeError(
            f"fastrnn: norms has shape {shape}, expected {[directions, 18 * hidden]}"
        )
    norms = norms.detach()
    gain_ih, bias_ih, gain_hh, bias_hh, gain_c, bias_c = norms.split(layernorm_widths(hidden), 1)
    width = 4 * hidden
    projected = x.new_empty((directions, rows, width))
    _input_projection(x, W_ih, None, projected)
    bias = bias_ih + bias_hh
    if b_ih is not None:
        bias = bias + b_ih.detach() + b_hh.detach()
    pre = x.new_empty((directions, rows, width))
    moments = []
    for d in range(directions):
        normed, mean, inv = torch.native_layer_norm(
            projected[d], (width,), gain_ih[d], bias[d], LAYERNORM_EPS
        )
        pre[d] = normed
        moments.append((mean, inv))
    consts = torch.cat([gain_hh, gain_c, bias_c], 1).contiguous()
    training = any(ctx.needs_input_grad) or not recurrence.SKIPS_INFERENCE_CACHES
    gate_cache = x.new_empty((directions, rows + 1 if training else 0, 9 * hidden + 2))
    if training:
        gate_cache[:, rows, : 6 * hidden] = consts
    cell_cache = x.new_empty((directions, rows if training else 0, hidden))
    y = x.new_empty((directions, rows, hidden))
    h_n, c_n = _states_like(h0, c0)
    recurrence.layernorm_lstm_forward(
        batch_sizes, W_hh, consts, h0, c0, pre, y, h_n, c_n, gate_cache, cell_cache
    )
    if any(ctx.needs_input_grad):
        ctx.input_norm = projected, moments
    return y, (h_n, c_n), gate_cache, cell_cache


def _layernorm_lstm_backward(ctx, recurrence, x, h0, c0, W_ih, W_hh, norms, y, dy, dh_n, dc_n):
    """-> (dx, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh, d_norms) of the layer-norm LSTM: the
    recurrence's gradients from its kernel, the input side's norm through torch's layer_norm
    backward, the gains' and biases' gradients as sums over rows of the cached normalised
    values."""
    directions, rows, hidden = W_hh.shape[0], x.shape[0], h0.shape[2]
    width = 4 * hidden
    d_input = x.new_empty((directions, rows, width))
    d_recurrent = x.new_empty((directions, rows, width))
    d_cell_norm = x.new_empty((directions, rows, hidden))
    h_prev = _previous_states(directions, x, ctx.batch_sizes, hidden)
    dh0, dc0 = _states_like(h0, c0)
    if dc_n is None:
        dc_n = torch.zeros_like(c0)
    recurrence.layernorm_lstm_backward(
        ctx.batch_sizes, W_hh, h0, c0, y, ctx.gate_cache, ctx.cell_cache, dy, dh_n, dc_n,
        d_input, d_recurrent, h_prev, d_cell_norm, dh0, dc0,
    )  # fmt: skip
    projected, moments = ctx.input_norm
    gain_ih = norms.detach().split(layernorm_widths(hidden), 1)[0]
    d_projected = torch.empty_like(projected)
    d_gain_ih = []
    for d in range(directions):
        mean, inv = moments[d]
        dp, dg, _ = torch.ops.aten.native_layer_norm_backward(
            d_input[d], projected[d], [width], mean, inv, gain_ih[d], None, [True, True, False]
        )
        d_projected[d] = dp
        d_gain_ih.append(dg)
    d_bias = d_input.sum(1)
    normed_hh = ctx.gate_cache[:, :rows, width : 2 * width]
    normed_c = ctx.gate_cache[:, :rows, 2 * width : 2 * width + hidden]
    d_norms = torch.cat(
        [
            torch.stack(d_gain_ih),
            d_bias,
            (d_input * normed_hh).sum(1),
            d_bias,
            (d_cell_norm * normed_c).sum(1),
            d_cell_norm.sum(1),
        ],
        1,
    )
    dx, dW_ih, dW_hh, _, _ = _weight_grads(ctx, d_projected, d_recurrent, x, h_prev, W_ih, y, h0)
    if not ctx.has_bias:
        return dx, dh0, dc0, dW_ih, dW_hh, None, None, d_norms
    return dx, dh0, dc0, dW_ih, dW_hh, d_bias, d_bias.clone(), d_norms


def _layer_masks(x: Tensor, h_mask, zone_h, zone_c) -> tuple | None:
    """The masks as the kernels take them (`recurrence_cpu`, `recurrence_cuda`), None when all
    are off. The CUDA kernels take float32 / float64 (the functional API runs the reference
    for 16-bit data)."""
    if h_mask is None and zone_h is None and zone_c is None:
        return None
    if _recurrence(x) is recurrence_cuda and x.dtype not in (torch.float32, torch.float64):
        raise RuntimeError("fastrnn: recurrent dropout and zoneout run float32 / float64 only")
    return tuple(None if m is None else m.detach().contiguous() for m in (h_mask, zone_h, zone_c))


def _padded(ctx, *gradients: Tensor | None) -> tuple[Tensor | None, ...]:
    """The gradients, one per argument the Function was given: None for the trailing ones that
    take none (norms of another cell, masks)."""
    return (*gradients, *(None,) * (len(ctx.needs_input_grad) - len(gradients)))


class LayerFunction(torch.autograd.Function):
    """(cell, x (N, I), batch_sizes, h0 (D, B, P), c0 (D, B, H) or None, W_ih, W_hh, b_ih,
    b_hh, W_hr[, norms, h_mask, zone_h, zone_c]) -> y (N, D * P), h_n (D, B, P)[, c_n (D, B, H)
    for the LSTMs]. cell: lstm, gru, gru_reset_before, rnn_tanh or rnn_relu (`cells.SPECS`),
    the arguments of `reference.layer` and `ops.layer`; or layernorm_lstm, which also takes
    norms (D, 18H), its norms' gains and biases (`cells.layernorm_widths`), and W_hr None (no
    projection). The masks, None when off (the defaults): recurrent dropout h_mask (D, B, P),
    zoneout zone_h (D, N, P), zone_c (D, N, H) (`reference.layer`); they take no gradient."""

    @staticmethod
    def forward(
        ctx, cell, x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, norms=None, h_mask=None,
        zone_h=None, zone_c=None,
    ):  # fmt: skip
        given, biases = (W_ih, W_hh, W_hr), (b_ih, b_hh)
        W_ih, W_hh, b_ih, b_hh, W_hr, stacked_norms = _direction_axis(
            ctx, W_ih, W_hh, b_ih, b_hh, W_hr, norms
        )
        recurrence = _recurrence(x)
        masks = _layer_masks(x, h_mask, zone_h, zone_c)
        if cell == "layernorm_lstm":
            run = _layernorm_lstm_forward(
                ctx, recurrence, x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, stacked_norms
            )
        else:
            run = _forward(
                ctx, recurrence, cell, x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, masks
            )
        y, states, gate_cache, cell_cache = run
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, h0, c0, *given, y, *biases, norms)
            _keep(ctx, cell, batch_sizes, gate_cache, cell_cache, b_ih is not None, masks)
        return (_features_side_by_side(y), *states)

    @staticmethod
    @double_backward_through(_reference_recompute)
    @once_differentiable
    def backward(ctx, dy, dh_n, dc_n=None):
        x, h0, c0, W_ih, W_hh, W_hr, y, _, _, norms = ctx.saved_tensors
        W_ih, W_hh, W_hr, norms = _direction_axis(ctx, W_ih, W_hh, W_hr, norms)
        recurrence = _recurrence(x)
        dy = _per_direction(dy, W_hh.shape[0])
        if ctx.cell == "layernorm_lstm":
            dx, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh, d_norms = _layernorm_lstm_backward(
                ctx, recurrence, x, h0, c0, W_ih, W_hh, norms, y, dy, dh_n, dc_n
            )
            weight_grads = _gradients_as_given(ctx, dW_ih, dW_hh, db_ih, db_hh, None, d_norms)
            return _padded(ctx, None, dx, None, dh0, dc0, *weight_grads)
        run = _backward(ctx, recurrence, x, h0, c0, W_hh, W_hr, y, dy, dh_n, dc_n)
        d_input, d_recurrent, h_prev, dh0, dc0, dW_hr = run
        gated = None
        if ctx.cell == "gru_reset_before":  # the cache's last block: r * h
            gated = ctx.gate_cache[:, :, 3 * h0.shape[2] :]
        dx, *weight_grads = _weight_grads(
            ctx, d_input, d_recurrent, x, h_prev, W_ih, y, h0, gated=gated
        )
        weight_grads = _gradients_as_given(ctx, *weight_grads, dW_hr)
        return _padded(ctx, None, dx, None, dh0, dc0, *weight_grads)


def _keep(ctx, cell, batch_sizes, gate_cache, cell_cache, has_bias: bool, masks) -> None:
    """What `LayerFunction.backward` reads besides the saved tensors."""
    ctx.cell, ctx.batch_sizes, ctx.has_bias, ctx.masks = cell, batch_sizes, has_bias, masks
    ctx.gate_cache, ctx.cell_cache = gate_cache, cell_cache


class _RecordingContext:
    """Stands in for autograd's ctx where a layer Function's forward and backward run outside
    autograd, as the halves of one op (`layer_forward`, `layer_backward`)."""

    def __init__(self, needs_input_grad: tuple[bool, ...]) -> None:
        self.needs_input_grad = needs_input_grad
        self.saved_tensors: tuple[Tensor | None, ...] = ()

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        self.saved_tensors = tensors


def layer_forward(
    cell: str, x: Tensor, batch_sizes: np.ndarray, h0: Tensor, c0: Tensor | None, W_ih: Tensor,
    W_hh: Tensor, b_ih: Tensor | None, b_hh: Tensor | None, W_hr: Tensor | None, training: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """`LayerFunction`'s forward as a plain function (the first half of the `fastrnn::layer`
    op): -> (y (N, D * P), h_n (D, B, P), c_n (D, B, H) (LSTM; else empty), gate_cache,
    cell_cache). With `training`, the caches are what `layer_backward` needs (LSTM: activated
    gates (D, N, 4H) and cells (D, N, H); GRU: gates (D, N, 4H); RNN: none), else empty; all
    fresh tensors (no scratch buffer leaves)."""
    ctx = _RecordingContext((training,) * 10)
    outputs = LayerFunction.forward(ctx, cell, x, batch_sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr)
    empty = x.new_empty(0)
    caches = (getattr(ctx, "gate_cache", None), getattr(ctx, "cell_cache", None))
    caches = [empty.clone() if c is None or not training else c for c in caches]
    return (outputs[0], outputs[1], outputs[2] if cell == "lstm" else empty, *caches)


def layer_backward(
    cell: str, dy: Tensor, dh_n: Tensor, dc_n: Tensor | None, x: Tensor, batch_sizes: np.ndarray,
    h0: Tensor, c0: Tensor | None, W_ih: Tensor, W_hh: Tensor, b_ih: Tensor | None,
    b_hh: Tensor | None, W_hr: Tensor | None, y: Tensor, gate_cache: Tensor, cell_cache: Tensor,
    needs: Sequence[bool],
) -> list[Tensor | None]:  # fmt: skip
    """The backward of `layer_forward` from its inputs, its output y (N, D * P) and caches:
    -> [dx, dh0, dc0, dW_ih, dW_hh, db_ih, db_hh, dW_hr], None where absent or not wanted;
    needs: whether each of x, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr wants its gradient."""
    directions = W_hh.shape[0] if W_hh.dim() == 3 else 1
    y_rows = y.unsqueeze(0) if directions == 1 else _per_direction(y, directions)
    need_x, need_h0, need_c0, *need_weights = needs
    ctx = _RecordingContext((False, need_x, False, need_h0, need_c0, *need_weights))
    ctx.save_for_backward(x, h0, c0, W_ih, W_hh, W_hr, y_rows, b_ih, b_hh, None)
    _keep(ctx, cell, batch_sizes, gate_cache, cell_cache, b_ih is not None, None)
    grads = (dy, dh_n, dc_n) if cell == "lstm" else (dy, dh_n)
    with torch.no_grad():
        _, dx, _, dh0, dc0, *weight_grads = _first_order_backward()(ctx, *grads)
    gradients = [dx, dh0, dc0, *weight_grads]
    return [g if want else None for g, want in zip(gradients, needs, strict=True)]


@functools.cache
def _first_order_backward():
    """`LayerFunction`'s kernel backward, without its double-backward and once-differentiable
    wrappers."""
    return inspect.unwrap(LayerFunction.backward)
