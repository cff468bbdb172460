"""Stepwise strategy: the host runs the per-step recurrent products (cuBLAS, through torch) and
launches one fused pointwise kernel per step for all directions of a layer.

Every kernel here covers one processed step k of every direction: thread (d, b, j) over
(D, B, width), rows beyond the step's row count do nothing. See `cells` for the array layouts;
`rec` (D, B, G*H) holds this step's W_hh @ h products of each direction's active rows, and
`dh_rec` / `dh_raw` / `dh_direct` the backward's, all in the compute dtype (float32 for 16-bit
data: cuBLAS's float32 sums go to the gate math without a rounding to 16 bits).
"""

from __future__ import annotations

from numba import cuda

from .cells import (
    gated_unit_backward_gates,
    gated_unit_backward_output,
    gated_unit_gates,
    gated_unit_output,
    unit_backward,
    unit_forward,
)
from .common import GRU, gate_count, put, step_span, wide

_JIT = {"cache": True}


@cuda.jit(device=True)
def _thread_coordinates(width, directions, batch):
    """(d, b, j, in range) of this thread over a (D, B, width) grid."""
    i = cuda.grid(1)
    j = i % width
    b = (i // width) % batch
    d = i // (width * batch)
    return d, b, j, d < directions


@cuda.jit(**_JIT)
def step_forward(
    cell,
    relu,
    k,
    hidden,
    batch_sizes,
    offsets,
    has_proj,
    rec,
    inputs,
    gate_cache,
    cell_cache,
    c_state,
    b_hh,
    h_state,
    h_raw,
    y,
    one,
):
    """Step k forward. h_state (D, B, P) is the running hidden state (its rows fed `rec`); writes
    the new h into h_state and y (D, N, P), or with a projection into h_raw (D, B, H) for the
    host to project."""
    d, b, j, ok = _thread_coordinates(hidden, h_state.shape[0], h_state.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    if b >= rows:
        return
    gates = gate_count(cell)
    zero = one - one
    rec1 = wide(rec[d, b, hidden + j], one) if gates > 1 else zero
    rec2 = wide(rec[d, b, 2 * hidden + j], one) if gates > 1 else zero
    rec3 = wide(rec[d, b, 3 * hidden + j], one) if gates > 3 else zero
    h_prev = wide(h_state[d, b, j], one) if cell == GRU else zero
    h = unit_forward(
        cell,
        relu,
        d,
        off + b,
        b,
        j,
        hidden,
        wide(rec[d, b, j], one),
        rec1,
        rec2,
        rec3,
        h_prev,
        inputs,
        gate_cache,
        cell_cache,
        c_state,
        b_hh,
        one,
    )
    if has_proj:
        put(h_raw, d, b, j, h)
    else:
        put(h_state, d, b, j, h)
        put(y, d, off + b, j, h)


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
        if b < rows_next:
            carried = wide(dh_rec[d, b, p], one)
        else:
            carried = wide(dh_n[d, b, p], one)
        put(dh_total, d, off + b, p, wide(dy[d, off + b, p], one) + carried)
    elif b < rows_next:
        put(dh0, d, b, p, wide(dh_rec[d, b, p], one))


@cuda.jit(**_JIT)
def step_backward(
    cell,
    relu,
    k,
    hidden,
    batch_sizes,
    offsets,
    has_proj,
    dy,
    dh_n,
    dh_rec,
    dh_raw,
    h0,
    c0,
    y,
    gate_cache,
    cell_cache,
    dc_state,
    d_input,
    d_recurrent,
    dh_direct,
    dh0,
    one,
):
    """Step k of backward (k = -1 only hands the last carried gradients to dh0). dL/dh of each
    active row is resolved as in `hidden_grad_step`, or with a projection read from dh_raw
    (D, B, H) = dh_total @ W_hr. Writes the gate pre-activation gradients (d_input, d_recurrent)
    of the step's rows and dh_direct (D, B, H), the part of dL/dh_prev that skips W_hh; the host
    then forms dh_rec = d_recurrent @ W_hh + dh_direct for step k - 1."""
    d, b, j, ok = _thread_coordinates(hidden, dh_direct.shape[0], dh_direct.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    rows_next, _ = step_span(k + 1, d, batch_sizes, offsets)
    if b < rows:
        if has_proj:
            dh = wide(dh_raw[d, b, j], one)
        else:
            if b < rows_next:
                carried = wide(dh_rec[d, b, j], one)
            else:
                carried = wide(dh_n[d, b, j], one)
            dh = wide(dy[d, off + b, j], one) + carried
        rows_prev, off_prev = step_span(k - 1, d, batch_sizes, offsets)
        direct = unit_backward(
            cell,
            relu,
            d,
            off + b,
            b,
            j,
            hidden,
            dh,
            rows_prev,
            off_prev,
            h0,
            c0,
            y,
            gate_cache,
            cell_cache,
            dc_state,
            d_input,
            d_recurrent,
            one,
        )
        put(dh_direct, d, b, j, direct)
    elif b < rows_next and not has_proj:
        put(dh0, d, b, j, wide(dh_rec[d, b, j], one))


# The "reset before" GRU (`cells.gated_*`): per step, the host's product h @ W_h{r,z}^T into
# rec (D, B, 2H), `gated_step_gates`, the product gated @ W_hn^T into `product` (D, B, H), then
# `gated_step_output`; backward `gated_step_backward_output`, dn @ W_hn into `through`,
# `gated_step_backward_gates`, then dh_rec = d_input's r and z blocks @ W_h{r,z} + dh_direct.


@cuda.jit(**_JIT)
def gated_step_gates(k, hidden, batch_sizes, offsets, rec, inputs, gate_cache, b_hh, h_state,
                     gated, one):  # fmt: skip
    """Step k, first half: r and z, and gated (D, B, H) = r * h, from rec's products."""
    d, b, j, ok = _thread_coordinates(hidden, h_state.shape[0], h_state.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    if b >= rows:
        return
    value = gated_unit_gates(
        d, off + b, j, hidden, wide(rec[d, b, j], one), wide(rec[d, b, hidden + j], one),
        wide(h_state[d, b, j], one), inputs, b_hh, gate_cache, one,
    )  # fmt: skip
    put(gated, d, b, j, value)


@cuda.jit(**_JIT)
def gated_step_output(k, hidden, batch_sizes, offsets, product, inputs, gate_cache, b_hh,
                      h_state, y, one):  # fmt: skip
    """Step k, second half: the new h into h_state (D, B, H) and y (D, N, H)."""
    d, b, j, ok = _thread_coordinates(hidden, h_state.shape[0], h_state.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    if b >= rows:
        return
    h = gated_unit_output(
        d, off + b, j, hidden, wide(product[d, b, j], one), wide(h_state[d, b, j], one), inputs,
        b_hh, gate_cache, one,
    )  # fmt: skip
    put(h_state, d, b, j, h)
    put(y, d, off + b, j, h)


@cuda.jit(**_JIT)
def gated_step_backward_output(k, hidden, batch_sizes, offsets, dy, dh_n, dh_rec, h0, y,
                               gate_cache, d_input, gated_grads, dh_direct, dh0, one):  # fmt: skip
    """Step k of backward, first half (k = -1 only hands the carried gradients to dh0): dL/dh
    resolved as in `step_backward`; dz, dn into d_input, dn into gated_grads (D, B, H), z * dh
    into dh_direct (D, B, H)."""
    d, b, j, ok = _thread_coordinates(hidden, dh_direct.shape[0], dh_direct.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    rows_next, _ = step_span(k + 1, d, batch_sizes, offsets)
    if b < rows:
        carried = wide(dh_rec[d, b, j], one) if b < rows_next else wide(dh_n[d, b, j], one)
        dh = wide(dy[d, off + b, j], one) + carried
        rows_prev, off_prev = step_span(k - 1, d, batch_sizes, offsets)
        h_prev = wide(y[d, off_prev + b, j] if b < rows_prev else h0[d, b, j], one)
        d_new, direct = gated_unit_backward_output(
            d, off + b, j, hidden, dh, h_prev, gate_cache, d_input, one
        )
        put(gated_grads, d, b, j, d_new)
        put(dh_direct, d, b, j, direct)
    elif b < rows_next:
        put(dh0, d, b, j, wide(dh_rec[d, b, j], one))


@cuda.jit(**_JIT)
def gated_step_backward_gates(k, hidden, batch_sizes, offsets, through, gate_cache, d_input,
                              dh_direct, one):  # fmt: skip
    """Step k of backward, second half: dr into d_input from through (D, B, H) = dn @ W_hn;
    dh_direct gains through * r."""
    d, b, j, ok = _thread_coordinates(hidden, dh_direct.shape[0], dh_direct.shape[1])
    if not ok:
        return
    rows, off = step_span(k, d, batch_sizes, offsets)
    if b >= rows:
        return
    part = gated_unit_backward_gates(
        d, off + b, j, hidden, wide(through[d, b, j], one), gate_cache, d_input, one
    )
    put(dh_direct, d, b, j, wide(dh_direct[d, b, j], one) + part)
