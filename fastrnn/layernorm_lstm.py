"""The layer-norm LSTM (Ba et al. 2016, "Layer Normalization"; the form of haste's
LayerNormLSTM): an opt-in variant with torch.nn.LSTM's interface, no torch.nn counterpart.

Per layer and direction, gate order i, f, g, o (torch's), each LN over the last dimension with
eps = 1e-5 (torch.nn.LayerNorm's default, which haste's LayerNormLSTM uses too):
    gates = LN_ih(W_ih x) + LN_hh(W_hh h) + b_ih + b_hh      (LN_ih, LN_hh over the 4H columns)
    c' = σ(f) c + σ(i) tanh(g),  h' = σ(o) tanh(LN_c(c'))    (LN_c over H)
Biases sit as in haste: after the two norms (haste keeps one b; here b_ih + b_hh, torch's pair),
and each norm has its own gain and bias (haste has no bias on the two gate-side norms; here they
are there, redundant with b_ih + b_hh but harmless). The input side does not depend on h, so it
runs over every step at once (torch's layer_norm); the recurrence, with the recurrent side's and
the cell's norms, runs in fastrnn's kernels: the CPU's (`kernels/cpu/layernorm_lstm`), or on a
GPU a stepwise one (`kernels/cuda/layernorm_lstm`: cuBLAS products and a kernel per step, a
thread per row).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional
from .cells import layernorm_lstm_step, layernorm_widths
from .functional import kernel_reason, warn_fallback
from .modules import LSTM, _SequenceForward

__all__ = ["LayerNormLSTM", "LayerNormLSTMCell"]

# The norms of each layer and direction, in the order of the `norms` vector (`cells`).
_NORM_NAMES = (
    "layernorm_ih_weight",
    "layernorm_ih_bias",
    "layernorm_hh_weight",
    "layernorm_hh_bias",
    "layernorm_c_weight",
    "layernorm_c_bias",
)


class _Norms:
    """The norms' gains (init 1) and biases (init 0), registered after torch's weights, whose
    initialisation (torch's draws, uniform ±1/sqrt(H)) stays torch's."""

    _weight_names: tuple[str, ...] = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")

    def _norm_suffixes(self) -> list[str]:
        return [""]

    def _add_norms(self, device, dtype) -> None:
        widths = layernorm_widths(self.hidden_size)
        for suffix in self._norm_suffixes():
            for name, width in zip(_NORM_NAMES, widths, strict=True):
                value = torch.empty(width, device=device, dtype=dtype)
                self.register_parameter(name + suffix, nn.Parameter(value))
        self._reset_norms()

    def _reset_norms(self) -> None:
        with torch.no_grad():
            for suffix in self._norm_suffixes():
                for name in _NORM_NAMES:
                    getattr(self, name + suffix).fill_(1.0 if name.endswith("weight") else 0.0)

    def reset_parameters(self) -> None:
        """torch's draws for its weights and biases, then the norms' gains to 1 and biases
        to 0 (not during torch's __init__, which runs before they exist)."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for name in self._weight_names:
            weight = getattr(self, name, None)
            if weight is not None:
                nn.init.uniform_(weight, -bound, bound)
        if hasattr(self, _NORM_NAMES[0] + self._norm_suffixes()[0]):
            self._reset_norms()


class LayerNormLSTM(_Norms, _SequenceForward, nn.RNNBase):
    """Multi-layer layer-norm LSTM (formulas in the module docstring) with torch.nn.LSTM's
    constructor (no proj_size), parameters, initialisation and forward.

    Parameters per layer k and direction (suffix `_reverse` for direction 1), torch.nn.LSTM's
    names, shapes and initial draws (the same RNG draws in the same order, so the same seed
    gives nn.LSTM's weights): weight_ih_l{k} (4H, I or D*H), weight_hh_l{k} (4H, H),
    bias_ih_l{k}, bias_hh_l{k} (4H) with bias=True; then the norms' gains (init 1) and biases
    (init 0): layernorm_ih_weight_l{k}, layernorm_ih_bias_l{k}, layernorm_hh_weight_l{k},
    layernorm_hh_bias_l{k} (4H), layernorm_c_weight_l{k}, layernorm_c_bias_l{k} (H).

    forward(input, hx=None) as torch.nn.LSTM: input (T, B, I) ((B, T, I) with batch_first),
    (T, I) unbatched, or a PackedSequence; hx None (zeros) or (h0, c0), each
    (num_layers * D, B, H) ((num_layers * D, H) unbatched). Returns output (T, B, D * H) (or
    packed, or (T, D * H)) and (h_n, c_n) shaped as h0, c0. float32 / float64 on the CPU or
    CUDA run fastrnn's kernels; other devices and dtypes, torch.func transforms and
    torch.export run the same formulas in plain torch (`fastrnn.reference`), with a warning
    once.

    Example::

        >>> lstm = fastrnn.LayerNormLSTM(16, 32, num_layers=2, bidirectional=True)
        >>> output, (h_n, c_n) = lstm(torch.randn(10, 4, 16))
        >>> output.shape, h_n.shape
        (torch.Size([10, 4, 64]), torch.Size([4, 4, 32]))
    """

    def __init__(
        self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
        batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False,
        device=None, dtype=None,
    ) -> None:  # fmt: skip
        super().__init__(
            "LSTM", input_size, hidden_size, num_layers, bias, batch_first, dropout,
            bidirectional, device=device, dtype=dtype,
        )  # fmt: skip
        self._add_norms(device, dtype)

    @property
    def _weight_names(self) -> list[str]:  # type: ignore[override]
        return self._flat_weights_names

    def _norm_suffixes(self) -> list[str]:
        directions = ("", "_reverse") if self.bidirectional else ("",)
        return [f"_l{layer}{suffix}" for layer in range(self.num_layers) for suffix in directions]

    # torch.nn.LSTM's checks of hx and its permutation for packed input; `_SequenceForward`
    # (torch's forward-argument handling) as for fastrnn's LSTM
    _name, _state_count, _kind = "LayerNormLSTM", 2, "layernorm_lstm"
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden
    _states_tuple = LSTM._states_tuple
    _states_result = LSTM._states_result
    _check_state_dims = LSTM._check_state_dims

    def _layer_extras(self, layer: int, rows: Tensor) -> tuple[Tensor]:
        """(norms,) of a layer, the layer Function's argument after W_hr: one direction's six
        norm parameters concatenated (18H), two directions' stacked (2, 18H)."""
        directions = ("", "_reverse") if self.bidirectional else ("",)
        per_direction = [
            torch.cat([getattr(self, f"{name}_l{layer}{suffix}") for name in _NORM_NAMES])
            for suffix in directions
        ]
        return (per_direction[0] if len(per_direction) == 1 else torch.stack(per_direction),)

    def _fallback_reason(self, input, weights, hx) -> str | None:
        """Why the kernels can't run this call (warned once), or None; the norms count among
        the weights."""
        data = input.data if isinstance(input, PackedSequence) else input
        if not isinstance(data, Tensor):
            return None  # let the argument checks report it
        reason = kernel_reason(data, list(self.parameters()), hx)
        if reason is not None:
            warn_fallback("fastrnn.LayerNormLSTM", reason, "its plain-torch formulas", 4)
        return reason


class LayerNormLSTMCell(_Norms, nn.RNNCellBase):
    """One step of the layer-norm LSTM (`LayerNormLSTM`'s formulas) with torch.nn.LSTMCell's
    constructor, parameters (weight_ih, weight_hh, bias_ih, bias_hh: the same draws) and
    forward: input (B, I) or (I,), hx None or (h, c) (B, H) or (H,) -> (h', c'). Plus the norms'
    gains and biases layernorm_ih_weight, layernorm_ih_bias, layernorm_hh_weight,
    layernorm_hh_bias (4H) and layernorm_c_weight, layernorm_c_bias (H), init 1 and 0. A step
    runs the layer kernel over one time step (float32 / float64 on the CPU or CUDA), else plain
    torch."""

    def __init__(
        self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None
    ) -> None:
        super().__init__(input_size, hidden_size, bias, num_chunks=4, device=device, dtype=dtype)
        self._add_norms(device, dtype)

    def forward(self, input: Tensor, hx: tuple[Tensor, Tensor] | None = None):
        if input.dim() not in (1, 2):
            raise ValueError(
                f"LayerNormLSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead"
            )
        if hx is not None and (hx[0].dim() != input.dim() or hx[1].dim() != input.dim()):
            raise ValueError(
                f"LayerNormLSTMCell: Expected hx[0] and hx[1] to be {input.dim()}D, got "
                f"{hx[0].dim()}D and {hx[1].dim()}D instead"
            )
        batched = input.dim() == 2
        if not batched:
            input = input.unsqueeze(0)
        if hx is None:
            zeros = input.new_zeros(input.shape[0], self.hidden_size)
            hx = (zeros, zeros)
        elif not batched:
            hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        if input.shape[1] != self.input_size:
            raise RuntimeError(
                f"input has inconsistent input_size: got {input.shape[1]} expected "
                f"{self.input_size}"
            )
        for i, state in enumerate(hx):
            if state.shape != (input.shape[0], self.hidden_size):
                raise RuntimeError(
                    f"hx[{i}] has shape {list(state.shape)}, expected "
                    f"{[input.shape[0], self.hidden_size]}"
                )
        norms = torch.cat([getattr(self, name) for name in _NORM_NAMES])
        weights = [self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh]
        reason = kernel_reason(input, list(self.parameters()), hx)
        if reason is None:
            h, c = functional.cell_step("layernorm_lstm", input, hx[0], hx[1], *weights, norms)
        else:
            warn_fallback("fastrnn.LayerNormLSTMCell", reason, "its plain-torch formulas")
            h, (h, c) = layernorm_lstm_step(input, hx, *weights, None, norms)
        if not batched:
            return h.squeeze(0), c.squeeze(0)
        return h, c
