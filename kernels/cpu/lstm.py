"""LSTM recurrence, one layer and one direction over a whole (packed) sequence.

Gate order i, f, g, o (torch's). With a projection (proj_size P > 0), h = (o * tanh(c)) @ W_hr^T;
without, P = H and h = o * tanh(c). The GEMMs over all steps (input projection before, weight and
input gradients after) are the caller's; these kernels run the per-step part. The forward can
instead take the input projection into its per-step product (`common.fuses_input_projection`).

Every array has a leading direction axis D (1, or 2 for a bidirectional layer: direction 1 runs
in reverse), so both directions of a layer run in one call, side by side on the threads.
Shapes (rows in the packed time-major layout of `common`, N = sum(batch_sizes), B = batch_sizes[0]):
    W_hh (D, 4H, P); W_hr (D, P, H), or (D, 0, H) without projection; h0 (D, B, P); c0 (D, B, H);
    y (D, N, P); h_n (D, B, P); c_n (D, B, H);
    gate_cache (D, N, 4H): in: x @ W_ih^T + b_ih + b_hh; out: activated gates i, f, g, o;
    cell_cache (D, N, H): c of every row.
A cell_cache with no rows (D, 0, H) means inference: neither cache is written (gate_cache keeps
its pre-activations). With the input projection fused, gate_cache comes in unfilled (and with
no rows in inference).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..math import sigmoid, tanh
from .common import (
    HELPER,
    JIT_OPTIONS,
    PARALLEL_JIT_OPTIONS,
    ROW_JIT_OPTIONS,
    add_rows,
    consumed_row,
    copy_previous_hidden,
    copy_row,
    copy_rows,
    copy_states,
    fill_joint_rows,
    next_chunk,
    previous_step_rows,
    step_offsets,
    step_span,
    task_chunk,
)
from .panel_matmul import packed_joint_panels, packed_panels
from .runtime import serial_twin
from .shared_product import shared_matmul, work_plan

_JIT = JIT_OPTIONS
_PARALLEL = PARALLEL_JIT_OPTIONS
_ROW = ROW_JIT_OPTIONS


@njit(**_ROW)
def lstm_forward_row(gates, rec, c_row, out, hidden, keep_gates):
    """One row's gate math. gates (4H): in the input side's pre-activations (with both biases),
    out the activated gates i, f, g, o when keep_gates (inference needs none: left as they
    were); rec (4H): the recurrent products W_hh h; c_row (H): c in, c' out; out (H):
    o * tanh(c'). Callers pass keep_gates as a literal True or False, so that neither compiled
    form has a branch in the loop (see `gru.gru_forward_row`)."""
    for j in range(hidden):
        i = sigmoid(gates[j] + rec[j])
        f = sigmoid(gates[hidden + j] + rec[hidden + j])
        g = tanh(gates[2 * hidden + j] + rec[2 * hidden + j])
        o = sigmoid(gates[3 * hidden + j] + rec[3 * hidden + j])
        c = f * c_row[j] + i * g
        if keep_gates:
            gates[j] = i
            gates[hidden + j] = f
            gates[2 * hidden + j] = g
            gates[3 * hidden + j] = o
        c_row[j] = c
        out[j] = o * tanh(c)


@njit(**_ROW)
def lstm_backward_row(gates, c_row, c_prev, dh_row, dc_row, d_row, hidden, one):
    """Backward of `lstm_forward_row`: gates (4H) activated, c_row (H) = c', c_prev (H) = c,
    dh_row (H) = dL/dh'; dc_row (H): dL/dc' in, dL/dc out; d_row (4H) out: the gradients of
    the gate pre-activations."""
    for j in range(hidden):
        i = gates[j]
        f = gates[hidden + j]
        g = gates[2 * hidden + j]
        o = gates[3 * hidden + j]
        tc = tanh(c_row[j])
        dh = dh_row[j]
        dc = dc_row[j] + dh * o * (one - tc * tc)
        d_row[j] = dc * g * i * (one - i)
        d_row[hidden + j] = dc * c_prev[j] * f * (one - f)
        d_row[2 * hidden + j] = dc * i * (one - g * g)
        d_row[3 * hidden + j] = dh * tc * o * (one - o)
        dc_row[j] = dc * f


@njit(**_JIT)
def _forward_rows(
    batch_sizes,
    offsets,
    reverse,
    hh_panels,
    hr_panels,
    has_proj,
    x,
    bias,
    joint_rows,
    h_n,
    c_n,
    y,
    gate_cache,
    cell_cache,
    recurrent,
    h_raw,
    first,
    last,
    role,
    sync,
    workers,
):
    """One direction, rows first..last-1, every step (arrays without the direction axis).
    recurrent (B, 4H) and h_raw (B, H) are the direction's scratch rows; a HELPER task only
    takes part in the products (`shared_product`). With the input projection fused (joint_rows
    (B, I + P) has columns), each step's product takes rows [x | h] through hh_panels, the
    joint panels of [W_ih | W_hh], and bias (4H) = b_ih + b_hh stands in for the gate
    pre-activations."""
    hidden = c_n.shape[1]
    keep_caches = cell_cache.shape[0] > 0  # no rows: inference, nothing kept for a backward
    fused = joint_rows.shape[1] > 0
    inputs = x.shape[1]
    product = np.int64(0)  # typed int64 from the start (see shared_matmul)
    for k in range(batch_sizes.shape[0]):
        t, off, end = step_span(k, batch_sizes, offsets, reverse, first, last)
        if end == first:
            continue
        if fused and role != HELPER:
            fill_joint_rows(joint_rows, x, h_n, off, first, end, inputs)
        rows = joint_rows[first:end] if fused else h_n[first:end]
        if not shared_matmul(rows, hh_panels, recurrent[first:end], sync, product, role, workers):
            return
        product += 1
        if role != HELPER:
            for r in range(first, end):
                c_row = c_n[r]
                out = h_raw[r] if has_proj else h_n[r]
                if keep_caches:
                    gates = gate_cache[off + r]
                    if fused:
                        copy_row(gates, bias)
                    lstm_forward_row(gates, recurrent[r], c_row, out, hidden, True)
                    copy_row(cell_cache[off + r], c_row)
                else:
                    gates = bias if fused else gate_cache[off + r]
                    lstm_forward_row(gates, recurrent[r], c_row, out, hidden, False)
        if has_proj:
            if not shared_matmul(
                h_raw[first:end], hr_panels, h_n[first:end], sync, product, role, workers
            ):
                return
            product += 1
        if role != HELPER:
            copy_rows(y[off + first : off + end], h_n[first:end])


@njit(**_PARALLEL)
def lstm_forward(
    batch_sizes, x, W_ih, bias, W_hh, W_hr, h0, c0, y, h_n, c_n, gate_cache, cell_cache, threads
):  # fmt: skip
    """Run the recurrence: fills y, h_n, c_n, and turns gate_cache into activated gates (unless
    cell_cache has no rows: inference).

    W_ih (D, 4H, I) with rows, and bias (D, 4H) (b_ih + b_hh, or zeros), fuse the input
    projection of x (N, I) into the per-step products (gate_cache then isn't read); W_ih
    (D, 0, 0) means gate_cache holds the input side's pre-activations, and x and bias go unused."""
    offsets = step_offsets(batch_sizes)
    fused = W_ih.shape[1] > 0
    hh_panels = (
        packed_joint_panels(W_ih, W_hh, threads) if fused else packed_panels(W_hh, False, threads)
    )
    hr_panels = packed_panels(W_hr, False, threads)
    copy_states(h_n, h0)
    copy_states(c_n, c0)
    directions, batch, hidden = c0.shape
    has_proj = W_hr.shape[1] > 0
    recurrent = np.empty((directions, batch, 4 * hidden), dtype=y.dtype)
    h_raw = np.empty((directions, batch if has_proj else 0, hidden), dtype=y.dtype)
    joint_rows = np.empty(
        (directions, batch, x.shape[1] + h0.shape[2] if fused else 0), dtype=y.dtype
    )
    products = batch_sizes.shape[0] * (2 if has_proj else 1)
    n_tasks, n_chunks, per_direction, bounds, sync, claims = work_plan(
        batch_sizes, directions, threads, W_hh.shape[1] * W_hh.shape[2], products
    )
    for task in prange(n_tasks):
        d, chunk, role = task_chunk(task, n_chunks, per_direction)
        while chunk < n_chunks:
            _forward_rows(
                batch_sizes,
                offsets,
                d == 1,
                hh_panels[d],
                hr_panels[d],
                has_proj,
                x,
                bias[d],
                joint_rows[d],
                h_n[d],
                c_n[d],
                y[d],
                gate_cache[d],
                cell_cache[d],
                recurrent[d],
                h_raw[d],
                bounds[chunk],
                bounds[chunk + 1],
                role,
                sync[d],
                per_direction,
            )
            chunk = next_chunk(claims, d, n_chunks, per_direction)


@njit(**_JIT)
def _backward_rows(
    batch_sizes,
    offsets,
    reverse,
    hh_panels,
    hr_panels,
    has_proj,
    h0,
    c0,
    y,
    gate_cache,
    cell_cache,
    dy,
    d_gates,
    h_prev,
    dh_total,
    h_raw,
    dh0,
    dc0,
    dh_raw,
    first,
    last,
    role,
    sync,
    workers,
):
    """One direction, rows first..last-1, every step in reverse (no direction axis). dh_raw
    (B, H) is the direction's scratch; a HELPER task only takes part in the products."""
    hidden = c0.shape[1]
    one = np.ones(1, dtype=y.dtype)[0]
    product = np.int64(0)  # typed int64 from the start (see shared_matmul)
    for k in range(batch_sizes.shape[0] - 1, -1, -1):
        t, off, end = step_span(k, batch_sizes, offsets, reverse, first, last)
        if end == first:
            continue
        count = end - first
        prev, prev_rows = previous_step_rows(t, batch_sizes, reverse)
        if role != HELPER:
            copy_previous_hidden(y, h0, offsets, t, prev, prev_rows, first, count, h_prev)
            # dh0 holds dL/dh of each row's latest state; add this step's output gradient.
            add_rows(dh0[first:end], dy[off + first : off + end])
        if has_proj:
            if role != HELPER:
                copy_rows(dh_total[off + first : off + end], dh0[first:end])
            if not shared_matmul(
                dh0[first:end], hr_panels, dh_raw[first:end], sync, product, role, workers
            ):
                return
            product += 1
        elif role != HELPER:
            copy_rows(dh_raw[first:end], dh0[first:end])
        if role != HELPER:
            for r in range(first, end):
                gates = gate_cache[off + r]
                c_row = cell_cache[off + r]
                c_prev = consumed_row(cell_cache, c0, offsets, prev, prev_rows, r)
                lstm_backward_row(
                    gates, c_row, c_prev, dh_raw[r], dc0[r], d_gates[off + r], hidden, one
                )
                if has_proj:
                    raw = h_raw[off + r]
                    for j in range(hidden):
                        raw[j] = gates[3 * hidden + j] * tanh(c_row[j])
        if not shared_matmul(
            d_gates[off + first : off + end], hh_panels, dh0[first:end], sync, product, role,
            workers,
        ):  # fmt: skip
            return
        product += 1


@njit(**_PARALLEL)
def lstm_backward(
    batch_sizes,
    W_hh,
    W_hr,
    h0,
    c0,
    y,
    gate_cache,
    cell_cache,
    dy,
    dh_n,
    dc_n,
    d_gates,
    h_prev,
    dh_total,
    h_raw,
    dh0,
    dc0,
    threads,
):
    """Backward of `lstm_forward`, per step; the caller does the GEMMs over all rows.

    Takes the weights as `lstm_forward` does, W_hh (D, 4H, P) and W_hr (D, P, H) (or (D, 0, H)
    without projection); the per-step products run on them as transposed panels.

    In: dy (D, N, P), dh_n (D, B, P), dc_n (D, B, H). Out: d_gates (D, N, 4H), the gradients of
    the gate pre-activations; h_prev (D, N, P), the hidden state each row consumed (or
    (D, 0, P): not written); with a
    projection also dh_total (D, N, P), dL/dh of each row, and h_raw (D, N, H) = o * tanh(c)
    (else both are (D, 0, *)); dh0 (D, B, P), dc0 (D, B, H).
    So dW_ih = d_gates^T x, dW_hh = d_gates^T h_prev, db = sum(d_gates), dx = d_gates W_ih,
    dW_hr = dh_total^T h_raw, per direction.
    """
    offsets = step_offsets(batch_sizes)
    hh_panels = packed_panels(W_hh, True, threads)
    hr_panels = packed_panels(W_hr, True, threads)
    copy_states(dh0, dh_n)
    copy_states(dc0, dc_n)
    directions, batch, hidden = c0.shape
    has_proj = W_hr.shape[1] > 0
    dh_raw = np.empty((directions, batch, hidden), dtype=y.dtype)
    products = batch_sizes.shape[0] * (2 if has_proj else 1)
    n_tasks, n_chunks, per_direction, bounds, sync, claims = work_plan(
        batch_sizes, directions, threads, W_hh.shape[1] * W_hh.shape[2], products
    )
    for task in prange(n_tasks):
        d, chunk, role = task_chunk(task, n_chunks, per_direction)
        while chunk < n_chunks:
            _backward_rows(
                batch_sizes,
                offsets,
                d == 1,
                hh_panels[d],
                hr_panels[d],
                has_proj,
                h0[d],
                c0[d],
                y[d],
                gate_cache[d],
                cell_cache[d],
                dy[d],
                d_gates[d],
                h_prev[d],
                dh_total[d],
                h_raw[d],
                dh0[d],
                dc0[d],
                dh_raw[d],
                bounds[chunk],
                bounds[chunk + 1],
                role,
                sync[d],
                per_direction,
            )
            chunk = next_chunk(claims, d, n_chunks, per_direction)


# The kernels without a parallel region, for forked processes (see `runtime.serial_twin`).
lstm_forward_serial = serial_twin(lstm_forward)
lstm_backward_serial = serial_twin(lstm_backward)
