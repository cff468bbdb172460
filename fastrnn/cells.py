"""One description per cell: what every other layer of fastrnn takes as a parameter.

A cell kind is named as torch._VF names its function (lstm, gru, rnn_tanh, rnn_relu; the opt-in
variants get names in that style, e.g. layernorm_lstm). Its spec
holds the gate count G (W_ih and W_hh have G * H rows, in torch's gate order), the number of
states it carries, whether it can project h (LSTM's proj_size), and its reference step: the
textbook formulas in plain torch, which `reference.layer` loops over time and the tests compare
the kernels with.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

# (x_t (B, I), states ((B, P)[, (B, H)]), W_ih (G*H, I), W_hh (G*H, P), b_ih, b_hh (G*H,) or
# None, W_hr (P, H) or None, product_h=None) -> (output (B, P), new states); product_h (B, P):
# the h that W_hh multiplies, if not h itself (recurrent dropout: the masked h)
ReferenceStep = Callable[..., tuple[Tensor, tuple[Tensor, ...]]]


@dataclass(frozen=True)
class CellSpec:
    kind: str
    gates: int
    states: int
    projects: bool
    step: ReferenceStep


def lstm_step(x, states, W_ih, W_hh, b_ih, b_hh, W_hr, product_h=None):
    """LSTM, gates i, f, g, o: c' = σ(f) c + σ(i) tanh(g), h' = σ(o) tanh(c') (@ W_hr^T)."""
    h, c = states
    gates = x @ W_ih.T + (h if product_h is None else product_h) @ W_hh.T
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    if W_hr is not None:
        h = h @ W_hr.T
    return h, (h, c)


def gru_step(x, states, W_ih, W_hh, b_ih, b_hh, W_hr, product_h=None):
    """GRU, gates r, z, n, "reset after" (torch/cuDNN): n = tanh(W_in x + b_in + r (W_hn h +
    b_hn)), h' = (1 - z) n + z h (with product_h, W_h* multiply it, and z still h)."""
    (h,) = states
    xi = x @ W_ih.T
    hh = (h if product_h is None else product_h) @ W_hh.T
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


def gru_reset_before_step(x, states, W_ih, W_hh, b_ih, b_hh, W_hr):
    """GRU, gates r, z, n, "reset before" (the original paper's, Keras reset_after=False):
    n = tanh(W_in x + b_in + W_hn (r h) + b_hn), h' = (1 - z) n + z h."""
    (h,) = states
    hidden = h.shape[1]
    xi = x @ W_ih.T
    hh = h @ W_hh[: 2 * hidden].T
    if b_ih is not None:
        xi = xi + b_ih
        hh = hh + b_hh[: 2 * hidden]
    x_r, x_z, x_n = xi.chunk(3, dim=1)
    h_r, h_z = hh.chunk(2, dim=1)
    r = torch.sigmoid(x_r + h_r)
    z = torch.sigmoid(x_z + h_z)
    h_n = (r * h) @ W_hh[2 * hidden :].T
    if b_hh is not None:
        h_n = h_n + b_hh[2 * hidden :]
    n = torch.tanh(x_n + h_n)
    h = (1 - z) * n + z * h
    return h, (h,)


def _elman_step(activation: Callable[[Tensor], Tensor]) -> ReferenceStep:
    def step(x, states, W_ih, W_hh, b_ih, b_hh, W_hr, product_h=None):
        """Elman RNN: h' = act(W_ih x + b_ih + W_hh h + b_hh)."""
        (h,) = states
        pre = x @ W_ih.T + (h if product_h is None else product_h) @ W_hh.T
        if b_ih is not None:
            pre = pre + b_ih + b_hh
        h = activation(pre)
        return h, (h,)

    return step


# The layer norms' epsilon (added to the variance), torch.nn.LayerNorm's default as in haste's
# LayerNormLSTM reference.
LAYERNORM_EPS = 1e-5


def layernorm_widths(hidden: int) -> list[int]:
    """The widths of a layer-norm LSTM's `norms` vector (18 H per direction), in its order:
    gain and bias of the input side's norm (4H each), of the recurrent side's (4H each), of
    the cell's (H each)."""
    return [4 * hidden] * 4 + [hidden] * 2


def layernorm_lstm_step(x, states, W_ih, W_hh, b_ih, b_hh, W_hr, norms):
    """Layer-norm LSTM (Ba et al. 2016, as haste's LayerNormLSTM), gates i, f, g, o:
    gates = LN_ih(W_ih x) + LN_hh(W_hh h) + b_ih + b_hh, each LN over the 4H gate columns with
    its own gain and bias; c' = σ(f) c + σ(i) tanh(g), h' = σ(o) tanh(LN_c(c')) (LN over H).
    norms (18H,): the gains and biases in `layernorm_widths` order. No projection."""
    h, c = states
    hidden = c.shape[1]
    gain_ih, bias_ih, gain_hh, bias_hh, gain_c, bias_c = norms.split(layernorm_widths(hidden))
    width = (4 * hidden,)
    gates = F.layer_norm(x @ W_ih.T, width, gain_ih, bias_ih, LAYERNORM_EPS) + F.layer_norm(
        h @ W_hh.T, width, gain_hh, bias_hh, LAYERNORM_EPS
    )
    if b_ih is not None:
        gates = gates + b_ih + b_hh
    i, f, g, o = gates.chunk(4, dim=1)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    cell = F.layer_norm(c, (hidden,), gain_c, bias_c, LAYERNORM_EPS)
    h = torch.sigmoid(o) * torch.tanh(cell)
    return h, (h, c)


rnn_tanh_step = _elman_step(torch.tanh)
rnn_relu_step = _elman_step(torch.relu)

SPECS: dict[str, CellSpec] = {
    "lstm": CellSpec("lstm", gates=4, states=2, projects=True, step=lstm_step),
    "gru": CellSpec("gru", gates=3, states=1, projects=False, step=gru_step),
    "gru_reset_before": CellSpec(
        "gru_reset_before", gates=3, states=1, projects=False, step=gru_reset_before_step
    ),
    "rnn_tanh": CellSpec("rnn_tanh", gates=1, states=1, projects=False, step=rnn_tanh_step),
    "rnn_relu": CellSpec("rnn_relu", gates=1, states=1, projects=False, step=rnn_relu_step),
    "layernorm_lstm": CellSpec(
        "layernorm_lstm", gates=4, states=2, projects=False, step=layernorm_lstm_step
    ),
}


def masked_step(
    step: ReferenceStep,
    x: Tensor,
    states: tuple[Tensor, ...],
    weights,
    h_mask: Tensor | None,
    zone: tuple[Tensor | None, ...],
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """`step` with recurrent dropout and zoneout (both optional, None when off):
    h_mask (B, P), W_hh reads h_mask * h (Gal & Ghahramani 2016; the mask already scaled by
    1 / (1 - p)); zone: per state (B, P)[, (B, H)] the zoneout probabilities d of this step,
    state' = d * state + (1 - d) * new_state (Krueger et al. 2016). The output is h'."""
    product_h = None if h_mask is None else states[0] * h_mask
    _, new = step(x, states, *weights, product_h=product_h)
    new = tuple(
        n if d is None else d * s + (1 - d) * n for n, s, d in zip(new, states, zone, strict=True)
    )
    return new[0], new
