"""Stepwise strategy: the host runs the per-step recurrent products (cuBLAS, through torch) and
launches one fused pointwise kernel per step for all directions of a layer.

Every kernel here covers one processed step k of every direction: thread (d, b, j) over
(D, B, width), rows beyond the step's row count do nothing. See `cells` for the array layouts;
`rec` (D, B, G*H) holds this step's W_hh @ h products of each direction's active rows, and
`dh_rec` / `dh_raw` / `dh_direct` the backward's, all in the compute dtype (float32 for 16-bit
data: cuBLAS's float32 sums go to the gate math without a rounding to 16 bits).

Recurrent dropout and zoneout (`*_masked`, float32 / float64 data; definitions in
`fastrnn.recurrent_masks`): the host applies the dropout mask where h enters the product, and
with a projection the zoneout of h; these kernels zone out the rest. zone_h (D, N, P) and
zone_c (D, N, H) hold each row's probabilities of keeping its previous h and c, read where the
flags zoned_h, zoned_c say (else one-element stand-ins). LSTM: c_state and cell_cache hold
c' = zone_c c + (1 - zone_c) c_new, and h_new = o tanh(c_new). RNN: h_cache (D, N, H) keeps
h_new = act(pre) for act' (y holds the zoned-out states; flag cached_h). The plain kernels are
the masked ones with every flag off.
"""

from __future__ import annotations

import math

from numba import cuda

from .cells import unit_backward, unit_forward
from .common import GRU, LSTM, gate_count, put, sigmoid, step_span, wide

_JIT = {"cache": True}


@cuda.jit(device=True)
def _thread_coordinates(width, directions, batch):
    """(d, b, j, in range) of this thread over a (D, B, width) grid."""
    i = cuda.grid(1)
    j = i % width
    b = (i // width) % batch
    d = i // (width * batch)
    return d, b, j, d < directions


@cuda.jit(device=True)
def _forward(
    k, cell, relu, hidden, batch_sizes, offsets, has_proj, rec, inputs, gate_cache, cell_cache,
    c_state, b_hh, h_state, h_raw, y, one, zone_h, zone_c, h_cache, zoned_h, zoned_c, cached_h,
):  # fmt: skip
    d, b, j, ok = _thread_coordinates(hidden, h_state.shape[0], h_state.shape[1])
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
    # the unit's previous h (the GRU's gate math, h's zoneout) and c (c's zoneout)
    h_old = wide(h_state[d, b, j], one) if (cell == GRU or zoned_h) and not has_proj else zero
    c_old = wide(c_state[d, b, j], one) if cell == LSTM and zoned_c else zero
    h = unit_forward(
        cell, relu, d, n, b, j, hidden, wide(rec[d, b, j], one), rec1, rec2, rec3, h_old, inputs,
        gate_cache, cell_cache, c_state, b_hh, one,
    )  # fmt: skip
    if cell == LSTM and zoned_c:
        keep = wide(zone_c[d, n, j], one)
        c = keep * c_old + (one - keep) * wide(c_state[d, b, j], one)
        put(c_state, d, b, j, c)
        put(cell_cache, d, n, j, c)
    if cached_h:
        put(h_cache, d, n, j, h)
    if has_proj:
        put(h_raw, d, b, j, h)
        return
    if zoned_h:
        keep = wide(zone_h[d, n, j], one)
        h = keep * h_old + (one - keep) * h
    put(h_state, d, b, j, h)
    put(y, d, n, j, h)


@cuda.jit(**_JIT)
def step_forward(
    k, cell, relu, hidden, batch_sizes, offsets, has_proj, rec, inputs, gate_cache, cell_cache,
    c_state, b_hh, h_state, h_raw, y, one,
):  # fmt: skip
    """Step k forward. h_state (D, B, P) is the running hidden state (its rows fed `rec`); writes
    the new h into h_state and y (D, N, P), or with a projection into h_raw (D, B, H) for the
    host to project."""
    _forward(
        k, cell, relu, hidden, batch_sizes, offsets, has_proj, rec, inputs, gate_cache,
        cell_cache, c_state, b_hh, h_state, h_raw, y, one, y, y, y, False, False, False,
    )  # fmt: skip


@cuda.jit(**_JIT)
def step_forward_masked(
    k, cell, relu, hidden, batch_sizes, offsets, has_proj, rec, inputs, gate_cache, cell_cache,
    c_state, b_hh, h_state, h_raw, y, one, zone_h, zone_c, h_cache, zoned_h, zoned_c, cached_h,
):  # fmt: skip
    """`step_forward` with zoneout: h (without a projection; with one the host zones out the
    projected h) and the LSTM's c."""
    _forward(
        k, cell, relu, hidden, batch_sizes, offsets, has_proj, rec, inputs, gate_cache,
        cell_cache, c_state, b_hh, h_state, h_raw, y, one, zone_h, zone_c, h_cache, zoned_h,
        zoned_c, cached_h,
    )  # fmt: skip


@cuda.jit(**_JIT)
def hidden_grad_step(k, batch_sizes, offsets, dy, dh_n, dh_rec, dh_total, dh0, one):
    """Step k of backward, before the gate math when the layer has a projection: thread
    (d, b, p) over (D, B, P). dL/dh of each active row = its output gradient dy (D, N, P) plus
    what flows back from the next processed step (dh_rec (D, B, P), valid for that step's rows)
    or, for a row that ends here, dh_n; written to dh_total (D, N, P). A row absent from step k
    but present in step k+1 started at k+1: its carried gradient is dL/dh0."""
    d, b, p, ok = _thread_coordinates(dh0.shape[2], dh0.shape[0], dh0.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    rows_next, _ = step_span(k + 1, d, batch_sizes, offsets)
    if b < rows:
        carried = wide(dh_rec[d, b, p], one) if b < rows_next else wide(dh_n[d, b, p], one)
        put(dh_total, d, off + b, p, wide(dy[d, off + b, p], one) + carried)
    elif b < rows_next:
        put(dh0, d, b, p, wide(dh_rec[d, b, p], one))


@cuda.jit(device=True)
def _backward(
    k, cell, relu, hidden, batch_sizes, offsets, has_proj, dy, dh_n, dh_rec, dh_raw, h0, c0, y,
    gate_cache, cell_cache, dc_state, d_input, d_recurrent, dh_direct, dh0, one, zone_h, zone_c,
    h_cache, zoned_h, zoned_c, cached_h,
):  # fmt: skip
    d, b, j, ok = _thread_coordinates(hidden, dh_direct.shape[0], dh_direct.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    rows_next, _ = step_span(k + 1, d, batch_sizes, offsets)
    if b < rows:
        n = off + b
        skip = one - one
        if has_proj:
            dh = wide(dh_raw[d, b, j], one)
        else:
            carried = wide(dh_rec[d, b, j], one) if b < rows_next else wide(dh_n[d, b, j], one)
            dh = wide(dy[d, n, j], one) + carried
            if zoned_h:  # zoneout's share of dL/dh' skips the cell
                keep = wide(zone_h[d, n, j], one)
                skip = keep * dh
                dh = (one - keep) * dh
        rows_prev, off_prev = step_span(k - 1, d, batch_sizes, offsets)
        direct = unit_backward(
            cell, relu, d, n, b, j, hidden, dh, rows_prev, off_prev, h0, c0,
            h_cache if cached_h else y, gate_cache, cell_cache, dc_state, d_input, d_recurrent,
            zone_c, zoned_c, one,
        )  # fmt: skip
        put(dh_direct, d, b, j, direct + skip if zoned_h else direct)
    elif b < rows_next and not has_proj:
        put(dh0, d, b, j, wide(dh_rec[d, b, j], one))


@cuda.jit(**_JIT)
def step_backward(
    k, cell, relu, hidden, batch_sizes, offsets, has_proj, dy, dh_n, dh_rec, dh_raw, h0, c0, y,
    gate_cache, cell_cache, dc_state, d_input, d_recurrent, dh_direct, dh0, one,
):  # fmt: skip
    """Step k of backward (k = -1 only hands the last carried gradients to dh0). dL/dh of each
    active row is resolved as in `hidden_grad_step`, or with a projection read from dh_raw
    (D, B, H) = dh_total @ W_hr. Writes the gate pre-activation gradients (d_input, d_recurrent)
    of the step's rows and dh_direct (D, B, H), the part of dL/dh_prev that skips W_hh; the host
    then forms dh_rec = d_recurrent @ W_hh + dh_direct for step k - 1."""
    _backward(
        k, cell, relu, hidden, batch_sizes, offsets, has_proj, dy, dh_n, dh_rec, dh_raw, h0, c0,
        y, gate_cache, cell_cache, dc_state, d_input, d_recurrent, dh_direct, dh0, one, y, y, y,
        False, False, False,
    )  # fmt: skip


@cuda.jit(**_JIT)
def step_backward_masked(
    k, cell, relu, hidden, batch_sizes, offsets, has_proj, dy, dh_n, dh_rec, dh_raw, h0, c0, y,
    gate_cache, cell_cache, dc_state, d_input, d_recurrent, dh_direct, dh0, one, zone_h, zone_c,
    h_cache, zoned_h, zoned_c, cached_h,
):  # fmt: skip
    """`step_backward` through zoneout: dh_direct gets, besides the part of dL/dh_prev that
    skips W_hh inside the cell, zone_h dL/dh' (without a projection; with one the host takes
    zoneout's share before dh_raw); the host multiplies its product with W_hh by the recurrent
    dropout mask before adding dh_direct."""
    _backward(
        k, cell, relu, hidden, batch_sizes, offsets, has_proj, dy, dh_n, dh_rec, dh_raw, h0, c0,
        y, gate_cache, cell_cache, dc_state, d_input, d_recurrent, dh_direct, dh0, one, zone_h,
        zone_c, h_cache, zoned_h, zoned_c, cached_h,
    )  # fmt: skip


# The "reset before" GRU (gates r, z, n; n = tanh(W_in x + b_in + W_hn (r h) + b_hn)): W_hn
# multiplies r * h, so each step has two products and the unit's math runs in two halves around
# the second. Per step, the host's product h @ W_h{r,z}^T into rec (D, B, 2H), `gated_step_gates`,
# the product gated @ W_hn^T into `product` (D, B, H), then `gated_step_output`; backward
# `gated_step_backward_output`, dn @ W_hn into `through`, `gated_step_backward_gates`, then
# dh_rec = d_input's r and z blocks @ W_h{r,z} + dh_direct. Layouts as the GRU's, but
# gate_cache (D, N, 4H) holds r, z, n and r * h; d_input (D, N, 3H) is both sides' gradient.


@cuda.jit(**_JIT)
def gated_step_gates(k, hidden, batch_sizes, offsets, rec, inputs, gate_cache, b_hh, h_state,
                     gated, one):  # fmt: skip
    """Step k, first half: r and z, cached with gated (D, B, H) = r * h, the second product's
    input."""
    d, b, j, ok = _thread_coordinates(hidden, h_state.shape[0], h_state.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    if b >= rows:
        return
    n = off + b
    r = sigmoid(wide(inputs[d, n, j], one) + wide(rec[d, b, j], one) + wide(b_hh[d, j], one), one)
    z = sigmoid(
        wide(inputs[d, n, hidden + j], one) + wide(rec[d, b, hidden + j], one)
        + wide(b_hh[d, hidden + j], one), one,
    )  # fmt: skip
    value = r * wide(h_state[d, b, j], one)
    put(gate_cache, d, n, j, r)
    put(gate_cache, d, n, hidden + j, z)
    put(gate_cache, d, n, 3 * hidden + j, value)
    put(gated, d, b, j, value)


@cuda.jit(**_JIT)
def gated_step_output(k, hidden, batch_sizes, offsets, product, inputs, gate_cache, b_hh,
                      h_state, y, one):  # fmt: skip
    """Step k, second half: n from product = W_hn (r h) (cached), the new h into h_state
    (D, B, H) and y (D, N, H)."""
    d, b, j, ok = _thread_coordinates(hidden, h_state.shape[0], h_state.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    if b >= rows:
        return
    n = off + b
    z = wide(gate_cache[d, n, hidden + j], one)
    b_n = wide(b_hh[d, 2 * hidden + j], one)
    new = math.tanh(wide(inputs[d, n, 2 * hidden + j], one) + (wide(product[d, b, j], one) + b_n))
    put(gate_cache, d, n, 2 * hidden + j, new)
    h = (one - z) * new + z * wide(h_state[d, b, j], one)
    put(h_state, d, b, j, h)
    put(y, d, n, j, h)


@cuda.jit(**_JIT)
def gated_step_backward_output(k, hidden, batch_sizes, offsets, dy, dh_n, dh_rec, h0, y,
                               gate_cache, d_input, gated_grads, dh_direct, dh0, one):  # fmt: skip
    """Step k of backward, first half (k = -1 only hands the carried gradients to dh0): dL/dh
    resolved as in `step_backward`; dz, dn into d_input, dn into gated_grads (D, B, H) (the
    second product's input), z * dh (the part that skips both products) into dh_direct."""
    d, b, j, ok = _thread_coordinates(hidden, dh_direct.shape[0], dh_direct.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    rows_next, _ = step_span(k + 1, d, batch_sizes, offsets)
    if b < rows:
        n = off + b
        carried = wide(dh_rec[d, b, j], one) if b < rows_next else wide(dh_n[d, b, j], one)
        dh = wide(dy[d, n, j], one) + carried
        rows_prev, off_prev = step_span(k - 1, d, batch_sizes, offsets)
        h_prev = wide(y[d, off_prev + b, j] if b < rows_prev else h0[d, b, j], one)
        z = wide(gate_cache[d, n, hidden + j], one)
        new = wide(gate_cache[d, n, 2 * hidden + j], one)
        d_new = dh * (one - z) * (one - new * new)
        put(d_input, d, n, hidden + j, dh * (h_prev - new) * z * (one - z))
        put(d_input, d, n, 2 * hidden + j, d_new)
        put(gated_grads, d, b, j, d_new)
        put(dh_direct, d, b, j, dh * z)
    elif b < rows_next:
        put(dh0, d, b, j, wide(dh_rec[d, b, j], one))


@cuda.jit(**_JIT)
def gated_step_backward_gates(k, hidden, batch_sizes, offsets, through, gate_cache, d_input,
                              dh_direct, one):  # fmt: skip
    """Step k of backward, second half: from through (D, B, H) = dn @ W_hn, dL/d(r h), dr into
    d_input; dh_direct gains through * r, the part of dL/dh through r * h."""
    d, b, j, ok = _thread_coordinates(hidden, dh_direct.shape[0], dh_direct.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    if b >= rows:
        return
    n = off + b
    part = wide(through[d, b, j], one)
    r = wide(gate_cache[d, n, j], one)
    put(d_input, d, n, j, part * wide(gate_cache[d, n, 3 * hidden + j], one) * (one - r))
    put(dh_direct, d, b, j, wide(dh_direct[d, b, j], one) + part * r)
