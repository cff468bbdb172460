"""Plain-torch, step-by-step reference of one layer, with the signature of the layer op
(`ops.layer`, `autograd.LayerFunction`): what the tests compare the kernels with.

Readable on purpose: a loop over time with each cell's textbook step (`cells.SPECS[kind].step`),
differentiable by autograd, and never called from the library's hot path (only to build the graph
of a double backward).

Layout (same as the kernels): x (N, I) holds the rows of every step back to back, step t having
`batch_sizes[t]` rows (non-increasing); a dense (T, B, I) input is x.reshape(T * B, I) with every
batch size B. Row r of step t continues row r of the previous processed step, or starts from
h0[r] (c0[r]) if that step had no row r. Direction 1 of a bidirectional layer runs in reverse.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .cells import SPECS, ReferenceStep, masked_step


def _direction(
    x: Tensor,
    batch_sizes,
    reverse: bool,
    states: tuple[Tensor, ...],
    step: ReferenceStep,
    weights,
    h_mask: Tensor | None = None,
    zones: tuple[Tensor | None, ...] = (),
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One direction: y (N, P) and its final states; masks as `layer`'s, one direction's."""
    sizes = [int(b) for b in batch_sizes]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    outputs: list[Tensor | None] = [None] * len(sizes)
    current = list(states)
    for t in order:
        rows = sizes[t]
        x_t = x[offsets[t] : offsets[t] + rows]
        alive = tuple(s[:rows] for s in current)
        if h_mask is None and not any(z is not None for z in zones):
            out, new = step(x_t, alive, *weights)
        else:
            mask = None if h_mask is None else h_mask[:rows]
            zone = tuple(None if z is None else z[offsets[t] : offsets[t] + rows] for z in zones)
            out, new = masked_step(step, x_t, alive, weights, mask, zone)
        outputs[t] = out
        current = [torch.cat([n, s[rows:]]) for n, s in zip(new, current, strict=True)]
    return torch.cat(outputs), tuple(current)  # type: ignore[arg-type]


def layer(
    cell: str,
    x: Tensor,
    batch_sizes,
    h0: Tensor,
    c0: Tensor | None,
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    W_hr: Tensor | None,
    norms: Tensor | None = None,
    h_mask: Tensor | None = None,
    zone_h: Tensor | None = None,
    zone_c: Tensor | None = None,
) -> tuple[Tensor, ...]:
    """One layer, all directions: cell lstm / gru / gru_reset_before / rnn_tanh / rnn_relu /
    layernorm_lstm; x (N, I); batch_sizes (T,) (any sequence of ints); h0 (D, B, P), c0
    (D, B, H) (LSTMs, else None); weights stacked (D, ...) or one direction's without the D
    axis; norms (D, 18H) the layer-norm LSTM's gains and biases (`cells.layernorm_widths`),
    else None. Returns y (N, D * P), h_n (D, B, P) and, for the LSTMs, c_n (D, B, H).

    Masks, None when off (`cells.masked_step`): h_mask (D, B, P), recurrent dropout, the
    scaled mask W_hh reads h through at every step; zone_h (D, N, P) and zone_c (D, N, H)
    (LSTM), zoneout, each row's probabilities of keeping the previous h and c."""
    spec = SPECS[cell]
    one = W_hh.dim() == 2
    directions = 1 if one else W_hh.shape[0]
    outputs, finals = [], []
    for d in range(directions):
        given = (W_ih, W_hh, b_ih, b_hh, W_hr) + (() if norms is None else (norms,))
        weights = [w if w is None or one else w[d] for w in given]
        states = (h0[d], c0[d]) if spec.states == 2 else (h0[d],)
        mask = None if h_mask is None else h_mask[d]
        zones = tuple(None if z is None else z[d] for z in (zone_h, zone_c)[: spec.states])
        y, final = _direction(x, batch_sizes, d == 1, states, spec.step, weights, mask, zones)
        outputs.append(y)
        finals.append(final)
    y = torch.cat(outputs, 1)
    return (y, *(torch.stack([f[k] for f in finals]) for k in range(spec.states)))


def step(
    cell: str, x: Tensor, states: Sequence[Tensor], weights: Sequence[Tensor | None]
) -> tuple[Tensor, ...]:
    """One step of a cell: x (B, I), states ((B, H)[, (B, H)]), weights [W_ih, W_hh, b_ih,
    b_hh] -> the new state(s) as a tuple."""
    _, new = SPECS[cell].step(x, tuple(states), *weights, None)
    return tuple(new)
