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
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import _VF, Tensor
from torch.autograd import forward_ad

from . import autograd as fastrnn_autograd
from .autograd import (
    LayerFunction,
    apply_layer,
    check_batch_sizes,
)
from .cell_functions import CellFunction
from .cells import SPECS
from .ops import layer as layer_op
from .recurrence_cuda import unavailable_reason
from .reference import layer as reference_layer
from .reference import step as reference_step

_TRANSFORM_REASON = (
    "fastrnn's kernels don't run under torch.func transforms (grad, vmap, jvp, ...) or "
    "forward-mode AD yet"
)
_warned: set[str] = set()
# The cell kinds torch has (`_VF`'s functions): anything else (fastrnn's own variants) runs the
# plain-torch reference where the kernels can't.
TORCH_KINDS = frozenset(("lstm", "gru", "rnn_tanh", "rnn_relu"))
REFERENCE = "the plain-torch reference (fastrnn.reference; torch has no such cell)"
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


def kernel_reason(input: Tensor, weights: Sequence[Tensor | None], hx=None) -> str | None:
    """Why fastrnn's kernels can't run this call (None if they can): a function transform
    (`transform_reason`), a device or dtype without kernels, autocast, or weights elsewhere.
    Runs on every module call that isn't plain: it keeps to cheap properties (`is_cpu` rather
    than `device.type`, which builds a string)."""
    reason = transform_reason(input, weights, hx)
    if reason is not None:
        return reason
    if input.is_cpu:
        device = "cpu"
    elif input.is_cuda:
        device = "cuda"
        reason = unavailable_reason()
        if reason is not None:
            return f"fastrnn can't run its CUDA kernels: {reason}"
    else:
        return f"fastrnn has no kernel for device '{input.device.type}'"
    dtypes = KERNEL_DTYPES[device]
    if input.dtype not in dtypes:
        return f"fastrnn has no {device.upper()} kernel for {input.dtype} yet"
    if torch.is_autocast_enabled(device):
        autocast_dtype = torch.get_autocast_dtype(device)
        if device == "cpu" or autocast_dtype not in (torch.float16, torch.bfloat16):
            return f"fastrnn does not run under {device.upper()} autocast to {autocast_dtype} yet"
    input_device = input.device
    for t in weights:
        if t is not None and (t.device != input_device or t.dtype not in dtypes):
            return f"fastrnn has no kernel for a {t.dtype} parameter on '{t.device}'"
    return None


def warn_fallback(who: str, reason: str, instead: str, stacklevel: int = 3) -> None:
    """Warn once per `who` and `reason` that `instead` (torch's implementation) runs."""
    key = f"{who}: {reason}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"{key}; running {instead} instead.", UserWarning, stacklevel=stacklevel)


def _torch_runs(
    name: str, input: Tensor, weights: Sequence[Tensor | None], hx, stacklevel: int = 4
) -> bool:
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
    # stacklevel: the frames warn_fallback, this, ..., the API function, its caller
    warn_fallback(f"fastrnn.functional.{name}", reason, f"torch._VF.{name}", stacklevel)
    return True


def _reference_runs(
    name: str, kind: str, input: Tensor, weights: Sequence[Tensor | None], hx, eager: bool = True
) -> bool | None:
    """Where the functional API's `name` (lstm, gru_cell, ...) runs this call: None for
    torch._VF's function of that name (`_torch_runs`, eager only), else whether the plain-torch
    reference runs: for a cell torch doesn't have, where the kernels can't (`kernel_reason`),
    warning once."""
    if kind in TORCH_KINDS:
        return None if eager and _torch_runs(name, input, weights, hx, 6) else False
    reason = kernel_reason(input, weights, hx)
    if reason is not None:
        warn_fallback(f"fastrnn.functional.{name}", reason, REFERENCE, 5)
    return reason is not None


def _time_major_rows(
    input: Tensor, batch_sizes: Tensor | None, batch_first: bool, compiled: bool = False
) -> tuple[Tensor, np.ndarray | Tensor]:
    """Input -> (rows (N, I) in packed time-major order, batch_sizes (T,) int64: a numpy
    array, or under torch.compile (`compiled`) a tensor, as dynamo records tensor code only)."""
    if batch_sizes is not None:
        if compiled:
            return input.contiguous(), batch_sizes
        return input.contiguous(), batch_sizes.detach().cpu().numpy().astype(np.int64)
    if batch_first:
        input = input.transpose(0, 1)
    steps, batch = input.shape[0], input.shape[1]
    if steps == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    rows = input.contiguous().reshape(steps * batch, input.shape[2])
    if compiled:
        return rows, torch.full((steps,), batch, dtype=torch.int64)
    return rows, _dense_batch_sizes(steps, batch)


@functools.lru_cache(maxsize=256)
def _dense_batch_sizes(steps: int, batch: int) -> np.ndarray:
    """batch_sizes of dense input, (steps,) all `batch`, made once per shape (np.full costs
    ~1.5 us of a batch-1 forward); nothing writes them."""
    return np.full(steps, batch, dtype=np.int64)


def _layer_weights(
    weights: Sequence[Tensor | None], has_biases: bool, layer_dir: int, has_proj: bool
) -> list[Tensor | None]:
    """[W_ih, W_hh, b_ih, b_hh, W_hr] of one layer-direction (None where absent)."""
    per = 2 + 2 * has_biases + has_proj
    first = layer_dir * per
    if has_biases:
        W_hr = weights[first + 4] if has_proj else None
        return [weights[first], weights[first + 1], weights[first + 2], weights[first + 3], W_hr]
    W_hr = weights[first + 2] if has_proj else None
    return [weights[first], weights[first + 1], None, None, W_hr]


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


def type_name(t: Tensor) -> str:
    """torch's name of t's scalar type, as its dtype errors print it (Float, Double, Long, ...)."""
    return t.type().rsplit(".", 1)[-1].removesuffix("Tensor")


class SequenceCall(NamedTuple):
    """One sequence call, validated and normalised once (by a module or by `sequence_call`):
    what `run_sequence` executes. rows (N, I) in packed time-major order, sizes (T,) int64
    batch sizes, states (L * D, B, P)[, LSTM c (L * D, B, H)], weights torch's flat list;
    dropout between layers (0.0 outside training); dense: the output is (T, B, D * P)
    (batch-first if asked) rather than rows."""

    kind: str
    rows: Tensor
    sizes: np.ndarray
    states: tuple[Tensor, ...]
    weights: Sequence[Tensor | None]
    has_biases: bool
    has_proj: bool
    num_layers: int
    bidirectional: bool
    dropout: float
    dense: bool
    batch_first: bool
    # (layer, its input rows) -> the layer Function's trailing arguments after W_hr (a variant's
    # norms, masks), or None: then one-step calls may run as cells
    extras: Callable[[int, Tensor], tuple] | None = None
    # under torch.compile: each layer is one `fastrnn::layer` op (`ops.layer`) and everything
    # around it tensor code that dynamo records (sizes a tensor, no Functions)
    compiled: bool = False


def sequence_call(
    kind: str,
    input: Tensor,
    batch_sizes: Tensor | None,
    states: tuple[Tensor, ...],
    weights: Sequence[Tensor | None],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
    compiled: bool = False,
) -> SequenceCall:
    """The `SequenceCall` of a call torch's own argument checks have passed (a module's, or
    `_VF`'s signature in the functional API), after the checks that torch's kernels make:
    the weight count, an empty sequence and the states' dtype and device."""
    if kind == "lstm" and len(states) != 2:
        raise RuntimeError("lstm expects two hidden states")
    # torch's rule: a projection makes h narrower than c (proj_size < hidden_size)
    has_proj = kind == "lstm" and states[0].shape[-1] != states[1].shape[-1]
    directions = 2 if bidirectional else 1
    _check_weight_count(weights, has_biases, has_proj, num_layers * directions)
    rows, sizes = _time_major_rows(input, batch_sizes, batch_first, compiled)  # T = 0 first
    _check_state_dtype(input, states)
    if batch_sizes is not None and sizes.shape[0] == 1 and not compiled:
        check_batch_sizes(sizes, rows)  # the layer Function checks longer ones
    return SequenceCall(
        kind, rows, sizes, states, weights, has_biases, has_proj, num_layers, bidirectional,
        dropout if train else 0.0, batch_sizes is None, batch_first, None, compiled,
    )  # fmt: skip


def run_sequence(call: SequenceCall, reference: bool = False) -> tuple[Tensor, ...]:
    """Run every layer and direction of a call: -> (output, *final states), on the kernels or
    (reference) on the plain-torch reference. A sequence of one step (without a projection,
    on the CPU) runs as a cell per direction (`_one_step`): the layer kernels would pack every
    weight for a single product."""
    (
        kind, rows, sizes, states, weights, has_biases, has_proj, num_layers, bidirectional,
        dropout, dense, batch_first, extras, compiled,
    ) = call  # fmt: skip
    directions = 2 if bidirectional else 1
    one_step = (
        sizes.shape[0] == 1 and not has_proj and not reference and extras is None
        and not compiled and _cell_kernels(rows)
    )  # fmt: skip
    layers = []  # each layer's new states (D, B, *)
    for layer in range(num_layers):
        first = layer * directions
        groups = [_layer_weights(weights, has_biases, first, has_proj)]
        if directions == 2:
            groups.append(_layer_weights(weights, has_biases, first + 1, has_proj))
        if compiled:
            layer_states = tuple(s[first : first + directions].contiguous() for s in states)
        elif num_layers > 1:
            layer_states = tuple(s[first : first + directions] for s in states)
        else:
            layer_states = states
        c0 = layer_states[1] if len(layer_states) == 2 else None
        if one_step:
            rows, new_states = _one_step(kind, rows, layer_states[0], c0, groups)
        else:
            if directions == 1:  # the layer Function takes one direction's weights as they are
                stacked = groups[0]
            else:
                stacked = [_stack_directions([w[i] for w in groups]) for i in range(5)]
            arguments = (kind, rows, sizes, layer_states[0], c0, *stacked)
            if extras is not None:
                arguments += extras(layer, rows)
            if compiled:
                tensors = [rows, *layer_states, *(w for w in stacked if w is not None)]
                training = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
                rows, h_n, c_n, _, _ = layer_op(*arguments, training)
                new_states = (h_n, c_n)[: len(layer_states)]
            elif reference:
                rows, *new_states = reference_layer(*arguments)
            else:
                rows, *new_states = apply_layer(LayerFunction, *arguments)
        layers.append(new_states)
        if dropout > 0 and layer < num_layers - 1:
            rows = F.dropout(rows, dropout, training=True)
    saved = directions == 1 and not one_step and not reference and not compiled
    output = _sequence_output(rows, sizes, saved, dense, batch_first)
    if num_layers == 1:
        return (output, *layers[0])
    return (output, *(torch.cat(states) for states in zip(*layers, strict=True)))


def compiling() -> bool:
    """Under torch.compile (not torch.export): the layers run as `ops.layer`, which a compiled
    graph holds as one opaque op."""
    return torch.compiler.is_compiling() and not _exporting()


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


def _one_step(
    kind: str, x: Tensor, h0: Tensor, c0: Tensor | None, groups: list[list[Tensor | None]]
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One step of a layer as its directions' cells (the cell Function): x (B, I), h0
    (D, B, H), c0 like it or None, groups [W_ih, W_hh, b_ih, b_hh, W_hr] per direction ->
    (y (B, D * H), new states (D, B, H)), y not sharing h_n's memory (as torch's results
    don't)."""
    steps = []
    for d, (W_ih, W_hh, b_ih, b_hh, _) in enumerate(groups):
        if c0 is None:
            steps.append((apply_layer(CellFunction, kind, x, h0[d], None, W_ih, W_hh, b_ih, b_hh),))
        else:
            steps.append(apply_layer(CellFunction, kind, x, h0[d], c0[d], W_ih, W_hh, b_ih, b_hh))
    if len(steps) == 1:  # torch.stack of one: the cheapest copy with a leading axis
        step = steps[0]
        if len(step) == 1:
            return step[0], (torch.stack(step),)
        return step[0], (torch.stack([step[0]]), torch.stack([step[1]]))
    y = torch.cat([step[0] for step in steps], 1)
    return y, tuple([torch.stack(states) for states in zip(*steps, strict=True)])


def checked_sequence(
    kind: str,
    input: Tensor,
    batch_sizes: Tensor | None,
    states: tuple[Tensor, ...],
    weights: Sequence[Tensor | None],
    has_biases: bool,
    num_layers: int,
    dropout: float,
    train: bool,
    bidirectional: bool,
    batch_first: bool,
    reference: bool = False,
    extras: Callable[[int, Tensor], tuple] | None = None,
) -> tuple[Tensor, ...]:
    """(output, *final states) of a call that torch's argument checks have passed, on
    fastrnn's kernels (`ops.layer` per layer under torch.compile, the layer Functions
    otherwise) or, as the caller decided, on the plain-torch reference. extras: as
    `SequenceCall`'s (a variant's layers take eagerly)."""
    call = sequence_call(
        kind, input, batch_sizes, states, weights, has_biases, num_layers, dropout, train,
        bidirectional, batch_first, not reference and extras is None and compiling(),
    )  # fmt: skip
    return run_sequence(call if extras is None else call._replace(extras=extras), reference)


def _sequence(
    kind: str,
    input: Tensor,
    hx,
    weights: Sequence[Tensor],
    flags: tuple[bool, int, float, bool, bool],
    batch_first: bool,
    batch_sizes: Tensor | None,
) -> tuple[Tensor, ...]:
    """The functional API's sequence call: torch._VF's where fastrnn hands it over
    (`_torch_runs`), for a cell torch doesn't have the plain-torch reference where the kernels
    can't run (`kernel_reason`, warning once), else `checked_sequence`. flags: (has_biases,
    num_layers, dropout, train, bidirectional)."""
    if kind == "lstm" and len(hx) != 2:
        raise RuntimeError("lstm expects two hidden states")
    reference = _reference_runs(kind, kind, input, weights, hx, not compiling())
    if reference is None:
        function = getattr(_VF, kind)
        if batch_sizes is None:
            return tuple(function(input, hx, weights, *flags, batch_first))
        return tuple(function(input, batch_sizes, hx, weights, *flags))
    states = (hx[0], hx[1]) if kind == "lstm" else (hx,)
    return checked_sequence(
        kind, input, batch_sizes, states, weights, *flags, batch_first, reference
    )


def lstm(
    input: Tensor, hx: tuple[Tensor, Tensor], weights: Sequence[Tensor], has_biases: bool,
    num_layers: int, dropout: float, train: bool, bidirectional: bool, batch_first: bool = False,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """Multi-layer LSTM (gates i, f, g, o); a projection is used when the weights include W_hr.

    Returns output, h_n (L * D, B, P), c_n (L * D, B, H). See the module docstring for layouts.
    """
    flags = (has_biases, num_layers, dropout, train, bidirectional)
    return _sequence("lstm", input, hx, weights, flags, batch_first, batch_sizes)


def gru(
    input: Tensor, hx: Tensor, weights: Sequence[Tensor], has_biases: bool, num_layers: int,
    dropout: float, train: bool, bidirectional: bool, batch_first: bool = False,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Multi-layer GRU, PyTorch's "reset after" form, gates r, z, n. Returns output, h_n."""
    flags = (has_biases, num_layers, dropout, train, bidirectional)
    return _sequence("gru", input, hx, weights, flags, batch_first, batch_sizes)


def rnn(
    input: Tensor, hx: Tensor, weights: Sequence[Tensor], has_biases: bool, num_layers: int,
    dropout: float, train: bool, bidirectional: bool, batch_first: bool = False,
    batch_sizes: Tensor | None = None, nonlinearity: str = "tanh",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Multi-layer Elman RNN with tanh or relu. Returns output, h_n."""
    kind = "rnn_relu" if nonlinearity == "relu" else "rnn_tanh"
    flags = (has_biases, num_layers, dropout, train, bidirectional)
    return _sequence(kind, input, hx, weights, flags, batch_first, batch_sizes)


def gru_reset_before(
    input: Tensor, hx: Tensor, weights: Sequence[Tensor], has_biases: bool, num_layers: int,
    dropout: float, train: bool, bidirectional: bool, batch_first: bool = False,
    batch_sizes: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Multi-layer GRU in the "reset before" form (gates r, z, n; n = tanh(W_in x + b_in +
    W_hn (r h) + b_hn)), arguments and layouts as `gru`'s (torch's weights). Returns output,
    h_n. Where the kernels can't run (`kernel_reason`), the plain-torch reference runs,
    warning once."""
    flags = (has_biases, num_layers, dropout, train, bidirectional)
    return _sequence("gru_reset_before", input, hx, weights, flags, batch_first, batch_sizes)


def _fits(
    input: Tensor,
    states: Sequence[Tensor],
    batch_shape: tuple[int, ...],
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    gates: int,
) -> bool:
    """Whether a call is shaped as the kernels take it, in one cheap pass: states of shape
    (*batch_shape, H), W_ih (G * H, I) for the input's I features, W_hh (G * H, H), both
    biases (G * H,) or neither, all of the input's dtype and device."""
    if not isinstance(input, Tensor) or input.dim() != len(batch_shape) + 1:
        return False
    if (b_ih is None) != (b_hh is None) or not isinstance(W_hh, Tensor):
        return False
    dtype, cpu = input.dtype, input.is_cpu
    hidden = W_hh.shape[-1]
    rows = gates * hidden
    state_shape = (*batch_shape, hidden)
    for state in states:
        if not isinstance(state, Tensor) or state.shape != state_shape or state.dtype != dtype:
            return False
        if (not state.is_cpu) if cpu else (state.device != input.device):
            return False
    for t in (W_ih, W_hh) if b_ih is None else (W_ih, W_hh, b_ih, b_hh):
        if not isinstance(t, Tensor) or t.dtype != dtype:
            return False
        if (not t.is_cpu) if cpu else (t.device != input.device):
            return False
    if W_ih.shape != (rows, input.shape[-1]) or W_hh.shape != (rows, hidden):
        return False
    return b_ih is None or (b_ih.shape == (rows,) and b_hh.shape == (rows,))  # type: ignore[union-attr]


def _plain(input: Tensor, states: Sequence[Tensor]) -> bool:
    """Whether a call may skip the full checks: a plain CPU float32 / float64 input and states
    (no subclass), and nothing active that hands calls to torch (a torch.func transform,
    forward-mode AD, torch.export, tracing, torch.compile, CPU autocast, the tests' CUDA
    hook)."""
    if type(input) is not Tensor or not input.is_cpu or input.dtype not in KERNEL_DTYPES["cpu"]:
        return False
    for state in states:
        if type(state) is not Tensor:
            return False
    return not (
        fastrnn_autograd.CUDA_KERNELS_ON_CPU
        or torch._C._are_functorch_transforms_active()
        or forward_ad._current_level >= 0
        or torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or _exporting()
        or torch.is_autocast_enabled("cpu")
    )


def plain_sequence_call(
    kind: str,
    input: Tensor,
    batch_first: bool,
    states: tuple[Tensor, ...],
    weights: Sequence[Tensor],
    has_biases: bool,
) -> SequenceCall | None:
    """The `SequenceCall` of a one-layer, one-direction module call without projection on
    dense input that the kernels take as it is (`_plain`, `_fits`): input (T, B, I), or
    (B, T, I) batch-first, with T and B >= 1, states (1, B, H), torch's flat weights of one
    layer. None for anything else, which the module then checks in full (its errors,
    fallbacks and warnings): a one-step call (streaming inference) spent ~80 us of its
    ~120-160 there."""
    if not _plain(input, states) or input.dim() != 3:
        return None
    steps, batch = (input.shape[1], input.shape[0]) if batch_first else input.shape[:2]
    if steps == 0 or batch == 0:
        return None
    biases = (weights[2], weights[3]) if has_biases else (None, None)
    if not _fits(input, states, (1, batch), weights[0], weights[1], *biases, SPECS[kind].gates):
        return None
    rows, sizes = _time_major_rows(input, None, batch_first)
    return SequenceCall(
        kind, rows, sizes, states, weights, has_biases, False, 1, False, 0.0, True, batch_first
    )


def plain_cell_call(
    kind: str,
    input: Tensor,
    states: Sequence[Tensor],
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
) -> bool:
    """Whether a batched cell call is what the cell kernels take as it is (`_plain`, `_fits`):
    input (B, I), states (B, H). The module then skips its full checks, which cost a one-row
    call ~20-40 us of the ~70 it took; anything else gets its errors, fallbacks and warnings
    from the full path."""
    if not _plain(input, states) or input.dim() != 2:
        return False
    return _fits(input, states, (input.shape[0],), W_ih, W_hh, b_ih, b_hh, SPECS[kind].gates)


def cell_step(
    kind: str,
    x: Tensor,
    h: Tensor,
    c: Tensor | None,
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    *extras: Tensor | None,
) -> tuple[Tensor, ...]:
    """One step of the cell `kind` on the kernels for x's device: x (B, I), h (B, H), c (B, H)
    (LSTMs) or None -> (h',) or (h', c'). The CPU runs the cell Function (torch GEMMs and fused
    gate math); CUDA tensors (and the tests' simulated GPU path), and a cell with extra layer
    arguments (`SequenceCall.extras`: the layer-norm LSTM's norms), a one-step layer."""
    if _cell_kernels(x) and not extras:
        result = apply_layer(CellFunction, kind, x, h, c, W_ih, W_hh, b_ih, b_hh)
        return result if kind == "lstm" else (result,)
    sizes = _dense_batch_sizes(1, x.shape[0])
    c0 = None if c is None else c[None]
    _, *states = apply_layer(
        LayerFunction, kind, x, sizes, h[None], c0, W_ih, W_hh, b_ih, b_hh, None, *extras
    )
    return tuple(state[0] for state in states)


def checked_cell(
    kind: str,
    input: Tensor,
    hx,
    states: Sequence[Tensor],
    weights: Sequence[Tensor | None],
    reference: bool = False,
) -> tuple[Tensor, ...]:
    """One step of a batched cell call, as the caller decided: `cell_step` on a call shaped as
    the kernels take it (`_fits`), else torch._VF's cell, which raises torch's own error or,
    where torch accepts the call (a broadcastable bias, an LSTM c of another dtype), computes
    torch's result, with a warning once; with `reference`, or for a cell torch doesn't have,
    the plain-torch reference step. hx: the states as the caller gave them; weights [W_ih,
    W_hh, b_ih, b_hh]."""
    batch = input.shape[:1] if isinstance(input, Tensor) else ()
    if not reference and _fits(input, states, batch, *weights, SPECS[kind].gates):
        return cell_step(kind, input, states[0], states[1] if kind == "lstm" else None, *weights)
    name = f"{kind}_cell"
    if not reference:
        instead = f"torch._VF.{name}" if kind in TORCH_KINDS else REFERENCE
        warn_fallback(f"fastrnn.functional.{name}", _MALFORMED_CELL, instead, 4)
    if kind not in TORCH_KINDS or reference:
        return reference_step(kind, input, states, weights)
    result = getattr(_VF, name)(input, hx, *weights)
    return result if kind == "lstm" else (result,)


_MALFORMED_CELL = (
    "fastrnn's cell kernels take (B, I) input, (B, H) states, weights and biases of their "
    "exact shapes, one dtype"
)


def _cell_kernels(input: Tensor) -> bool:
    """One step on the CPU runs the cell kernels (torch GEMMs + fused gate math); CUDA tensors
    (and the tests' simulated CUDA path) run the one-step layer path."""
    return input.is_cpu and not fastrnn_autograd.CUDA_KERNELS_ON_CPU


def check_lstm_cell_states(hx) -> None:
    """torch's errors for an LSTM cell's hx that isn't a pair of states."""
    if not isinstance(hx, (tuple, list)):
        raise TypeError(
            "lstm_cell(): argument 'hx' (position 2) must be tuple of Tensors, "
            f"not {type(hx).__name__}"
        )
    if len(hx) != 2:
        raise RuntimeError("lstm_cell expects two hidden states")


def _cell(kind: str, input: Tensor, hx, weights: tuple) -> Tensor | tuple[Tensor, Tensor]:
    """The functional API's cell call: torch._VF's where fastrnn hands it over (`_torch_runs`),
    for a cell torch doesn't have the reference step where the kernels can't run
    (`kernel_reason`, warning once), else `checked_cell`. -> h', or (h', c') for the LSTM."""
    name = f"{kind}_cell"
    if kind == "lstm":
        check_lstm_cell_states(hx)
    reference = _reference_runs(name, kind, input, weights, hx)
    if reference is None:
        return getattr(_VF, name)(input, hx, *weights)
    result = checked_cell(kind, input, hx, hx if kind == "lstm" else (hx,), weights, reference)
    return (result[0], result[1]) if kind == "lstm" else result[0]


def lstm_cell(
    input: Tensor, hx: tuple[Tensor, Tensor], W_ih: Tensor, W_hh: Tensor,
    b_ih: Tensor | None = None, b_hh: Tensor | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """One LSTM step: input (B, I), hx ((B, H), (B, H)) -> (h', c'), each (B, H)."""
    return _cell("lstm", input, hx, (W_ih, W_hh, b_ih, b_hh))


def gru_cell(
    input: Tensor, hx: Tensor, W_ih: Tensor, W_hh: Tensor, b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """One GRU step: input (B, I), hx (B, H) -> h' (B, H)."""
    return _cell("gru", input, hx, (W_ih, W_hh, b_ih, b_hh))


def rnn_cell(
    input: Tensor, hx: Tensor, W_ih: Tensor, W_hh: Tensor, b_ih: Tensor | None = None,
    b_hh: Tensor | None = None, nonlinearity: str = "tanh",
) -> Tensor:  # fmt: skip
    """One Elman RNN step with tanh or relu: input (B, I), hx (B, H) -> h' (B, H)."""
    kind = "rnn_relu" if nonlinearity == "relu" else "rnn_tanh"
    return _cell(kind, input, hx, (W_ih, W_hh, b_ih, b_hh))


def gru_reset_before_cell(
    input: Tensor, hx: Tensor, W_ih: Tensor, W_hh: Tensor, b_ih: Tensor | None = None,
    b_hh: Tensor | None = None,
) -> Tensor:  # fmt: skip
    """One step of the "reset before" GRU (see `gru_reset_before`): input (B, I), hx (B, H)
    -> h' (B, H); the plain-torch reference step where the kernels can't run, warning once."""
    return _cell("gru_reset_before", input, hx, (W_ih, W_hh, b_ih, b_hh))
