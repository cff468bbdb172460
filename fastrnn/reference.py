"""Plain-torch, step-by-step reference of one layer-direction of each cell.

Readable on purpose: a loop over time with the textbook formulas, differentiable by autograd, and
never called from the library's hot path. Tests compare the kernels (outputs and, through
autograd, every gradient) against these functions.

Layout (same as the kernels): x (N, I) holds the rows of every step back to back, step t having
`batch_sizes[t]` rows (non-increasing); a dense (T, B, I) input is x.reshape(T * B, I) with every
batch size B. Row r of step t continues row r of the previous processed step, or starts from
h0[r] (c0[r]) if that step had no row r.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _run_layer(
    x: Tensor,
    batch_sizes: Tensor,
    reverse: bool,
    states: tuple[Tensor, ...],
    step: Callable[[Tensor, tuple[Tensor, ...]], tuple[Tensor, tuple[Tensor, ...]]],
) -> tuple[Tensor, tuple[Tensor, ...]]:
    sizes = [int(b) for b in batch_sizes]
    offsets = [0]
    for size in sizes:
        offsets.append(offsets[-1] + size)
    order = range(len(sizes) - 1, -1, -1) if reverse else range(len(sizes))
    outputs: list[Tensor | None] = [None] * len(sizes)
    current = list(states)
    for t in order:
        rows = sizes[t]
        out, new = step(x[offsets[t] : offsets[t] + rows], tuple(s[:rows] for s in current))
        outputs[t] = out
        current = [torch.cat([n, s[rows:]]) for n, s in zip(new, current, strict=True)]
    return torch.cat(outputs), tuple(current)  # type: ignore[arg-type]


def lstm_layer(
    x: Tensor,
    batch_sizes: Tensor,
    reverse: bool,
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    W_hr: Tensor | None,
    h0: Tensor,
    c0: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """LSTM, gates i, f, g, o. Returns y (N, P), h_n (B, P), c_n (B, H)."""

    def step(x_t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        h, c = state
        gates = x_t @ W_ih.T + h @ W_hh.T
        if b_ih is not None:
            gates = gates + b_ih + b_hh
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        if W_hr is not None:
            h = h @ W_hr.T
        return h, (h, c)

    y, (h_n, c_n) = _run_layer(x, batch_sizes, reverse, (h0, c0), step)
    return y, h_n, c_n


def gru_layer(
    x: Tensor,
    batch_sizes: Tensor,
    reverse: bool,
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    h0: Tensor,
) -> tuple[Tensor, Tensor]:
    """GRU, gates r, z, n, "reset after" (torch/cuDNN). Returns y (N, H), h_n (B, H)."""

    def step(x_t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        (h,) = state
        xi = x_t @ W_ih.T
        hh = h @ W_hh.T
        if b_ih is not None:
            xi = xi + b_ih
            hh = hh + b_hh
        x_r, x_z, x_n = xi.chunk(3, dim=1)
        h_r, h_z, h_n = hh.chunk(3, dim=1)
        r = torch.sigmoid(x_r + h_r)
        z = torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        h = (1 - z) * n + z * h
        return h, (h,)

    y, (h_n,) = _run_layer(x, batch_sizes, reverse, (h0,), step)
    return y, h_n


def rnn_layer(
    x: Tensor,
    batch_sizes: Tensor,
    reverse: bool,
    relu: bool,
    W_ih: Tensor,
    W_hh: Tensor,
    b_ih: Tensor | None,
    b_hh: Tensor | None,
    h0: Tensor,
) -> tuple[Tensor, Tensor]:
    """Elman RNN, h' = tanh or relu of (W_ih x + b_ih + W_hh h + b_hh). Returns y, h_n."""

    def step(x_t: Tensor, state: tuple[Tensor, ...]) -> tuple[Tensor, tuple[Tensor, ...]]:
        (h,) = state
        pre = x_t @ W_ih.T + h @ W_hh.T
        if b_ih is not None:
            pre = pre + b_ih + b_hh
        h = torch.relu(pre) if relu else torch.tanh(pre)
        return h, (h,)

    y, (h_n,) = _run_layer(x, batch_sizes, reverse, (h0,), step)
    return y, h_n
