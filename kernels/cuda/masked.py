"""Recurrent dropout and zoneout in the stepwise strategy (`stepwise`): the per-step kernels
with zoneout around each cell's gate math (`cells`); the host applies the recurrent dropout mask
where h enters the per-step product, and with a projection the zoneout of h
(`fastrnn.recurrence_cuda`). Definitions in `fastrnn.recurrent_masks`.

Masks: zone_h (D, N, P) and zone_c (D, N, H), each row's probabilities of keeping its
previous h and c, read where the flags zoned_h, zoned_c say (else one-element stand-ins).
LSTM: c_state and cell_cache hold c' = zone_c c + (1 - zone_c) c_new, the state, and
h_new = o tanh(c_new), so backward recomputes c_new = f c + i g. RNN: h_cache (D, N, H) keeps
h_new = act(pre) for act' (y holds the zoned-out states; flag cached_h). GRU: nothing more (its
backward reads the consumed h from y). Everything else as in `stepwise`.
"""

from __future__ import annotations

import math

from numba import cuda

from .cells import unit_backward, unit_forward
from .common import LSTM, RNN, activation_grad, gate_count, put, step_span, wide

_JIT = {"cache": True}


@cuda.jit(device=True)
def _coordinates(width, directions, batch):
    i = cuda.grid(1)
    j = i % width
    b = (i // width) % batch
    d = i // (width * batch)
    return d, b, j, d < directions


@cuda.jit(**_JIT)
def step_forward_masked(
    cell, relu, k, hidden, batch_sizes, offsets, has_proj, rec, inputs, gate_cache, cell_cache,
    c_state, b_hh, h_state, h_raw, y, zone_h, zone_c, h_cache, zoned_h, zoned_c, cached_h, one,
):  # fmt: skip
    """`stepwise.step_forward` with zoneout: h (without a projection; with one the host zones
    out the projected h) and the LSTM's c."""
    d, b, j, ok = _coordinates(hidden, h_state.shape[0], h_state.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    if b >= rows:
        return
    n = off + b
    gates = gate_count(cell)
    zero = one - one
    rec1 = wide(rec[d, b, hidden + j], one) if gates > 1 else zero
    rec2 = wide(rec[d, b, 2 * hidden + j], one) if gates > 1 else zero
    rec3 = wide(rec[d, b, 3 * hidden + j], one) if gates > 3 else zero
    h_old = wide(h_state[d, b, j], one) if not has_proj else zero
    c_old = wide(c_state[d, b, j], one) if cell == LSTM else zero
    h = unit_forward(
        cell, relu, d, n, b, j, hidden, wide(rec[d, b, j], one), rec1, rec2, rec3, h_old, inputs,
        gate_cache, cell_cache, c_state, b_hh, one,
    )  # fmt: skip
    if cell == LSTM and zoned_c:
        keep = wide(zone_c[d, n, j], one)
        c = keep * c_old + (one - keep) * wide(c_state[d, b, j], one)
        put(c_state, d, b, j, c)
        put(cell_cache, d, n, j, c)
    if cell == RNN and cached_h:
        put(h_cache, d, n, j, h)
    if has_proj:
        put(h_raw, d, b, j, h)
        return
    if zoned_h:
        keep = wide(zone_h[d, n, j], one)
        h = keep * h_old + (one - keep) * h
    put(h_state, d, b, j, h)
    put(y, d, n, j, h)


@cuda.jit(device=True)
def _lstm_unit_backward(
    d, n, b, j, hidden, dh, rows_prev, off_prev, c0, gate_cache, cell_cache, dc_state, d_input,
    zone_c, one,
):  # fmt: skip
    """`cells.unit_backward` of the LSTM through c's zoneout: dL/dc_new =
    (1 - zone_c) dL/dc' and zone_c dL/dc' passes to c as it is; c_new recomputed."""
    if b < rows_prev:
        c_prev = wide(cell_cache[d, off_prev + b, j], one)
    else:
        c_prev = wide(c0[d, b, j], one)
    i = wide(gate_cache[d, n, j], one)
    f = wide(gate_cache[d, n, hidden + j], one)
    g = wide(gate_cache[d, n, 2 * hidden + j], one)
    o = wide(gate_cache[d, n, 3 * hidden + j], one)
    c_new = f * c_prev + i * g
    tc = math.tanh(c_new)
    keep = wide(zone_c[d, n, j], one)
    carried = wide(dc_state[d, b, j], one)
    dc = (one - keep) * carried + dh * o * (one - tc * tc)
    put(d_input, d, n, j, dc * g * i * (one - i))
    put(d_input, d, n, hidden + j, dc * c_prev * f * (one - f))
    put(d_input, d, n, 2 * hidden + j, dc * i * (one - g * g))
    put(d_input, d, n, 3 * hidden + j, dh * tc * o * (one - o))
    put(dc_state, d, b, j, dc * f + keep * carried)


@cuda.jit(**_JIT)
def step_backward_masked(
    cell, relu, k, hidden, batch_sizes, offsets, has_proj, dy, dh_n, dh_rec, dh_raw, h0, c0, y,
    gate_cache, cell_cache, dc_state, d_input, d_recurrent, dh_direct, dh0, zone_h, zone_c,
    h_cache, zoned_h, zoned_c, cached_h, one,
):  # fmt: skip
    """`stepwise.step_backward` through zoneout: dh_direct gets, besides the part of dL/dh_prev
    that skips W_hh inside the cell (the GRU's z dh), zone_h dL/dh' (without a projection;
    with one the host takes zoneout's share before dh_raw); the host multiplies its product
    with W_hh by the recurrent dropout mask before adding dh_direct."""
    d, b, j, ok = _coordinates(hidden, dh_direct.shape[0], dh_direct.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    rows_next, _ = step_span(k + 1, d, batch_sizes, offsets)
    zero = one - one
    if b < rows:
        n = off + b
        skip = zero
        if has_proj:
            dh = wide(dh_raw[d, b, j], one)
        else:
            if b < rows_next:
                carried = wide(dh_rec[d, b, j], one)
            else:
                carried = wide(dh_n[d, b, j], one)
            dh = wide(dy[d, n, j], one) + carried
            if zoned_h:
                keep = wide(zone_h[d, n, j], one)
                skip = keep * dh
                dh = (one - keep) * dh
        rows_prev, off_prev = step_span(k - 1, d, batch_sizes, offsets)
        if cell == LSTM and zoned_c:
            _lstm_unit_backward(
                d, n, b, j, hidden, dh, rows_prev, off_prev, c0, gate_cache, cell_cache,
                dc_state, d_input, zone_c, one,
            )  # fmt: skip
            direct = zero
        elif cell == RNN and cached_h:
            put(d_input, d, n, j, dh * activation_grad(wide(h_cache[d, n, j], one), relu, one))
            direct = zero
        else:
            direct = unit_backward(
                cell, relu, d, n, b, j, hidden, dh, rows_prev, off_prev, h0, c0, y, gate_cache,
                cell_cache, dc_state, d_input, d_recurrent, one,
            )  # fmt: skip
        put(dh_direct, d, b, j, direct + skip)
    elif b < rows_next and not has_proj:
        put(dh0, d, b, j, wide(dh_rec[d, b, j], one))
