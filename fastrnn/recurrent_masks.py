"""Recurrent dropout and zoneout for fastrnn's LSTM, GRU and RNN modules (opt-in).

Recurrent (variational) dropout, Gal & Ghahramani 2016: in training, one Bernoulli mask m
(B, P) per sequence, layer and direction, the same at every step, on the h that feeds the
recurrent product: each step reads W_hh (m * h / (1 - p)) (the GRU's r, z and n blocks alike);
y, h_n and everything else in the cell see the unmasked h. No mask in eval.

Zoneout, Krueger et al. 2016: at every step each unit keeps its previous value with
probability p: h' = d * h + (1 - d) * h_new with d ~ Bernoulli(p) drawn afresh per step, row
and unit; the LSTM zones out c likewise with its own rate, and its h_new = o * tanh(c_new)
reads the cell before c's zoneout, as in the paper. In eval, the expectation the paper uses:
d = p, h' = p h + (1 - p) h_new. y holds the zoned-out states (they are the layer's states).

The masks are drawn with torch's RNG on the input's device before the kernels run, layer by
layer (per layer: the dropout mask (D, B, P), then zone_h (D, N, P), then the LSTM's zone_c
(D, N, H); `layer_masks`), then `dropout` between layers as torch does; so `torch.manual_seed`
makes runs reproducible, and `reference.layer` given the same masks gives the same result.
They run on the CPU kernels' masked twins (`kernels/cpu/*_masked.py`) and the CUDA stepwise
`*_masked` kernels (`kernels/cuda/stepwise.py`, float32 / float64); elsewhere (float16 /
bfloat16, other devices, torch.func transforms, torch.export) on `reference.layer`, with a
warning once.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import functional

# (recurrent dropout p, zoneout rate of h, zoneout rate of c (LSTM; 0 for the others))
Rates = tuple[float, float, float]


def _rate(value, name: str) -> float:
    """A rate in [0, 1) as a float, or ValueError."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} should be a number in [0, 1), got {value!r}")
    if not 0 <= value < 1:
        raise ValueError(f"{name} should be a number in [0, 1), got {value}")
    return float(value)


def check_rates(recurrent_dropout, zoneout, pair: bool) -> tuple[float, float | tuple]:
    """The constructor's arguments checked: (recurrent_dropout, zoneout) as floats, zoneout a
    (h, c) pair of floats where `pair` (the LSTM) and one was given; ValueError for anything
    outside [0, 1) (1 would keep every state forever, or drop every recurrent input)."""
    dropout = _rate(recurrent_dropout, "recurrent_dropout")
    if pair and isinstance(zoneout, (tuple, list)):
        if len(zoneout) != 2:
            raise ValueError(f"zoneout should be a number or an (h, c) pair, got {zoneout!r}")
        return dropout, (_rate(zoneout[0], "zoneout[0]"), _rate(zoneout[1], "zoneout[1]"))
    return dropout, _rate(zoneout, "zoneout")


def rates_in_effect(recurrent_dropout: float, zoneout, training: bool) -> Rates | None:
    """(p, zoneout of h, zoneout of c) that a call applies, None when it applies none (then the
    module runs exactly as torch.nn's): dropout only in training, zoneout in both modes."""
    h_rate, c_rate = zoneout if isinstance(zoneout, tuple) else (zoneout, zoneout)
    p = recurrent_dropout if training else 0.0
    if p == 0 and h_rate == 0 and c_rate == 0:
        return None
    return p, h_rate, c_rate


def layer_masks(
    kind: str,
    rows: int,
    batch: int,
    directions: int,
    width: int,
    hidden: int,
    rates: Rates,
    training: bool,
    like: Tensor,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """One layer's masks for `reference.layer` and `autograd.LayerFunction` (None where off):
    h_mask (D, B, P) = Bernoulli(1 - p) / (1 - p) in training; zone_h (D, N, P) ~ Bernoulli(rate)
    in training, the rate itself in eval; zone_c (D, N, H) likewise for the LSTM. N = rows of
    the layer's input (packed time-major), B = batch, P = width (proj_size or H). Drawn in this
    order with torch.bernoulli on like's device and dtype."""
    p, h_rate, c_rate = rates
    options = {"dtype": like.dtype, "device": like.device}

    def zone(rate: float, size: int) -> Tensor | None:
        if rate == 0:
            return None
        full = torch.full((directions, rows, size), rate, **options)
        return torch.bernoulli(full) if training else full

    h_mask = None
    if training and p > 0:
        keep = torch.full((directions, batch, width), 1 - p, **options)
        h_mask = torch.bernoulli(keep).div_(1 - p)
    zone_h = zone(h_rate, width)
    zone_c = zone(c_rate, hidden) if kind == "lstm" else None
    return h_mask, zone_h, zone_c


def _kernel_reason(input: Tensor, weights, hx) -> str | None:
    """Why the masked kernels can't take this call, None if they can: `functional.kernel_reason`,
    and on CUDA float32 / float64 only, outside autocast (no 16-bit masked kernels)."""
    reason = functional.kernel_reason(input, weights, hx)
    if reason is None and input.is_cuda:
        if input.dtype not in (torch.float32, torch.float64) or torch.is_autocast_enabled("cuda"):
            reason = f"fastrnn has no CUDA recurrent dropout / zoneout kernel for {input.dtype}"
    return reason


def sequence(
    who: str, rates: Rates, kind: str, input: Tensor, batch_sizes: Tensor | None,
    states: tuple[Tensor, ...], weights, *flags,
) -> tuple[Tensor, ...]:  # fmt: skip
    """`functional.checked_sequence` (kind lstm, gru, rnn_tanh, rnn_relu; flags: has_biases,
    num_layers, dropout, train, bidirectional, batch_first) with the masks of `rates` drawn per
    layer (`layer_masks`): (output, *final states), shapes as there. Every step count runs as a
    layer (no one-step cell path). `who` names the module in the warning when the reference
    runs instead of the kernels."""
    call = functional.sequence_call(kind, input, batch_sizes, states, weights, *flags)
    training, bidirectional = flags[3], flags[4]
    reason = _kernel_reason(input, weights, states)
    if reason is not None:
        functional.warn_fallback(who, reason, "fastrnn's plain-torch reference", 4)
    directions = 2 if bidirectional else 1
    width, hidden, batch = states[0].shape[-1], states[-1].shape[-1], int(call.sizes[0])

    def masks(layer: int, rows: Tensor) -> tuple:
        drawn = layer_masks(
            kind, rows.shape[0], batch, directions, width, hidden, rates, training, rows
        )
        return (None, *drawn)  # no norms

    return functional.run_sequence(call._replace(extras=masks), reason is not None)
