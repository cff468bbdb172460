"""Drop-in replacements of torch.nn.LSTM / GRU / RNN and their cells.

Each class subclasses the torch class and replaces only `forward`, so construction, parameter
names, initialisation (the same RNG draws), `state_dict`, `repr`, `flatten_parameters` and
pickling are torch's own, and `isinstance(m, torch.nn.LSTM)` holds. `forward` does torch's
argument handling (unbatched input, PackedSequence, hx=None, the same errors) and runs
`fastrnn.functional` on fastrnn's kernels: Numba on the CPU, numba-cuda on CUDA tensors (when
numba-cuda and a GPU are usable). Inputs without a kernel (another device, float16, bfloat16,
autocast, CUDA without numba-cuda) run torch's own implementation through `super().forward`, with
a warning issued once per reason.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import dynamo, functional, recurrent_masks
from .recurrence_cuda import get_cuda_strategy, unavailable_reason

__all__ = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell", "convert"]


# The torch classes as they were at import: scripts and tests may later patch torch.nn.LSTM & co.
_TorchLSTM, _TorchGRU, _TorchRNN = nn.LSTM, nn.GRU, nn.RNN
_TorchLSTMCell, _TorchGRUCell, _TorchRNNCell = nn.LSTMCell, nn.GRUCell, nn.RNNCell


def _rnn_kind(nonlinearity: str) -> str | None:
    """The kernel kind of an Elman RNN or cell, None for a nonlinearity torch would reject."""
    return f"rnn_{nonlinearity}" if nonlinearity in ("tanh", "relu") else None


def _torch_chosen(input: Tensor) -> bool:
    """The user asked for torch's own GPU implementation (set_cuda_strategy("torch"))."""
    return input.is_cuda and get_cuda_strategy() == "torch"


def _registered_weights(module: nn.Module, names) -> list[Tensor | None] | None:
    """The weights `names` straight from the module's `_parameters` (None where registered
    as None), or None where attribute access might give something else: a subclass (a
    parametrization makes one, with properties), a name not registered as a parameter (weight
    drop deletes it and sets a plain tensor), or an instance attribute of that name."""
    if type(module) not in _TORCH_CLASSES:
        return None
    parameters, instance = module._parameters, module.__dict__
    weights = []
    for name in names:
        if name in instance or name not in parameters:
            return None
        weights.append(parameters[name])
    return weights


def _warn_fallback(cls_name: str, reason: str, instead: str | None = None) -> None:
    instead = instead or f"torch's own {cls_name} implementation"
    functional.warn_fallback(cls_name, reason, instead, 5)


def _fallback_reason(module: nn.Module, input, weights: list, hx) -> str | None:
    """Why this call can't run on fastrnn's kernels (warned once), or None: then torch's own
    implementation runs, or, for a cell torch doesn't have (`functional.TORCH_KINDS`), the
    plain-torch reference. weights: the module's tensors."""
    data = input.data if isinstance(input, PackedSequence) else input
    if not isinstance(data, Tensor):
        return None  # let the argument checks report it
    torch_kind = module._kernel_kind() in functional.TORCH_KINDS
    if _torch_chosen(data):
        if torch_kind:
            return "set_cuda_strategy('torch') chose torch"  # what the user asked for: no warning
        reason = "set_cuda_strategy('torch') chose torch, which has no such cell"
    else:
        reason = functional.kernel_reason(data, weights, hx)
    if reason is not None:
        instead = None if torch_kind else functional.REFERENCE
        _warn_fallback(type(module).__name__, reason, instead)
    return reason


@functools.cache
def _run_eagerly():
    """`_SequenceForward.forward` as a `torch.compiler.disable`d function (which runs it
    eagerly: `functional.compiling()` is False inside), made on first
    use (making it imports torch._dynamo, which a process that compiles has imported already)."""
    return torch.compiler.disable(_SequenceForward.forward)


def _compiled_kernels(input, weights) -> bool:
    """Whether a call traced by torch.compile can run on fastrnn's kernels: a CPU (or, with
    numba-cuda, CUDA) input of a kernel dtype, weights of that dtype and device, no autocast."""
    if not isinstance(input, Tensor) or _torch_chosen(input):
        return False
    device = "cpu" if input.is_cpu else "cuda" if input.is_cuda else None
    if device is None or input.dtype not in functional.KERNEL_DTYPES[device]:
        return False
    if torch.is_autocast_enabled(device) or (device == "cuda" and unavailable_reason()):
        return False
    return all(w.dtype == input.dtype and w.device == input.device for w in weights)


_ONEDNN_PRIMITIVE_ERROR = (
    "could not create a primitive descriptor for the LSTM forward propagation primitive. Run "
    "workload with environment variable ONEDNN_VERBOSE=all to get additional diagnostic "
    "information."
)


def _check_onednn_state_dtypes(
    input: Tensor, states: tuple[Tensor, ...], batch_first: bool
) -> None:
    """torch runs a dense float32 LSTM without projection through oneDNN, which rejects states of
    another dtype with its own messages (before any matmul could name the dtypes): float64 or
    an integer state 'get_mkldnn_dtype', float16 / bfloat16 a primitive-descriptor error. Not
    for an empty sequence or batch, which torch reports otherwise."""
    steps, batch = input.shape[:2] if not batch_first else (input.shape[1], input.shape[0])
    if input.dtype != torch.float32 or steps == 0 or batch == 0:
        return
    dtypes = {state.dtype for state in states}
    if dtypes - {torch.float32, torch.float16, torch.bfloat16}:
        raise RuntimeError("get_mkldnn_dtype: unsupported data type")
    if dtypes & {torch.float16, torch.bfloat16}:
        raise RuntimeError(_ONEDNN_PRIMITIVE_ERROR)


class _KernelForward:
    """What the sequence modules and the cells share: the kernel kind, the fallback check and
    what torch.jit.script compiles in their place."""

    _name = ""  # used in torch's error messages
    _state_count = 1
    _kind: str | None = None

    def _kernel_kind(self) -> str | None:
        """The cell kind of the kernels (`cells.SPECS`), None where torch would reject it."""
        return self._kind

    def _fallback_reason(self, input, weights, hx) -> str | None:
        return _fallback_reason(self, input, weights, hx)

    def __prepare_scriptable__(self):
        return _prepared_for_scripting(self)


class _SequenceForward(_KernelForward):
    """torch's forward-argument handling for the sequence modules, on fastrnn kernels;
    subclasses set `_name`, `_kind` (or `_kernel_kind`) and `_state_count`."""

    _dims_error_noun = ""  # torch's RNN says "got 4D tensor instead", LSTM and GRU "got 4D instead"
    # Opt-in recurrent dropout and zoneout (`recurrent_masks`), set by the constructor; class
    # defaults for modules made by `convert` or unpickled from before they existed.
    recurrent_dropout: float = 0.0
    zoneout: float | tuple[float, float] = 0.0
    _zoneout_pair = False  # the LSTM takes an (h, c) pair

    def __init__(self, *args, recurrent_dropout: float = 0.0, zoneout=0.0, **kwargs) -> None:
        """torch's constructor, plus `recurrent_dropout` (p of Gal & Ghahramani's mask on the
        h that feeds W_hh, one per sequence; training only) and `zoneout` (the probability of
        a unit keeping its previous state at a step; the LSTM's may be an (h, c) pair), both
        in [0, 1), 0 by default: off, the module then is torch.nn's (`recurrent_masks`)."""
        dropout, zone = recurrent_masks.check_rates(recurrent_dropout, zoneout, self._zoneout_pair)
        super().__init__(*args, **kwargs)
        self.recurrent_dropout, self.zoneout = dropout, zone

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        if self.recurrent_dropout:
            text += f", recurrent_dropout={self.recurrent_dropout}"
        if self.zoneout:
            text += f", zoneout={self.zoneout}"
        return text

    def _mask_rates(self) -> recurrent_masks.Rates | None:
        """The recurrent dropout and zoneout rates this call applies, None for none (the
        default: torch.nn's computation, on the plain kernels)."""
        if not (self.recurrent_dropout or self.zoneout):
            return None
        return recurrent_masks.rates_in_effect(self.recurrent_dropout, self.zoneout, self.training)

    def _zero_states(self, batch: int, like: Tensor) -> tuple[Tensor, ...]:
        """hx=None: zero states (L * D, B, P)[, c (L * D, B, H)] like the input."""
        shape = (self.num_layers * (2 if self.bidirectional else 1), batch)
        options = {"dtype": like.dtype, "device": like.device}
        h = torch.zeros(*shape, self.proj_size or self.hidden_size, **options)
        if self._state_count == 1:
            return (h,)
        return (h, torch.zeros(*shape, self.hidden_size, **options))

    def _run(self, input, states, batch_sizes, reference: bool):
        """(output, final states) of checked arguments: time-major or batch-first dense
        input or packed data, the states as a tuple of (L * D, B, *) tensors and the batch
        sizes (None for dense input); reference: on the plain-torch reference."""
        arguments = (
            self._kernel_kind(), input, batch_sizes, states, self._flat_weights, self.bias,
            self.num_layers, self.dropout, self.training, self.bidirectional, self.batch_first,
        )  # fmt: skip
        rates = self._mask_rates()
        if rates is not None:  # recurrent dropout and/or zoneout
            output, *final = recurrent_masks.sequence(type(self).__name__, rates, *arguments)
        else:
            output, *final = functional.checked_sequence(*arguments, reference, self._layer_extras)
        return output, tuple(final)

    # (layer, its input rows) -> the layer Function's arguments after W_hr, for a variant
    # (`functional.SequenceCall.extras`); None for torch's cells
    _layer_extras = None

    def _states_tuple(self, hx) -> tuple[Tensor, ...]:
        return (hx,)

    def _states_result(self, states: tuple[Tensor, ...]):
        return states[0]

    def _check_state_dims(self, states: tuple[Tensor, ...], batched: bool) -> None:
        expected = 3 if batched else 2
        kind = "batched 3-D" if batched else "unbatched 2-D"
        if states[0].dim() != expected:
            raise RuntimeError(
                f"For {kind} input, hx should also be {expected}-D but got "
                f"{states[0].dim()}-D tensor"
            )

    def _check(self, input, states, batch_sizes) -> None:
        self.check_forward_args(input, self._states_result(states), batch_sizes)

    def forward(self, input, hx=None):
        """torch's forward semantics on fastrnn's kernels (torch's own code where there's no
        kernel; `super()` is the torch class next in the MRO). The plain case (one layer and
        direction, dense CPU input the kernels take as it is, `functional.plain_sequence_call`)
        goes straight to them."""
        if functional.compiling():
            if self._mask_rates() is not None:  # no op with masks: eager (a graph break)
                return _run_eagerly()(self, input, hx)
            # torch.compile records each layer as one `fastrnn::layer` op (`functional`);
            # inputs without a kernel trace torch's implementation instead. Packed input runs
            # eagerly (a graph break): torch's checks of it read batch_sizes' values.
            if isinstance(input, PackedSequence):
                return _run_eagerly()(self, input, hx)
            kernels = _compiled_kernels(input, self._flat_weights)
            if self._kernel_kind() not in functional.TORCH_KINDS:  # torch has no such cell
                return self._checked_forward(input, hx, reference=not kernels)
            if kernels:
                return self._checked_forward(input, hx)
            return super().forward(input, hx)  # type: ignore[misc]
        if self._mask_rates() is not None and self._kernel_kind() is not None:
            # torch.nn has no masks: `recurrent_masks` runs the reference where no kernel can
            return self._checked_forward(input, hx)
        # Validation once: a plain call (`_plain_call`) or the full checks make one normalised
        # call (`functional.SequenceCall`), which one path runs.
        call = self._plain_call(input, hx)
        if call is not None:
            output, *final = functional.run_sequence(call)
            return output, self._states_result(tuple(final))
        kind = self._kernel_kind()
        if kind is None:
            return super().forward(input, hx)  # type: ignore[misc]
        if self._fallback_reason(input, self._flat_weights, hx) is None:
            return self._checked_forward(input, hx)
        if kind in functional.TORCH_KINDS:
            return super().forward(input, hx)  # type: ignore[misc]
        return self._checked_forward(input, hx, reference=True)

    def _plain_call(self, input, hx) -> functional.SequenceCall | None:
        """The normalised call of a plain one (one layer and direction, no projection, dense
        CPU input the kernels take as it is: `functional.plain_sequence_call`), checked in one
        cheap pass; None for the full checks."""
        if self.num_layers != 1 or self.bidirectional or getattr(self, "proj_size", 0):
            return None
        if type(input) is not Tensor or input.dim() != 3:
            return None
        kind = self._kernel_kind()
        weights = _registered_weights(self, self._flat_weights_names)
        if kind is None or weights is None:
            return None
        if hx is None:
            batch = input.shape[0] if self.batch_first else input.shape[1]
            zeros = torch.zeros(1, batch, self.hidden_size, dtype=input.dtype)
            states = (zeros,) * self._state_count
        elif self._state_count == 1:
            states = (hx,)
        elif type(hx) in (tuple, list) and len(hx) == 2:
            states = (hx[0], hx[1])
        else:
            return None
        return functional.plain_sequence_call(
            kind, input, self.batch_first, states, weights, self.bias
        )

    def _update_flat_weights(self) -> None:
        """torch's `_update_flat_weights` (re-read the weights if one was replaced, as weight
        drop does) with its check done on `_parameters` where that gives the same answer
        (`_registered_weights`). torch's check, through `Module.__getattr__`, cost ~6 us a
        call (3 % of a batch-1 forward)."""
        weights = _registered_weights(self, self._flat_weights_names)
        if weights is None:
            super()._update_flat_weights()  # type: ignore[misc]
            return
        for ref, weight in zip(self._flat_weight_refs, weights, strict=False):
            if weight is not None and ref is not None and ref() is not weight:
                self._init_flat_weights()
                return

    def _checked_forward(self, input, hx, reference: bool = False):
        """torch's argument handling and checks, then the kernels (`_run`)."""
        self._update_flat_weights()
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            if hx is None:
                states = self._zero_states(int(batch_sizes[0]), data)
            else:
                states = self._states_tuple(self.permute_hidden(hx, sorted_indices))
            self._check(data, states, batch_sizes)
            output, final = self._run(data, states, batch_sizes, reference)
            packed = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
            return packed, self.permute_hidden(self._states_result(final), unsorted_indices)

        if input.dim() not in (2, 3):
            raise ValueError(
                f"{self._name}: Expected input to be 2D or 3D, got {input.dim()}D"
                f"{self._dims_error_noun} instead"
            )
        batched = input.dim() == 3
        batch_dim = 0 if self.batch_first else 1
        if not batched:
            input = input.unsqueeze(batch_dim)
        if hx is None:
            states = self._zero_states(input.size(batch_dim), input)
        else:
            states = self._states_tuple(hx)
            self._check_state_dims(states, batched)
            if not batched:
                # torch keeps only the first two (LSTM) / the one state here.
                states = tuple(s.unsqueeze(1) for s in states[: self._state_count])
        self._check(input, states, None)
        output, final = self._run(input, states, None, reference)
        if not batched:
            output = output.squeeze(batch_dim)
            final = tuple(s.squeeze(1) for s in final)
        return output, self._states_result(final)


class LSTM(_SequenceForward, _TorchLSTM):
    """`torch.nn.LSTM` on fastrnn's fused kernels; same arguments, weights and results.
    Opt-in: `recurrent_dropout`, `zoneout` (a rate, or an (h, c) pair; `recurrent_masks`)."""

    _name = "LSTM"
    _state_count = 2
    _zoneout_pair = True
    _kind = "lstm"

    def _states_tuple(self, hx):
        if not isinstance(hx, (tuple, list)):
            # A tensor (or anything else) where (h, c) belongs: torch's checks index hx[0] and
            # hx[1], so a tensor with fewer than two rows raises torch's own IndexError, here
            # too, and an int its TypeError.
            _ = (hx[0], hx[1])
        # All of them: `functional.sequence_call` rejects a number other than two, as torch
        # does.
        return tuple(hx)

    def _check(self, input, states, batch_sizes):
        weight = self._flat_weights[0]
        if batch_sizes is not None:
            # torch's packed LSTM path skips the argument checks; its first matmul reports these.
            if input.dtype != weight.dtype:
                raise RuntimeError(
                    "mat1 and mat2 must have the same dtype, but got "
                    f"{functional.type_name(input)} and {functional.type_name(weight)}"
                )
            if input.dim() == 2 and input.size(1) != weight.size(1):
                raise RuntimeError(
                    "mat1 and mat2 shapes cannot be multiplied "
                    f"({input.size(0)}x{input.size(1)} and {weight.size(1)}x{weight.size(0)})"
                )
        super()._check(input, states, batch_sizes)
        if batch_sizes is None and self.proj_size == 0 and weight.dtype == torch.float32:
            _check_onednn_state_dtypes(input, states, self.batch_first)

    def _states_result(self, states):
        return (states[0], states[1])

    def _check_state_dims(self, states, batched):
        expected = 3 if batched else 2
        kind = "batched 3-D" if batched else "unbatched 2-D"
        if states[0].dim() != expected or states[1].dim() != expected:
            raise RuntimeError(
                f"For {kind} input, hx and cx should also be {expected}-D but got "
                f"({states[0].dim()}-D, {states[1].dim()}-D) tensors"
            )


# The GRU forms `reset` picks: torch's "after" (the default) and the original paper's "before".
_GRU_KINDS = {"after": "gru", "before": "gru_reset_before"}


class _ResetOption:
    """The `reset` option of GRU and GRUCell: "after" (torch's form, the default: the module is
    exactly torch's) or "before" (n = tanh(W_in x + b_in + W_hn (r h) + b_hn), the original
    paper's, Keras reset_after=False), with torch's parameters, names and initialisation. A
    module converted from torch's (`convert`) has the class default, "after"."""

    reset = "after"

    def __init__(self, *args, reset: str = "after", **kwargs) -> None:
        if reset not in _GRU_KINDS:
            raise ValueError(f"reset must be 'after' or 'before', got {reset!r}")
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        if reset != "after":
            if getattr(self, "recurrent_dropout", 0) or getattr(self, "zoneout", 0):
                raise ValueError(
                    "recurrent_dropout and zoneout take reset='after' (the reset-before GRU "
                    "has no masked kernels yet)"
                )
            self.reset = reset

    def extra_repr(self) -> str:
        text = super().extra_repr()  # type: ignore[misc]
        return text if self.reset == "after" else f"{text}, reset={self.reset!r}"

    def _kernel_kind(self) -> str | None:
        return _GRU_KINDS[self.reset]


class GRU(_ResetOption, _SequenceForward, _TorchGRU):
    """`torch.nn.GRU` ("reset after", gates r, z, n) on fastrnn's fused kernels;
    `reset="before"` for the other published form (`_ResetOption`). Opt-in:
    `recurrent_dropout`, `zoneout` (`recurrent_masks`), with reset="after"."""

    _name = "GRU"


class RNN(_SequenceForward, _TorchRNN):
    """`torch.nn.RNN` (tanh or relu) on fastrnn's fused kernels. Opt-in: `recurrent_dropout`,
    `zoneout` (`recurrent_masks`)."""

    _name = "RNN"
    _dims_error_noun = " tensor"

    def _kernel_kind(self) -> str | None:
        # torch's forward goes by the mode set at construction (RNN_TANH, RNN_RELU), not
        # `nonlinearity`
        return _rnn_kind(self.mode.removeprefix("RNN_").lower())


class _CellForward(_KernelForward):
    """torch's argument handling of the cells (1-D unbatched or 2-D input, hx=None)."""

    def forward(self, input, hx=None):
        """torch's cell semantics on fastrnn's kernels (torch's own code where there's no
        kernel; `super()` is the torch class next in the MRO). The plain case (a batched CPU
        call the kernels take as it is, `functional.plain_cell_call`) goes straight to them."""
        weights = self._weights()
        kind = self._kernel_kind()
        if kind is None:
            return super().forward(input, hx)  # type: ignore[misc]
        if type(input) is Tensor and input.dim() == 2:
            states = self._plain_states(input, hx)
            if states is not None and functional.plain_cell_call(kind, input, states, *weights):
                c = states[1] if self._state_count == 2 else None
                result = functional.cell_step(kind, input, states[0], c, *weights)
                return result if self._state_count == 2 else result[0]
        if not isinstance(input, Tensor):
            return super().forward(input, hx)  # type: ignore[misc]  # torch's error
        if self._fallback_reason(input, weights if self.bias else weights[:2], hx) is None:
            return self._cell_forward(kind, input, hx, weights)
        if kind in functional.TORCH_KINDS:
            return super().forward(input, hx)  # type: ignore[misc]
        return self._cell_forward(kind, input, hx, weights, reference=True)

    def _plain_states(self, input: Tensor, hx) -> tuple[Tensor, ...] | None:
        """The states of a batched call as the cell kernels take them (zeros for hx=None), or
        None where hx isn't the plain form (then the full path checks it)."""
        if hx is None:
            zeros = torch.zeros(input.shape[0], self.hidden_size, dtype=input.dtype)
            return (zeros,) * self._state_count
        if self._state_count == 1:
            return (hx,) if type(hx) is Tensor else None
        if type(hx) in (tuple, list) and len(hx) == 2:
            return (hx[0], hx[1])
        return None

    def _weights(self) -> list[Tensor | None]:
        """[W_ih, W_hh, b_ih, b_hh] (the biases None without bias), from `_parameters` where
        that is what attribute access gives (`_registered_weights`): four
        `Module.__getattr__` calls cost ~3 us of a batch-1 step."""
        weights = _registered_weights(self, _CELL_WEIGHTS)
        return weights if weights is not None else [getattr(self, n) for n in _CELL_WEIGHTS]

    def _cell_forward(self, kind, input, hx, weights, reference: bool = False):
        """torch's argument handling and checks, then the kernels (`functional.checked_cell`)."""
        if input.dim() not in (1, 2):
            raise ValueError(
                f"{self._name}: Expected input to be 1D or 2D, got {input.dim()}D instead"
            )
        if hx is not None:
            # Iterating hx as torch does: a tensor where a tuple belongs yields its rows.
            for index, state in enumerate(hx if self._state_count == 2 else (hx,)):
                if state.dim() not in (1, 2):
                    what = f"hx[{index}]" if self._state_count == 2 else "hidden"
                    raise ValueError(
                        f"{self._name}: Expected {what} to be 1D or 2D, got {state.dim()}D instead"
                    )
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = torch.zeros(
                input.size(0), self.hidden_size, dtype=input.dtype, device=input.device
            )
            hx = (zeros, zeros) if self._state_count == 2 else zeros
        elif self._state_count == 2:
            if batched:
                functional.check_lstm_cell_states(hx)
            else:  # torch takes hx's first two rows, a tensor's too
                hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        elif not batched:
            hx = hx.unsqueeze(0)
        states = hx if self._state_count == 2 else (hx,)
        result = functional.checked_cell(kind, input, hx, states, weights, reference)
        if not batched:
            result = tuple(r.squeeze(0) for r in result)
        return result if self._state_count == 2 else result[0]


_CELL_WEIGHTS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")


class LSTMCell(_CellForward, _TorchLSTMCell):
    """`torch.nn.LSTMCell` on fastrnn's kernels: (h, c) = cell(x, (h, c))."""

    _name = "LSTMCell"
    _state_count = 2
    _kind = "lstm"


class GRUCell(_ResetOption, _CellForward, _TorchGRUCell):
    """`torch.nn.GRUCell` ("reset after") on fastrnn's kernels: h = cell(x, h);
    `reset="before"` for the other published form (`_ResetOption`)."""

    _name = "GRUCell"


class RNNCell(_CellForward, _TorchRNNCell):
    """`torch.nn.RNNCell` (tanh or relu) on fastrnn's kernels: h = cell(x, h)."""

    _name = "RNNCell"

    def _kernel_kind(self) -> str | None:
        return _rnn_kind(self.nonlinearity)


_REPLACEMENTS: dict[type, type] = {
    _TorchLSTM: LSTM,
    _TorchGRU: GRU,
    _TorchRNN: RNN,
    _TorchLSTMCell: LSTMCell,
    _TorchGRUCell: GRUCell,
    _TorchRNNCell: RNNCell,
}


_TORCH_CLASSES: dict[type, type] = {fast: torch_cls for torch_cls, fast in _REPLACEMENTS.items()}


def _as_class(module: nn.Module, target: type) -> nn.Module:
    """A `target` instance sharing `module`'s state (parameters, buffers, hooks, flags) rather
    than a copy: the Parameter objects stay the same, so optimizers built on the old module keep
    working."""
    new = target.__new__(target)
    new.__dict__.update(module.__dict__)
    return new


def swap_classes(
    model: nn.Module, target: Callable[[nn.Module], type | None], swapped: dict | None = None
) -> nn.Module:
    """Replace, in place, each module of `model` (the model itself included) for which
    `target` names a class by an instance of that class sharing its state (`_as_class`);
    records each new module's id with (it, its old class) in `swapped`. Returns the (possibly
    new) model."""
    for name, child in list(model.named_children()):
        new_child = swap_classes(child, target, swapped)
        if new_child is not child:
            setattr(model, name, new_child)
    cls = target(model)
    if cls is None:
        return model
    new = _as_class(model, cls)
    if swapped is not None:
        swapped[id(new)] = (new, type(model))  # held, so no other module reuses the id
    return new


def _prepared_for_scripting(module: nn.Module) -> nn.Module:
    """What `torch.jit.script` compiles in place of a fastrnn module: TorchScript can't call
    Numba, so the torch class with the same parameters (warning once). torch.jit.script puts it
    in the scripted model and in the scripted model's Python original too, as it does with
    every `__prepare_scriptable__` result. Subclasses are left as they are (their own forward
    may need fastrnn's)."""
    target = _TORCH_CLASSES.get(type(module))
    if target is None:
        return module
    if getattr(module, "recurrent_dropout", 0) or getattr(module, "zoneout", 0):
        raise RuntimeError(
            f"{type(module).__name__}: torch.jit.script can't compile fastrnn's kernels, and "
            "torch's module in their place has no recurrent dropout or zoneout"
        )
    kind = module._kernel_kind()
    if kind is not None and kind not in functional.TORCH_KINDS:
        raise RuntimeError(
            f"torch.jit.script can't compile fastrnn's {type(module).__name__} "
            f"({module.extra_repr()}): torch has no such cell to script in its place"
        )
    _warn_fallback(
        type(module).__name__,
        "torch.jit.script can't compile fastrnn's Numba kernels (the model scripted gets "
        "torch's module in its place, with the same parameters)",
    )
    return _as_class(module, target)


dynamo.allow_modules(LSTM, GRU, RNN)


def convert(module: nn.Module) -> nn.Module:
    """Swap every torch.nn.LSTM / GRU / RNN / LSTMCell / GRUCell / RNNCell in `module` (the module
    itself included) for the fastrnn class, sharing the same Parameter objects.

    Only exact torch classes are swapped; user subclasses (which may override forward) are left
    alone. Submodules are replaced in place; the (possibly new) top-level module is returned.
    """
    return swap_classes(module, lambda m: _REPLACEMENTS.get(type(m)))
