"""Elman RNN recurrence, one layer and one direction over a whole sequence.

    h' = act(W_ih x + b_ih + W_hh h + b_hh),  act = tanh (relu=False) or relu (relu=True)
The GEMMs over all steps (input projection, weight and input gradients) are the caller's; the
forward can instead take the input projection into its per-step product
(`common.fuses_input_projection`).

Every array has a leading direction axis D (1, or 2 for a bidirectional layer: direction 1 runs
in reverse), so both directions of a layer run in one call, side by side on the threads.
Shapes (packed time-major rows, see `common`; N = sum(batch_sizes), B = batch_sizes[0]):
    W_hh (D, H, H); h0 (D, B, H); h_n (D, B, H);
    y (D, N, H): in: x @ W_ih^T + b_ih + b_hh (unfilled when the projection is fused); out: the
    hidden states (all backward needs).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from ..math import tanh
from .common import (
    JIT_OPTIONS,
    PARALLEL_JIT_OPTIONS,
    ROW_JIT_OPTIONS,
    add_row,
    aligned_empty,
    copy_previous_hidden,
    copy_row,
    copy_states,
    fill_joint_rows,
    next_chunk,
    previous_step_rows,
    splits_units,
    step_offsets,
    step_span,
    task_chunk,
)
from .panel_matmul import packed_joint_panels, packed_panels
from .runtime import serial_twin
from .shared_product import (
    NO_STEPS,
    close_split,
    exchange,
    first_step,
    opens_split,
    split_matmul,
    split_states,
    unit_plan,
    unit_span,
)

_JIT = JIT_OPTIONS
_PARALLEL = PARALLEL_JIT_OPTIONS
_ROW = ROW_JIT_OPTIONS


@njit(**_ROW)
def rnn_forward_row(out, rec, hidden, relu, zero):
    """One row: out (H) in the input side's pre-activation (with both biases), out h' =
    act(out + rec); rec (H) = W_hh h."""
    if relu:
        for j in range(hidden):
            pre = out[j] + rec[j]
            # max() would turn NaN into 0; torch's relu keeps it.
            out[j] = pre if (pre > zero or pre != pre) else zero
    else:
        for j in range(hidden):
            out[j] = tanh(out[j] + rec[j])


@njit(**_ROW)
def rnn_backward_row(h_out, dh_row, d_pre, hidden, relu, one, zero):
    """Backward of `rnn_forward_row`: h_out (H) = h', dh_row (H) = dL/dh'; d_pre (H) out."""
    if relu:
        for j in range(hidden):
            d_pre[j] = dh_row[j] if h_out[j] > zero else zero
    else:
        for j in range(hidden):
            h = h_out[j]
            d_pre[j] = dh_row[j] * (one - h * h)


@njit(**_JIT)
def _forward_rows(
    batch_sizes, offsets, reverse, relu, hh_panels, x, bias, joint_rows, y, h_n, h_state,
    recurrent, first, last, index, workers, sync,
):  # fmt: skip
    """One direction, rows first..last-1, every step (arrays without the direction axis), the
    units of task `index` of the `workers` tasks that split them (`shared_product`; all units
    when workers = 1; task 0 runs all of them until the split opens). recurrent (B, H) is the
    direction's scratch. In a direction whose tasks may split (workers > 1), the products read
    the states from h_state (2, B, H), one buffer per step parity (a task may start the next
    product while another still reads this step's states), and h_n gets each task's units;
    with one task, h_n is the running state. With the input projection fused (joint_rows (B, I + H),
    this task's own, has columns), each step's product takes rows [x | h] through hh_panels,
    the joint panels of [W_ih | W_hh], and y's rows start from bias (H) = b_ih + b_hh."""
    hidden = h_n.shape[1]
    zero = np.zeros(1, dtype=y.dtype)[0]
    fused = joint_rows.shape[1] > 0
    inputs = x.shape[1]
    capable = workers > 1  # a unit-split direction: its states go through h_state
    start = first_step(sync, index, workers, np.int64(0))
    if start == NO_STEPS:
        return
    split = index > 0  # a helper starts split; task 0 alone, until `opens_split`
    team = workers if split else 1
    first_panel, end_panel, unit, end_unit = unit_span(index, team, hidden)
    units = end_unit - unit
    exchanges = np.int64(0)
    for k in range(start, batch_sizes.shape[0]):
        t, off, end = step_span(k, batch_sizes, offsets, reverse, first, last)
        if end == first:
            continue
        if capable and not split and opens_split(sync, workers, k):
            split = True
            team = workers
            first_panel, end_panel, unit, end_unit = unit_span(index, team, hidden)
            units = end_unit - unit
        h_prev = h_state[k % 2] if capable else h_n
        h_next = h_state[(k + 1) % 2] if capable else h_n
        if fused:
            fill_joint_rows(joint_rows, x, h_prev, off, first, end, inputs)
        rows = joint_rows[first:end] if fused else h_prev[first:end]
        split_matmul(rows, hh_panels, recurrent[first:end], team, first_panel, end_panel)
        for r in range(first, end):
            out = y[off + r, unit:end_unit]
            if fused:
                copy_row(out, bias[unit:end_unit])
            rnn_forward_row(out, recurrent[r, unit:end_unit], units, relu, zero)
            copy_row(h_next[r, unit:end_unit], out)
            if capable:
                copy_row(h_n[r, unit:end_unit], out)
        if split:
            exchanges += 1
            exchange(sync, index, team, exchanges)
    if capable and not split:
        close_split(sync)


@njit(**_PARALLEL)
def rnn_forward(batch_sizes, relu, x, W_ih, bias, W_hh, h0, y, h_n, threads):
    """Run the recurrence in place on y, filling h_n. W_ih (D, H, I) with rows, and bias
    (D, H) (b_ih + b_hh, or zeros), fuse the input projection of x (N, I) into the per-step
    products (y's input is then not read); W_ih (D, 0, 0): y holds the input side, x and bias
    go unused."""
    offsets = step_offsets(batch_sizes)
    fused = W_ih.shape[1] > 0
    hh_panels = (
        packed_joint_panels(W_ih, W_hh, threads) if fused else packed_panels(W_hh, False, threads)
    )
    copy_states(h_n, h0)
    directions, batch, hidden = h0.shape
    recurrent = aligned_empty((directions, batch, hidden), y)
    n_tasks, n_chunks, per_direction, bounds, sync, claims = unit_plan(
        batch_sizes, directions, threads, W_hh.shape[1] * W_hh.shape[2], splits_units(hidden)
    )
    split = n_chunks == 1 and per_direction > 1
    h_state = split_states(h0, split)
    joint_rows = np.empty(
        (directions, per_direction if split else 1, batch, x.shape[1] + hidden if fused else 0),
        dtype=y.dtype,
    )
    for task in prange(n_tasks):
        d, chunk, _ = task_chunk(task, n_chunks, per_direction)
        index = task % per_direction if n_chunks == 1 else 0  # its part of the units
        workers = per_direction if n_chunks == 1 else 1
        while chunk < n_chunks:
            _forward_rows(
                batch_sizes, offsets, d == 1, relu, hh_panels[d], x, bias[d],
                joint_rows[d, index if split else 0], y[d], h_n[d], h_state[d], recurrent[d],
                bounds[chunk], bounds[chunk + 1], index, workers, sync[d],
            )  # fmt: skip
            chunk = next_chunk(claims, d, n_chunks, per_direction)


@njit(**_JIT)
def _backward_rows(
    batch_sizes, offsets, reverse, relu, hh_panels, h0, y, dy, d_pre, h_prev, dh0, first, last,
    index, workers, sync,
):  # fmt: skip
    """One direction, rows first..last-1, every step in reverse (no direction axis), the units
    of task `index` of `workers` (`shared_product`): its part of dh0 and of each step's d_pre;
    the product after each step's exchange takes every unit of d_pre."""
    hidden = h0.shape[1]
    one = np.ones(1, dtype=y.dtype)[0]
    zero = np.zeros(1, dtype=y.dtype)[0]
    capable = workers > 1
    start = first_step(sync, index, workers, np.int64(batch_sizes.shape[0] - 1))
    if start == NO_STEPS:
        return
    split = index > 0  # as in `_forward_rows`
    team = workers if split else 1
    first_panel, end_panel, unit, end_unit = unit_span(index, team, hidden)
    units = end_unit - unit
    exchanges = np.int64(0)
    for k in range(start, -1, -1):
        t, off, end = step_span(k, batch_sizes, offsets, reverse, first, last)
        if end == first:
            continue
        if capable and not split and opens_split(sync, workers, k):
            split = True
            team = workers
            first_panel, end_panel, unit, end_unit = unit_span(index, team, hidden)
            units = end_unit - unit
        if index == 0:
            prev, prev_rows = previous_step_rows(t, batch_sizes, reverse)
            copy_previous_hidden(y, h0, offsets, t, prev, prev_rows, first, end - first, h_prev)
        for r in range(first, end):
            dh_row = dh0[r, unit:end_unit]
            add_row(dh_row, dy[off + r, unit:end_unit])
            rnn_backward_row(
                y[off + r, unit:end_unit], dh_row, d_pre[off + r, unit:end_unit], units, relu,
                one, zero,
            )  # fmt: skip
        if split:
            exchanges += 1
            exchange(sync, index, team, exchanges)
        split_matmul(
            d_pre[off + first : off + end], hh_panels, dh0[first:end], team, first_panel,
            end_panel,
        )  # fmt: skip
    if capable and not split:
        close_split(sync)


@njit(**_PARALLEL)
def rnn_backward(batch_sizes, relu, W_hh, h0, y, dy, dh_n, d_pre, h_prev, dh0, threads):
    """Backward of `rnn_forward`, per step; the caller does the GEMMs over all rows.

    Takes W_hh (D, H, H) as `rnn_forward` does; the per-step product runs on it as
    transposed panels.

    In: dy (D, N, H), dh_n (D, B, H). Out: d_pre (D, N, H), the gradient of the
    pre-activation; h_prev (D, N, H), the state each row consumed (or (D, 0, H): not
    written); dh0 (D, B, H).
    So, per direction, dW_ih = d_pre^T x, dW_hh = d_pre^T h_prev, db = sum(d_pre),
    dx = d_pre W_ih.
    """
    offsets = step_offsets(batch_sizes)
    hh_panels = packed_panels(W_hh, True, threads)
    copy_states(dh0, dh_n)
    directions, hidden = h0.shape[0], h0.shape[2]
    n_tasks, n_chunks, per_direction, bounds, sync, claims = unit_plan(
        batch_sizes, directions, threads, W_hh.shape[1] * W_hh.shape[2], splits_units(hidden)
    )
    for task in prange(n_tasks):
        d, chunk, _ = task_chunk(task, n_chunks, per_direction)
        index = task % per_direction if n_chunks == 1 else 0  # its part of the units
        workers = per_direction if n_chunks == 1 else 1
        while chunk < n_chunks:
            _backward_rows(
                batch_sizes, offsets, d == 1, relu, hh_panels[d], h0[d], y[d], dy[d], d_pre[d],
                h_prev[d], dh0[d], bounds[chunk], bounds[chunk + 1], index, workers, sync[d],
            )  # fmt: skip
            chunk = next_chunk(claims, d, n_chunks, per_direction)


# The kernels without a parallel region, for forked processes (see `runtime.serial_twin`).
rnn_forward_serial = serial_twin(rnn_forward)
rnn_backward_serial = serial_twin(rnn_backward)
