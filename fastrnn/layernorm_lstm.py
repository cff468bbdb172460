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

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence

from . import functional
from .cells import layernorm_lstm_step, layernorm_widths
from .functional import kernel_reason, warn_fallback

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


class LayerNormLSTM(nn.RNNBase):
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
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            "LSTM",
            input_size,
            hidden_size,
            num_layers=num_layers,
            bias=bias,
            batch_first=batch_first,
            dropout=dropout,
            bidirectional=bidirectional,
            device=device,
            dtype=dtype,
        )
        widths = layernorm_widths(hidden_size)
        for layer in range(num_layers):
            for suffix in self._suffixes():
                for name, width in zip(_NORM_NAMES, widths, strict=True):
                    value = torch.empty(width, device=device, dtype=dtype)
                    self.register_parameter(f"{name}_l{layer}{suffix}", nn.Parameter(value))
        self._reset_norms()

    def _suffixes(self) -> tuple[str, ...]:
        return ("", "_reverse") if self.bidirectional else ("",)

    def _reset_norms(self) -> None:
        for layer in range(self.num_layers):
            for suffix in self._suffixes():
                for name in _NORM_NAMES:
                    parameter = getattr(self, f"{name}_l{layer}{suffix}")
                    with torch.no_grad():
                        parameter.fill_(1.0 if name.endswith("weight") else 0.0)

    def reset_parameters(self) -> None:
        """torch.nn.LSTM's draws for its weights and biases (uniform ±1/sqrt(H)), then the
        norms' gains to 1 and biases to 0."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for name in self._flat_weights_names:
            nn.init.uniform_(getattr(self, name), -bound, bound)
        if hasattr(self, f"{_NORM_NAMES[0]}_l0"):  # not during nn.RNNBase's __init__
            self._reset_norms()

    # torch.nn.LSTM's checks of hx and its permutation for packed input
    get_expected_cell_size = nn.LSTM.get_expected_cell_size
    check_forward_args = nn.LSTM.check_forward_args
    permute_hidden = nn.LSTM.permute_hidden

    def _layer_norms(self, layer: int, rows: Tensor) -> tuple[Tensor]:
        """(norms,) of a layer, the layer Function's argument after W_hr: one direction's six
        norm parameters concatenated (18H), two directions' stacked (2, 18H)."""
        per_direction = [
            torch.cat([getattr(self, f"{name}_l{layer}{suffix}") for name in _NORM_NAMES])
            for suffix in self._suffixes()
        ]
        return (per_direction[0] if len(per_direction) == 1 else torch.stack(per_direction),)

    def forward(self, input, hx=None):
        packed = isinstance(input, PackedSequence)
        directions = 2 if self.bidirectional else 1
        unsorted_indices = None
        if packed:
            data, batch_sizes_t, sorted_indices, unsorted_indices = input
            batch = int(batch_sizes_t[0])
            batch_sizes = batch_sizes_t.numpy().astype(np.int64)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(
                    f"LayerNormLSTM: Expected input to be 2D or 3D, got {input.dim()}D instead"
                )
            batched = input.dim() == 3
            if not batched:
                input = input.unsqueeze(0 if self.batch_first else 1)
            batch_sizes_t, sorted_indices = None, None
        if hx is None:
            rows = batch if packed else input.size(0 if self.batch_first else 1)
            like = data if packed else input
            zeros = torch.zeros(
                self.num_layers * directions,
                rows,
                self.hidden_size,
                dtype=like.dtype,
                device=like.device,
            )
            hx = (zeros, zeros)
        elif not packed:
            dims = (hx[0].dim(), hx[1].dim())
            if batched and dims != (3, 3):
                raise RuntimeError(
                    "For batched 3-D input, hx and cx should also be 3-D but got "
                    f"({dims[0]}-D, {dims[1]}-D) tensors"
                )
            if not batched:
                if dims != (2, 2):
                    raise RuntimeError(
                        "For unbatched 2-D input, hx and cx should also be 2-D but got "
                        f"({dims[0]}-D, {dims[1]}-D) tensors"
                    )
                hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if packed:
            hx = self.permute_hidden(hx, sorted_indices)
        self.check_forward_args(data if packed else input, hx, batch_sizes_t)
        if not packed:
            time_major = input.transpose(0, 1) if self.batch_first else input
            steps, batch = time_major.shape[0], time_major.shape[1]
            data = time_major.reshape(steps * batch, time_major.shape[2])
            batch_sizes = np.full(steps, batch, dtype=np.int64)
        output, h_n, c_n = self._layers(data, batch_sizes, hx)
        if packed:
            result = PackedSequence(output, batch_sizes_t, sorted_indices, unsorted_indices)
            return result, self.permute_hidden((h_n, c_n), unsorted_indices)
        output = output.reshape(steps, batch, output.shape[1])
        if self.batch_first:
            output = output.transpose(0, 1)
        if not batched:
            return output.squeeze(0 if self.batch_first else 1), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)

    def _layers(self, x: Tensor, batch_sizes: np.ndarray, hx) -> tuple[Tensor, Tensor, Tensor]:
        """Every layer over the packed time-major rows x (N, I): -> (output (N, D * H), h_n,
        c_n (num_layers * D, B, H)), with dropout on each layer's output but the last
        (`functional.run_sequence`, each layer's norms its extra argument)."""
        reason = kernel_reason(x, list(self.parameters()), hx)
        if reason is not None:
            warn_fallback("fastrnn.LayerNormLSTM", reason, "its plain-torch formulas")
        call = functional.SequenceCall(
            "layernorm_lstm", x, batch_sizes, tuple(hx), self._flat_weights, self.bias, False,
            self.num_layers, self.bidirectional, self.dropout if self.training else 0.0, False,
            False, self._layer_norms,
        )  # fmt: skip
        output, h_n, c_n = functional.run_sequence(call, reason is not None)
        return output, h_n, c_n


class LayerNormLSTMCell(nn.RNNCellBase):
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
        for name, width in zip(_NORM_NAMES, layernorm_widths(hidden_size), strict=True):
            value = torch.empty(width, device=device, dtype=dtype)
            self.register_parameter(name, nn.Parameter(value))
        self._reset_norms()

    def _reset_norms(self) -> None:
        for name in _NORM_NAMES:
            with torch.no_grad():
                getattr(self, name).fill_(1.0 if name.endswith("weight") else 0.0)

    def reset_parameters(self) -> None:
        """torch.nn.LSTMCell's draws for its weights and biases, then the norms' gains to 1
        and biases to 0."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0.0
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            weight = getattr(self, name, None)
            if weight is not None:
                nn.init.uniform_(weight, -bound, bound)
        if hasattr(self, _NORM_NAMES[0]):  # not during nn.RNNCellBase's __init__
            self._reset_norms()

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
