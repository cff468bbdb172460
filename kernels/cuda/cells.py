"""The gate math of one hidden unit of one row at one step, for every cell, forward and backward.

Both kernel strategies (`stepwise`, `persistent`) call these, so the per-step logic is the same
code whether the recurrent products come from cuBLAS or from the persistent kernel's own loop.

Arguments shared by all functions: `cell` (common.LSTM / GRU / RNN), `relu` (RNN only), direction
`d`, packed row `n`, batch row `b`, unit `j`, hidden size `hidden`, and `one`.
Array layouts (D directions, N packed rows, B batch rows):
    LSTM: gate_cache (D, N, 4H): in x @ W_ih^T + b_ih + b_hh, out activated gates i, f, g, o;
          cell_cache (D, N, H): c of every row; c_state (D, B, H): running (forward) cell state.
    GRU:  inputs (D, N, 3H) = x @ W_ih^T + b_ih; b_hh (D, 3H);
          gate_cache (D, N, 4H): out r, z, n and W_hn h + b_hn (backward needs the last).
    RNN:  inputs = y (D, N, H): in x @ W_ih^T + b_ih + b_hh, out h.
Storage may be float16 (every load is widened to `one`'s dtype, float32, and the math runs
there; stores round back); LSTM's cell state (c_state, cell_cache, dc_state) is then float32.
The recurrent products rec0..rec3, h_prev and dh arrive already widened.
"""

from __future__ import annotations

import math

from numba import cuda

from .common import GRU, LSTM, activation, activation_grad, put, sigmoid, wide


@cuda.jit(device=True)
def unit_forward(
    cell, relu, d, n, b, j, hidden, rec0, rec1, rec2, rec3, h_prev, inputs, gate_cache,
    cell_cache, c_state, b_hh, one,
):  # fmt: skip
    """New hidden value of unit j (for LSTM before the projection), given the recurrent products
    rec0..rec3 = (W_hh h)[g * H + j] of gates g = 0..G-1 and the unit's own previous h."""
    if cell == LSTM:
        i = sigmoid(wide(gate_cache[d, n, j], one) + rec0, one)
        f = sigmoid(wide(gate_cache[d, n, hidden + j], one) + rec1, one)
        g = math.tanh(wide(gate_cache[d, n, 2 * hidden + j], one) + rec2)
        o = sigmoid(wide(gate_cache[d, n, 3 * hidden + j], one) + rec3, one)
        c = f * wide(c_state[d, b, j], one) + i * g
        put(gate_cache, d, n, j, i)
        put(gate_cache, d, n, hidden + j, f)
        put(gate_cache, d, n, 2 * hidden + j, g)
        put(gate_cache, d, n, 3 * hidden + j, o)
        put(c_state, d, b, j, c)
        put(cell_cache, d, n, j, c)
        return o * math.tanh(c)
    if cell == GRU:
        r = sigmoid(wide(inputs[d, n, j], one) + rec0 + wide(b_hh[d, j], one), one)
        z = sigmoid(
            wide(inputs[d, n, hidden + j], one) + rec1 + wide(b_hh[d, hidden + j], one), one
        )
        hn = rec2 + wide(b_hh[d, 2 * hidden + j], one)
        new = math.tanh(wide(inputs[d, n, 2 * hidden + j], one) + r * hn)
        put(gate_cache, d, n, j, r)
        put(gate_cache, d, n, hidden + j, z)
        put(gate_cache, d, n, 2 * hidden + j, new)
        put(gate_cache, d, n, 3 * hidden + j, hn)
        return (one - z) * new + z * h_prev
    return activation(wide(inputs[d, n, j], one) + rec0, relu, one)


@cuda.jit(device=True)
def unit_backward(
    cell, relu, d, n, b, j, hidden, dh, rows_prev, off_prev, h0, c0, y, gate_cache, cell_cache,
    dc_state, d_input, d_recurrent, zone_c, zoned_c, one,
):  # fmt: skip
    """Gradients of unit j's gate pre-activations from dh = dL/dh of this row and step (for LSTM
    after the projection's backward). Writes d_input (D, N, G*H) (and for GRU d_recurrent, which
    differs in the n block; LSTM and RNN pass the same array twice); LSTM carries dc in dc_state
    (D, B, H). Returns the part of dL/dh_prev that doesn't go through W_hh (GRU's z * dh).
    The row's previous h and c are the previous processed step's (rows_prev rows from
    off_prev), or h0 / c0 (D, B, *) for a row that starts at this step. With zoned_c (the
    LSTM's zoneout, `stepwise`), cell_cache and dc_state hold c' = keep c + (1 - keep) c_new
    and dL/dc' (keep = zone_c (D, N, H)): c_new is recomputed from the gates, and dL/dc'
    reaches c_new times 1 - keep and c times keep."""
    zero = one - one
    if cell == LSTM:
        if b < rows_prev:
            c_prev = wide(cell_cache[d, off_prev + b, j], one)
        else:
            c_prev = wide(c0[d, b, j], one)
        i = wide(gate_cache[d, n, j], one)
        f = wide(gate_cache[d, n, hidden + j], one)
        g = wide(gate_cache[d, n, 2 * hidden + j], one)
        o = wide(gate_cache[d, n, 3 * hidden + j], one)
        carried = wide(dc_state[d, b, j], one)
        keep = zero
        if zoned_c:
            keep = wide(zone_c[d, n, j], one)
            tc = math.tanh(f * c_prev + i * g)
            dc = (one - keep) * carried + dh * o * (one - tc * tc)
        else:
            tc = math.tanh(wide(cell_cache[d, n, j], one))
            dc = carried + dh * o * (one - tc * tc)
        put(d_input, d, n, j, dc * g * i * (one - i))
        put(d_input, d, n, hidden + j, dc * c_prev * f * (one - f))
        put(d_input, d, n, 2 * hidden + j, dc * i * (one - g * g))
        put(d_input, d, n, 3 * hidden + j, dh * tc * o * (one - o))
        put(dc_state, d, b, j, dc * f + keep * carried if zoned_c else dc * f)
        return zero
    if cell == GRU:
        h_prev = wide(y[d, off_prev + b, j] if b < rows_prev else h0[d, b, j], one)
        r = wide(gate_cache[d, n, j], one)
        z = wide(gate_cache[d, n, hidden + j], one)
        new = wide(gate_cache[d, n, 2 * hidden + j], one)
        hn = wide(gate_cache[d, n, 3 * hidden + j], one)
        d_new = dh * (one - z) * (one - new * new)
        d_update = dh * (h_prev - new) * z * (one - z)
        d_reset = d_new * hn * r * (one - r)
        put(d_input, d, n, j, d_reset)
        put(d_input, d, n, hidden + j, d_update)
        put(d_input, d, n, 2 * hidden + j, d_new)
        put(d_recurrent, d, n, j, d_reset)
        put(d_recurrent, d, n, hidden + j, d_update)
        put(d_recurrent, d, n, 2 * hidden + j, d_new * r)
        return dh * z
    put(d_input, d, n, j, dh * activation_grad(wide(y[d, n, j], one), relu, one))
    return zero
