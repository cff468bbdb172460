"""Functional API: multi-layer, (bi)directional, dense or packed LSTM / GRU / RNN on fastrnn's
CPU kernels, with the same arguments and results as torch's `_VF.lstm / gru / rnn_tanh / rnn_relu`.

Shapes (T steps, B batch, I input, H hidden, P = proj_size or H, L layers, D = 2 if bidirectional):
    dense input (T, B, I), or (B, T, I) with batch_first; packed input: data (N, I) with
    batch_sizes (T,) (PackedSequence's, sorted by length);
    hx: (L * D, B, P) [LSTM: plus c (L * D, B, H)], row l * D + d for layer l, direction d;
    weights: torch's flat list, per layer-direction [W_ih, W_hh, (b_ih, b_hh), (W_hr)];
    output (T, B, D * P) (or batch_first / packed (N, D * P)), h_n like hx.
Dropout (training only) is `F.dropout` on every layer's output but the last, as torch does, so the
same RNG state gives the same masks as torch.nn.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import _VF, Tensor
from torch.autograd import forward_ad

from . import autograd as fastrnn_autograd
from . import reference
from .autograd import (
    LayerFunction,
    apply_layer,
    check_batch_sizes,
    check_shapes,
)
from .cell_functions import CellFunction
from .cells import gru_reset_before_step
from .ops import layer as layer_op

# One layer, all directions: (x (N, I), batch_sizes, states (D, B, *), weights stacked over the
# directions, or one direction's as they are) -> (y (N, D * P), new states (D, B, *))
LayerRunner = Callable[
    [Tensor, np.ndarray, tuple[Tensor, ...], Sequence[Tensor | None]],
    tuple[Tensor, tuple[Tensor, ...]],
]
# One layer of a one-step sequence, all directions: (x (B, I), states (D, B, *), per direction
# [W_ih, W_hh, b_ih, b_hh, W_hr]) -> (y (B, D * H), new states (D, B, *))
StepRunner = Callable[
    [Tensor, tuple[Tensor, ...], list[list[Tensor | None]]],
    tuple[Tensor, tuple[Tensor, ...]],
]


_TRANSFORM_REASON = (
    "fastrnn's kernels don't run under torch.func transforms (grad, vmap, jvp, ...) or "
    "forward-mode AD yet"
)
_warned: set[str] = set()
# The dtypes fastrnn has kernels for, per device (anything else runs torch's implementation).
KERNEL_DTYPES = {
    "cpu": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.float64, torch.float16, torch.bfloat16),
}


_EXPORT_REASON = (
    "torch.export can't record fastrnn's Numba kernels (an exported program runs without "
    "Python); the exported program gets torch's implementation"
)


def _exporting() -> bool:
    is_exporting = getattr(torch.compiler, "is_exporting", None)
    return is_exporting is not None and is_exporting()


def transform_reason(input: Tensor, weights: Sequence[Tensor | None], hx) -> str | None:
    """Why fastrnn can't run under a function transform: torch.func's (grad, vjp, jvp, vmap,
    jacrev, ...) wrap tensors that its autograd.Functions can't take, and forward-mode AD
    (dual tensors) needs a jvp they don't have; torch.export traces the model into a graph of
    torch ops, which Numba kernels can't be part of. torch's own implementation runs there.
    (Dual tensors are looked for only while a dual level is open.)"""
    if _exporting():
        return _EXPORT_REASON
    if torch._C._are_functorch_transforms_active():
        return _TRANSFORM_REASON
    if forward_ad._current_level >= 0 and any(
        isinstance(t, Tensor) and forward_ad.unpack_dual(t).tangent is not None
        for t in (input, *weights, *_state_tensors(hx))
    ):
        return _TRANSFORM_REASON
    return None


def _state_tensors(hx) -> list[Tensor]:
    """The tensors of an hx argument (a tensor, a tuple of them, or None)."""
    if isinstance(hx, Tensor):
        return [hx]
    if isinstance(hx, (tuple, list)):
        return [state for state in hx if isinstance(state, Tensor)]
    return []


def warn_fallback(who: str, reason: str, instead: str, stacklevel: int = 3) -> None:
    """Warn once per `who` and `reason` that `instead` (torch's implementation) runs."""
    key = f"{who}: {reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{key}; running {instead} instead.", UserWarning, stacklevel=stacklevel)


def _torch_runs(name: str, input: Tensor, weights: Sequence[Tensor | None], hx) -> bool:
    """Whether `name` (lstm, gru_cell, ...) hands this call to torch._VF's function of that
    name, warning once: under a function transform (`transform_reason`), or for a CPU input
    of a dtype without CPU kernels (float16, bfloat16; torch reports the ones it rejects)."""
    reason = transform_reason(input, weights, hx)
    if (
        reason is None
        and isinstance(input, Tensor)
        and _cell_kernels(input)
        and input.dtype not in KERNEL_DTYPES["cpu"]
    ):
        reason = f"fastrnn has no CPU kernel for {input.dtype}"
    if reason is None:
        return False
    # frames: warn_fallback, this, `_torch_sequence` / `_torch_cell`, the API function
    warn_fallback(f"fastrnn.functional.{name}", reason, f"torch._VF.{name}", 5)
    return True


def _torch_sequence(
    name: str,
    input: Tensor,
    hx,
    weights: Sequence[Tensor],
    flags: tuple,
    batch_first: bool,
    batch_sizes: Tensor | None,
) -> tuple[Tensor, ...] | None:
    """torch._VF's `name` (lstm, gru, rnn_tanh, rnn_relu) on the same arguments where fastrnn
    hands the call over (`_torch_runs`), else None; flags: (has_biases, num_layers, dropout,
    train, bidirectional)."""
    if not _torch_runs(name, input, weights, hx):
        return None
    function = getattr(_VF, name)
    if batch_sizes is None:
        return tuple(function(input, hx, weights, *flags, batch_first))
    return tuple(function(input, batch_sizes, hx, weights, *flags))


def _time_major_rows(
    input: Tensor, batch_sizes: Tensor | None, batch_first: bool
) -> tuple[Tensor, np.ndarray]:
    """Input -> (rows (N, I) in packed time-major order, batch_sizes as an int64 numpy array)."""
    if batch_sizes is not None:
        return input.contiguous(), batch_sizes.detach().cpu().numpy().astype(np.int64)
    if batch_first:
        input = input.transpose(0, 1)
    steps, batch = input.shape[0], input.shape[1]
    if steps == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    rows = input.contiguous().reshape(steps * batch, input.shape[2])
    return rows, _dense_batch_sizes(steps, batch)


@functools.lru_cache(maxsize=256)
def _dense_batch_sizes(steps: int, batch: int) -> np.ndarray:
    """batch_sizes of dense input, (steps,) all `batch`, made once per shape (np.full costs
    ~1.5 us of a batch-1 forward); nothing writes them."""
    return np.full(steps, batch, dtype=np.int64)


def _layer_weights(
    weights: Sequence[Tensor], has_biases: bool, layer_dir: int, has_proj: bool
) -> list[Tensor | None]:
    """[W_ih, W_hh, b_ih, b_hh, W_hr] of one layer-direction (None where absent)."""
    per = 2 + 2 * int(has_biases) + int(has_proj)
    chunk = list(weights[layer_dir * per : (layer_dir + 1) * per])
    W_ih, W_hh = chunk[0], chunk[1]
    b_ih, b_hh = (chunk[2], chunk[3]) if has_biases else (None, None)
    W_hr = chunk[-1] if has_proj else None
    return [W_ih, W_hh, b_ih, b_hh, W_hr]


def _check_state_dtype(input: Tensor, states: Sequence[Tensor]) -> None:
    """torch's error for a state whose dtype differs from the input's (and the weights')."""
    for state in states:
        if state.dtype != input.dtype:
            raise RuntimeError(
                "mat1 and mat2 must have the same dtype, but got "
                f"{type_name(state)} and {type_name(input)}"
            )
        if state.device != input.device:
            raise RuntimeError(
                "Input and hidden tensors are not at the same device, found input tensor at "
                f"{input.device} and hidden tensor at {state.device}"
            )


# torch's scalar type names, as its dtype errors print them
_TYPE_NAMES = {
    torch.float32: "Float",
    torch.float64: "Double",
    torch.float16: "Half",
    torch.bfloat16: "BFloat16",
    torch.int64: "Long",
    torch.int32: "Int",
    torch.int16: "Short",
    torch.int8: "Char",
    torch.uint8: "Byte",
    torch.bool: "Bool",
    torch.complex64: "ComplexFloat",
    torch.complex128: "ComplexDouble",
}


def type_name(t: Tensor) -> str:
    return _TYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch."))


def _stacked(
    run_layer: LayerRunner,
    run_step: StepRunner,
    input: Tensor,
    batch_sizes: Tensor | None,
    states: tuple[Tensor, ...],
    weights: Sequence[Tensor],
    has_biases: bool,
    has_proj: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
    kernels: bool = True,
) -> tuple[Tensor, ...]:
    """Run every layer and direction; returns (output, *final states). A sequence of one
    step (without a projection, on the CPU) runs as a cell per direction (`run_step`): the
    layer kernels would pack every weight for a single product (see `_one_step`). kernels
    False: the runners are the reference's, and no state is checked for them."""
    directions = 2 if bidirectional else 1
    _check_weight_count(weights, has_biases, has_proj, num_layers * directions)
    layer_input, sizes = _time_major_rows(input, batch_sizes, batch_first)  # torch: T = 0 first
    if kernels:
        _check_state_dtype(input, states)
    one_step = sizes.shape[0] == 1 and not has_proj and _cell_kernels(input)
    finals: list[list[Tensor]] = [[] for _ in states]
    for layer in range(num_layers):
        first = layer * directions
        per_direction = [
            _layer_weights(weights, has_biases, first + d, has_proj) for d in range(directions)
        ]
        layer_states = (
            states if num_layers == 1 else tuple(s[first : first + directions] for s in states)
        )
        if one_step:
            _check_one_step(layer_input, sizes, layer_states, per_direction)
            layer_input, new_states = run_step(layer_input, layer_states, per_direction)
        else:
            if directions == 1:  # the layer Functions take one direction's weights as they are
                stacked = per_direction[0]
            else:
                stacked = [_stack_directions([w[i] for w in per_direction]) for i in range(5)]
            layer_input, new_states = run_layer(layer_input, sizes, layer_states, stacked)
        for final, new in zip(finals, new_states, strict=True):
            final.append(new)
        if dropout > 0 and train and layer < num_layers - 1:
            layer_input = F.dropout(layer_input, dropout, training=True)
    output = _sequence_output(
        layer_input, sizes, directions == 1 and not one_step, batch_sizes is None, batch_first
    )
    return (output, *(final[0] if num_layers == 1 else torch.cat(final) for final in finals))


def compiling() -> bool:
    """Under torch.compile (not torch.export): the layers run as `ops.layer`, which a compiled
    graph holds as one opaque op."""
    return torch.compiler.is_compiling() and not _exporting()


def compiled_sequence(
    kind: str,
    input: Tensor,
    states: tuple[Tensor, ...],
    weights: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
    batch_sizes: Tensor | None,
) -> tuple[Tensor, ...]:
    """`_stacked` as torch.compile traces it: every layer is one `fastrnn::layer` op (kind:
    lstm, gru, rnn_tanh, rnn_relu), and everything around it is tensor code that dynamo
    records (no numpy, no Functions). Returns (output, *final states)."""
    directions = 2 if bidirectional else 1
    has_proj = kind == "lstm" and states[0].shape[-1] != states[1].shape[-1]
    _check_weight_count(weights, has_biases, has_proj, num_layers * directions)
    if batch_sizes is None:
        steps_first = input.transpose(0, 1) if batch_first else input
        steps, batch = steps_first.shape[0], steps_first.shape[1]
        if steps == 0:
            raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
        rows = steps_first.reshape(steps * batch, steps_first.shape[2]).contiguous()
        sizes = torch.full((steps,), batch, dtype=torch.int64)
    else:
        rows, sizes = input.contiguous(), batch_sizes
    _check_state_dtype(input, states)
    finals: list[list[Tensor]] = [[] for _ in states]
    for layer in range(num_layers):
        first = layer * directions
        per_direction = [
            _layer_weights(weights, has_biases, first + d, has_proj) for d in range(directions)
        ]
        if directions == 1:
            stacked = per_direction[0]
        else:
            stacked = [_stack_directions([w[i] for w in per_direction]) for i in range(5)]
        layer_states = [s[first : first + directions].contiguous() for s in states]
        tensors = [rows, *layer_states, *(w for w in stacked if w is not None)]
        training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
        c0 = layer_states[1] if kind == "lstm" else None
        y, h_n, c_n, _, _ = layer_op(kind, rows, sizes, layer_states[0], c0, *stacked, training)
        finals[0].append(h_n)
        if kind == "lstm":
            finals[1].append(c_n)
        rows = y
        if dropout > 0 and train and layer < num_layers - 1:
            rows = F.dropout(rows, dropout, training=True)
    output = rows
    if batch_sizes is None:
        output = output.view(steps, batch, output.shape[1])
        if batch_first:
            output = output.transpose(0, 1)
    return (output, *(final[0] if num_layers == 1 else torch.cat(final) for final in finals))


def _sequence_output(
    output: Tensor, sizes: np.ndarray, saved: bool, dense: bool, batch_first: bool
) -> Tensor:
    """The last layer's rows (N, D * P) as the module returns them: (T, B, D * P) for dense
    input (batch-first if asked), the rows for packed. `saved`: the rows are the output a layer
    Function saved for its backward, returned as a view: autograd would refuse an in-place
    change of it (`out += skip`, `relu_`), which torch.nn allows, so a graph-recording call gets
    a copy of its own (two directions' output is such a copy already; one step's comes from the
    cell Functions). Always while tracing: torch.jit.trace checks its graph again under
    no_grad."""
    if saved and (output.requires_grad or torch.jit.is_tracing()):
        output = output.clone()
    if dense:
        output = output.view(sizes.shape[0], -1, output.shape[1])
        if batch_first:
            output = output.transpose(0, 1)
    return output


def _check_weight_count(
    weights: Sequence[Tensor], has_biases: bool, has_proj: bool, layer_directions: int
) -> None:
    """torch's check of the flat weight list (its messages): a whole number of per
    layer-direction groups [W_ih, W_hh, (b_ih, b_hh), (W_hr)], one group each. (Reached
    through the functional API; the modules always pass their own complete list.)"""
    stride = 2 + 2 * int(has_biases) + int(has_proj)
    if len(weights) % stride:
        raise RuntimeError(
            f"MatrixRef: ArrayRef size {len(weights)} not divisible by stride {stride}"
        )
    if len(weights) != stride * layer_directions:
        raise RuntimeError("got an incorrect number of RNN parameters")


def _stack_directions(tensors: list[Tensor | None]) -> Tensor | None:
    """One weight of both directions of a layer -> (2, ...)."""
    if tensors[0] is None:
        return None
    return torch.stack(tensors)  # type: ignore[arg-type]


def _check_one_step(
    x: Tensor, sizes: np.ndarray, states: tuple[Tensor, ...], weights: list[list[Tensor | None]]
) -> None:
    """The layer path's checks (`autograd._check_layer`) where a one-step layer runs as cells,
    whose kernels index by these shapes without bounds checks."""
    check_batch_sizes(sizes, x)
    hidden = weights[0][1].shape[1]  # W_hh (G * H, H)
    for W_ih, W_hh, *_ in weights:
        rows = W_hh.shape[0]
        check_shapes(
            ("weight_ih", "weight_hh"),
            [W_ih.shape, W_hh.shape],
            [(rows, x.shape[1]), (rows, hidden)],
        )
    check_shapes(
        ("hx[0]", "hx[1]"),
        [state.shape for state in states],
        [(len(weights), x.shape[0], hidden)] * len(states),
    )


def _one_step(outputs: list[Tensor]) -> tuple[Tensor, Tensor]:
    """Each direction's h' (B, H) -> (y (B, D * H), h_n (D, B, H)), y not sharing h_n's memory
    (as torch's results don't). One step as cells: LSTM T1 B1 forward 1.8x, B16 1.4x faster
    than the layer kernels, GRU 1.6x, RNN 1.8-2.3x; fwd+bwd 1.25-1.5x (same process)."""
    y = outputs[0] if len(outputs) == 1 else torch.cat(outputs, 1)
    return y, torch.stack(outputs)


@functools.cache
def _step_runner(kind: str) -> StepRunner:
    """The `StepRunner` of a cell kind: its cell Function per direction (`plain_cell_step`)."""

    def run(x, states, weights):
        h0 = states[0]
        if kind == "lstm":
            c0 = states[1]
            results = [
                apply_layer(CellFunction, kind, x, h0[d], c0[d], *w[:4])
                for d, w in enumerate(weights)
            ]
            y, h_n = _one_step([h for h, _ in results])
            return y, (h_n, torch.stack([c for _, c in results]))
        y, h_n = _one_step(
            [apply_layer(CellFunction, kind, x, h0[d], None, *w[:4]) for d, w in enumerate(weights)]
        )
        return y, (h_n,)

    return run


@functools.cache
def _layer_runner(kind: str) -> LayerRunner:
    """The `LayerRunner` of a cell kind: its layer Function on the layer's states."""

    def run(x, sizes, states, w):
        c0 = states[1] if len(states) == 2 else None
        y, *new_states = apply_layer(LayerFunction, kind, x, sizes, states[0], c0, *w)
        return y, tuple(new_states)

    return run


def _layer_steps(run_layer: LayerRunner) -> StepRunner:
    """A `StepRunner` from a `LayerRunner`: each direction's layer on the one step."""

    def run(x, states, weights):
        sizes = np.full(1, x.shape[0], dtype=np.int64)
        outputs = [run_layer(x, sizes, (states[0][d : d + 1],), w) for d, w in enumerate(weights)]
        return _one_step([h_n[0][0] for _, h_n in outputs])[0], (
            torch.cat([h_n[0] for _, h_n in outputs]),
        )

    return run


@functools.cache
def _reference_runner(kind: str) -> LayerRunner:
    """The `LayerRunner` of a cell kind on the plain-torch reference (`reference.layer`): the
    reset-before GRU where its kernels can't run (torch has no such cell to fall back to)."""

    def run(x, sizes, states, w):
        c0 = states[1] if len(states) == 2 else None
        y, *new_states = reference.layer(kind, x, sizes, states[0], c0, *w)
        return y, tuple(new_states)

    return run


def gru_reset_before(
    input: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool = False,
    batch_sizes: Tensor | None = None,
    reason: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Multi-layer GRU in the "reset before" form (gates r, z, n; n = tanh(W_in x + b_in +
    W_hn (r h) + b_hn)), arguments and layouts as `gru`'s (torch's weights). Returns output,
    h_n. Where the kernels can't run (a function transform, torch.export, a dtype or device
    without kernels: `reason`, or found here), the plain-torch reference runs, warning once."""
    warn = reason is None  # a caller that gives the reason has warned
    if reason is None:
        reason = transform_reason(input, weights, hx)
    if reason is None and input.is_cpu and input.dtype not in KERNEL_DTYPES["cpu"]:
        reason = f"fastrnn has no CPU kernel for {input.dtype}"
    if reason is None and not (input.is_cpu or input.is_cuda):
        reason = f"fastrnn has no {input.device.type.upper()} kernel of this cell yet"
    if reason is None and compiling():
        output, h_n = compiled_sequence(
            "gru_reset_before", input, (hx,), weights, has_biases, num_layers, dropout, train,
            bidirectional, batch_first, batch_sizes,
        )  # fmt: skip
        return output, h_n
    kind = "gru_reset_before"
    if reason is None:
        run_layer, run_step = _layer_runner(kind), _step_runner(kind)
    else:
        if warn:
            who = "fastrnn.functional.gru_reset_before"
            warn_fallback(who, reason, "the plain-torch reference (fastrnn.reference)", 3)
        run_layer = _reference_runner(kind)
        run_step = _layer_steps(run_layer)
    output, h_n = _stacked(
        run_layer, run_step, input, batch_sizes, (hx,), weights, has_biases, False, num_layers,
        dropout, train, bidirectional, batch_first, kernels=reason is None,
    )  # fmt: skip
    return output, h_n


def lstm(
    input: Tensor,
    hx: tuple[Tensor, Tensor],
    weights: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool = False,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Multi-layer LSTM (gates i, f, g, o); a projection is used when the weights include W_hr.

    Returns output, h_n (L * D, B, P), c_n (L * D, B, H). See the module docstring for layouts.
    """
    if len(hx) != 2:
        raise RuntimeError("lstm expects two hidden states")
    if compiling():
        output, h_n, c_n = compiled_sequence(
            "lstm", input, (hx[0], hx[1]), weights, has_biases, num_layers, dropout, train,
            bidirectional, batch_first, batch_sizes,
        )  # fmt: skip
        return output, h_n, c_n
    flags = (has_biases, num_layers, dropout, train, bidirectional)
    by_torch = _torch_sequence("lstm", input, hx, weights, flags, batch_first, batch_sizes)
    if by_torch is not None:
        output, h_n, c_n = by_torch
        return output, h_n, c_n
    # torch's rule: a projection makes h narrower than c (proj_size < hidden_size)
    has_proj = hx[0].shape[-1] != hx[1].shape[-1]
    output, h_n, c_n = _stacked(
        _layer_runner("lstm"),
        _step_runner("lstm"),
        input,
        batch_sizes,
        (hx[0], hx[1]),
        weights,
        has_biases,
        has_proj,
        num_layers,
        dropout,
        train,
        bidirectional,
        batch_first,
    )
    return output, h_n, c_n


def gru(
    input: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool = False,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Multi-layer GRU, PyTorch's "reset after" form, gates r, z, n. Returns output, h_n."""
    if compiling():
        output, h_n = compiled_sequence(
            "gru", input, (hx,), weights, has_biases, num_layers, dropout, train,
            bidirectional, batch_first, batch_sizes,
        )  # fmt: skip
        return output, h_n
    flags = (has_biases, num_layers, dropout, train, bidirectional)
    by_torch = _torch_sequence("gru", input, hx, weights, flags, batch_first, batch_sizes)
    if by_torch is not None:
        output, h_n = by_torch
        return output, h_n
    output, h_n = _stacked(
        _layer_runner("gru"),
        _step_runner("gru"),
        input,
        batch_sizes,
        (hx,),
        weights,
        has_biases,
        False,
        num_layers,
        dropout,
        train,
        bidirectional,
        batch_first,
    )
    return output, h_n


def rnn(
    input: Tensor,
    hx: Tensor,
    weights: Sequence[Tensor],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool = False,
    batch_sizes: Tensor | None = None,
    nonlinearity: str = "tanh",
) -> tuple[Tensor, Tensor]:
    """Multi-layer Elman RNN with tanh or relu. Returns output, h_n."""
    relu = nonlinearity == "relu"
    name = "rnn_relu" if relu else "rnn_tanh"
    if compiling():
        output, h_n = compiled_sequence(
            name, input, (hx,), weights, has_biases, num_layers, dropout, train,
            bidirectional, batch_first, batch_sizes,
        )  # fmt: skip
        return output, h_n
    flags = (has_biases, num_layers, dropout, train, bidirectional)
    by_torch = _torch_sequence(name, input, hx, weights, flags, batch_first, batch_sizes)
    if by_torch is not None:
        output, h_n = by_torch
        return output, h_n
    output, h_n = _stacked(
        _layer_runner(name),
        _step_runner(name),
        input,
        batch_sizes,
        (hx,),
        weights,
        has_biases,
        False,
        num_layers,
        dropout,
        train,
        bidirectional,
        batch_first,
    )
    return output, h_n


def _well_formed_cell(
    input: Tensor,
    states: Sequence[Tensor],
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    gates: int,
) -> bool:
    """Whether a cell call is what the cell kernels take: input (B, I), states (B, H), W_ih
    (G*H, I), W_hh (G*H, H), both biases (G*H,) or neither, one dtype and device throughout.
    Anything else goes to torch._VF's cell (`_torch_cell`), which raises torch's own error
    or, where torch accepts it (a broadcastable bias, an LSTM c of another dtype), computes
    torch's result."""
    tensors = (input, *states, W_ih, W_hh)
    if (b_ih is None) != (b_hh is None):
        return False
    biases = () if b_ih is None else (b_ih, b_hh)
    if not all(isinstance(t, Tensor) for t in (*tensors, *biases)):
        return False
    if input.dim() != 2 or W_ih.dim() != 2 or W_hh.dim() != 2:
        return False
    batch, inputs = input.shape
    hidden = W_hh.shape[1]
    rows = gates * hidden
    if W_ih.shape != (rows, inputs) or W_hh.shape[0] != rows:
        return False
    if any(state.shape != (batch, hidden) for state in states):
        return False
    if any(bias.shape != (rows,) for bias in biases):
        return False
    dtype, device = W_ih.dtype, input.device
    return all(t.dtype == dtype and t.device == device for t in (*tensors, *biases))


def _plain_arguments(
    input: Tensor,
    inputs: int,
    states: Sequence[Tensor],
    state_shape: tuple[int, ...],
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    gates: int,
) -> bool:
    """The checks `plain_cell_call` and `plain_sequence_call` share: a plain CPU float32 /
    float64 input, states of `state_shape` and the input's dtype, weights of their exact
    shapes (`inputs` features, G * H rows) and dtype, and nothing active that hands calls to
    torch (a torch.func transform, forward-mode AD, torch.export, tracing, torch.compile, CPU
    autocast, the tests' CUDA hook)."""
    if type(input) is not Tensor or not input.is_cpu:
        return False
    dtype = input.dtype
    if dtype not in KERNEL_DTYPES["cpu"] or fastrnn_autograd.CUDA_KERNELS_ON_CPU:
        return False
    for state in states:
        if type(state) is not Tensor or state.dtype != dtype or not state.is_cpu:
            return False
        if state.shape != state_shape:
            return False
    hidden = state_shape[-1]
    rows = gates * hidden
    for weight, shape in ((W_ih, (rows, inputs)), (W_hh, (rows, hidden))):
        if not isinstance(weight, Tensor) or weight.dtype != dtype or not weight.is_cpu:
            return False
        if weight.shape != shape:
            return False
    if (b_ih is None) != (b_hh is None):
        return False
    for bias in () if b_ih is None else (b_ih, b_hh):
        if not isinstance(bias, Tensor) or bias.dtype != dtype or not bias.is_cpu:
            return False
        if bias.shape != (rows,):
            return False
    return not (
        torch._C._are_functorch_transforms_active()
        or forward_ad._current_level >= 0
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or _exporting()
        or torch.is_autocast_enabled("cpu")
    )


def plain_cell_call(
    input: Tensor,
    states: Sequence[Tensor],
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    gates: int,
) -> bool:
    """Whether a cell call is the plain case the cell kernels take as it is, checked in one
    cheap pass (`_plain_arguments`): input (B, I), states (B, H). The cells then skip the full
    checks (`_torch_cell`, the modules' fallback checks), which cost a one-row call ~20-40 us
    of the ~70 it took; anything else takes the full path and gets its errors, fallbacks and
    warnings there."""
    if type(input) is not Tensor or input.dim() != 2 or not isinstance(W_hh, Tensor):
        return False
    batch, inputs = input.shape
    state_shape = (batch, W_hh.shape[-1])
    return _plain_arguments(input, inputs, states, state_shape, W_ih, W_hh, b_ih, b_hh, gates)


def plain_sequence_call(
    input: Tensor,
    batch_first: bool,
    states: Sequence[Tensor],
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    gates: int,
) -> bool:
    """Whether a call of a one-layer, one-direction module without projection is the plain
    case (`_plain_arguments`): dense input (T, B, I), or (B, T, I) batch-first, with T and B
    >= 1, states (1, B, H). The module then skips its full checks and fallbacks
    (`plain_sequence`): a one-step call (streaming inference) spent ~80 us of its ~120-160
    there."""
    if type(input) is not Tensor or input.dim() != 3 or not isinstance(W_hh, Tensor):
        return False
    steps, batch = (input.shape[1], input.shape[0]) if batch_first else input.shape[:2]
    if steps == 0 or batch == 0:
        return False
    state_shape = (1, batch, W_hh.shape[-1])
    inputs = input.shape[2]
    return _plain_arguments(input, inputs, states, state_shape, W_ih, W_hh, b_ih, b_hh, gates)


def plain_sequence(
    kind: str,
    input: Tensor,
    batch_first: bool,
    states: tuple[Tensor, ...],
    weights: Sequence[Tensor | None],
) -> tuple[Tensor, ...]:
    """(output, *final states) of a call `plain_sequence_call` accepted, for the cell `kind`
    (lstm, gru, rnn_tanh, rnn_relu): what `_stacked` computes for one layer and direction."""
    layer_input, sizes = _time_major_rows(input, None, batch_first)
    one_step = sizes.shape[0] == 1
    layer_weights = [*weights, None]
    run_layer, run_step = _layer_runner(kind), _step_runner(kind)
    if one_step:
        output, new_states = run_step(layer_input, states, [layer_weights])
    else:
        output, new_states = run_layer(layer_input, sizes, states, layer_weights)
    return (_sequence_output(output, sizes, not one_step, True, batch_first), *new_states)


def plain_cell_step(
    kind: str, input: Tensor, states: Sequence[Tensor], weights: Sequence[Tensor | None]
) -> tuple[Tensor, ...]:
    """One step of the cell `kind` (lstm, gru, gru_reset_before, rnn_tanh, rnn_relu) on the
    cell kernels, for a call `plain_cell_call` accepted: the new state(s) as a tuple."""
    if kind == "lstm":
        return apply_layer(CellFunction, kind, input, states[0], states[1], *weights)
    return (apply_layer(CellFunction, kind, input, states[0], None, *weights),)


def _torch_cell(name: str, input: Tensor, hx, states: Sequence[Tensor], weights: tuple, gates: int):
    """torch._VF's `name` cell on a call fastrnn hands over, else None: under a function
    transform or for a dtype without CPU kernels (`_torch_runs`), and any call the cell
    kernels don't take as it is (`_well_formed_cell`), which gets torch's error or, where
    torch accepts the call, its result, with a warning once."""
    cell = getattr(_VF, name)
    if _torch_runs(name, input, weights, hx):
        return cell(input, hx, *weights)
    if _well_formed_cell(input, states, *weights, gates):
        return None
    result = cell(input, hx, *weights)
    warn_fallback(
        f"fastrnn.functional.{name}",
        "fastrnn's cell kernels take (B, I) input, (B, H) states, weights and biases of "
        "their exact shapes, one dtype",
        f"torch._VF.{name}",
        4,
    )
    return result


def _cell_kernels(input: Tensor) -> bool:
    """One step on the CPU runs the cell kernels (torch GEMMs + fused gate math); CUDA tensors
    (and the tests' simulated CUDA path) run the one-step layer path."""
    return input.is_cpu and not fastrnn_autograd.CUDA_KERNELS_ON_CPU


def lstm_cell(
    input: Tensor,
    hx: tuple[Tensor, Tensor],
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """One LSTM step: input (B, I), hx ((B, H), (B, H)) -> (h', c'), each (B, H)."""
    if not isinstance(hx, (tuple, list)):
        raise TypeError(
            "lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, "
            f"not {type(hx).__name__}"
        )
    if len(hx) != 2:
        raise RuntimeError("lstm_cell expects two hidden states")
    by_torch = _torch_cell("lstm_cell", input, hx, hx, (W_ih, W_hh, b_ih, b_hh), 4)
    if by_torch is not None:
        h, c = by_torch
        return h, c
    if _cell_kernels(input):
        return apply_layer(CellFunction, "lstm", input, hx[0], hx[1], W_ih, W_hh, b_ih, b_hh)
    sizes = np.ones(1, dtype=np.int64) * input.shape[0]
    _, h_n, c_n = apply_layer(
        LayerFunction,
        "lstm",
        input,
        sizes,
        hx[0].unsqueeze(0),
        hx[1].unsqueeze(0),
        W_ih,
        W_hh,
        b_ih,
        b_hh,
        None,
    )
    return h_n[0], c_n[0]


def gru_cell(
    input: Tensor,
    hx: Tensor,
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:
    """One GRU step: input (B, I), hx (B, H) -> h' (B, H)."""
    by_torch = _torch_cell("gru_cell", input, hx, (hx,), (W_ih, W_hh, b_ih, b_hh), 3)
    if by_torch is not None:
        return by_torch
    if _cell_kernels(input):
        return apply_layer(CellFunction, "gru", input, hx, None, W_ih, W_hh, b_ih, b_hh)
    sizes = np.ones(1, dtype=np.int64) * input.shape[0]
    h0 = hx.unsqueeze(0)
    _, h_n = apply_layer(LayerFunction, "gru", input, sizes, h0, None, W_ih, W_hh, b_ih, b_hh, None)
    return h_n[0]


def gru_reset_before_cell(
    input: Tensor,
    hx: Tensor,
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    reason: str | None = None,
) -> Tensor:
    """One step of the "reset before" GRU (see `gru_reset_before`): input (B, I), hx (B, H)
    -> h' (B, H), on the cell kernels (CUDA tensors of the simulator's tests: the layer
    kernels on one step); the plain-torch reference step where they can't run (`reason`, or a
    function transform, device or dtype found here), warning once."""
    warn = reason is None  # a caller that gives the reason has warned
    if reason is None:
        reason = transform_reason(input, (W_ih, W_hh), hx)
    if reason is None and input.is_cpu and input.dtype not in KERNEL_DTYPES["cpu"]:
        reason = f"fastrnn has no CPU kernel for {input.dtype}"
    if reason is None and not (input.is_cpu or input.is_cuda):
        reason = f"fastrnn has no {input.device.type.upper()} kernel of this cell yet"
    if reason is not None:
        if warn:
            who = "fastrnn.functional.gru_reset_before_cell"
            warn_fallback(who, reason, "the plain-torch reference (fastrnn.reference)", 3)
        return gru_reset_before_step(input, (hx,), W_ih, W_hh, b_ih, b_hh, None)[0]
    _check_state_dtype(input, (hx,))
    if _cell_kernels(input):
        return apply_layer(
            CellFunction, "gru_reset_before", input, hx, None, W_ih, W_hh, b_ih, b_hh
        )
    sizes = np.ones(1, dtype=np.int64) * input.shape[0]
    h0 = hx.unsqueeze(0)
    _, h_n = apply_layer(
        LayerFunction, "gru_reset_before", input, sizes, h0, None, W_ih, W_hh, b_ih, b_hh, None
    )
    return h_n[0]


def rnn_cell(
    input: Tensor,
    hx: Tensor,
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
    nonlinearity: str = "tanh",
) -> Tensor:
    """One Elman RNN step with tanh or relu: input (B, I), hx (B, H) -> h' (B, H)."""
    relu = nonlinearity == "relu"
    name = "rnn_relu_cell" if relu else "rnn_tanh_cell"
    by_torch = _torch_cell(name, input, hx, (hx,), (W_ih, W_hh, b_ih, b_hh), 1)
    if by_torch is not None:
        return by_torch
    if _cell_kernels(input):
        return apply_layer(CellFunction, name[:-5], input, hx, None, W_ih, W_hh, b_ih, b_hh)
    sizes = np.ones(1, dtype=np.int64) * input.shape[0]
    _, h_n = apply_layer(
        LayerFunction, name[:-5], input, sizes, hx.unsqueeze(0), None, W_ih, W_hh, b_ih, b_hh, None
    )
    return h_n[0]
