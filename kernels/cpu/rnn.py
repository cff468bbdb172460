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
    HELPER,
    JIT_OPTIONS,
    PARALLEL_JIT_OPTIONS,
    ROW_JIT_OPTIONS,
    add_row,
    copy_previous_hidden,
    copy_row,
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
    batch_sizes, offsets, reverse, relu, hh_panels, x, bias, joint_rows, y, h_n, recurrent,
    first, last, role, sync, workers,
):  # fmt: skip
    """One direction, rows first..last-1, every step (arrays without the direction axis).
    recurrent (B, H) is the direction's scratch; a HELPER task only takes part in the
    products (`shared_product`). With the input projection fused (joint_rows (B, I + H) has
    columns), each step's product takes rows [x | h] through hh_panels, the joint panels of
    [W_ih | W_hh], and y's rows start from bias (H) = b_ih + b_hh."""
    hidden = h_n.shape[1]
    zero = np.zeros(1, dtype=y.dtype)[0]
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
        if role == HELPER:
            continue
        for r in range(first, end):
            out = y[off + r]
            if fused:
                copy_row(out, bias)
            rnn_forward_row(out, recurrent[r], hidden, relu, zero)
            copy_row(h_n[r], out)


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
    recurrent = np.empty((directions, batch, hidden), dtype=y.dtype)
    joint_rows = np.empty((directions, batch, x.shape[1] + hidden if fused else 0), dtype=y.dtype)
    n_tasks, n_chunks, per_direction, bounds, sync, claims = work_plan(
        batch_sizes, directions, threads, W_hh.shape[1] * W_hh.shape[2], batch_sizes.shape[0]
    )
    for task in prange(n_tasks):
        d, chunk, role = task_chunk(task, n_chunks, per_direction)
        while chunk < n_chunks:
            _forward_rows(
                batch_sizes, offsets, d == 1, relu, hh_panels[d], x, bias[d], joint_rows[d], y[d],
                h_n[d], recurrent[d], bounds[chunk], bounds[chunk + 1], role, sync[d],
                per_direction,
            )  # fmt: skip
            chunk = next_chunk(claims, d, n_chunks, per_direction)


@njit(**_JIT)
def _backward_rows(
    batch_sizes, offsets, reverse, relu, hh_panels, h0, y, dy, d_pre, h_prev, dh0, first, last,
    role, sync, workers,
):  # fmt: skip
    """One direction, rows first..last-1, every step in reverse (no direction axis); a HELPER
    task only takes part in the products."""
    hidden = h0.shape[1]
    one = np.ones(1, dtype=y.dtype)[0]
    zero = np.zeros(1, dtype=y.dtype)[0]
    product = np.int64(0)  # typed int64 from the start (see shared_matmul)
    for k in range(batch_sizes.shape[0] - 1, -1, -1):
        t, off, end = step_span(k, batch_sizes, offsets, reverse, first, last)
        if end == first:
            continue
        if role != HELPER:
            prev, prev_rows = previous_step_rows(t, batch_sizes, reverse)
            copy_previous_hidden(y, h0, offsets, t, prev, prev_rows, first, end - first, h_prev)
            for r in range(first, end):
                dh_row = dh0[r]
                add_row(dh_row, dy[off + r])
                rnn_backward_row(y[off + r], dh_row, d_pre[off + r], hidden, relu, one, zero)
        if not shared_matmul(
            d_pre[off + first : off + end], hh_panels, dh0[first:end], sync, product, role,
            workers,
        ):  # fmt: skip
            return
        product += 1


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
    directions = h0.shape[0]
    n_tasks, n_chunks, per_direction, bounds, sync, claims = work_plan(
        batch_sizes, directions, threads, W_hh.shape[1] * W_hh.shape[2], batch_sizes.shape[0]
    )
    for task in prange(n_tasks):
        d, chunk, role = task_chunk(task, n_chunks, per_direction)
        while chunk < n_chunks:
            _backward_rows(
                batch_sizes,
                offsets,
                d == 1,
                relu,
                hh_panels[d],
                h0[d],
                y[d],
                dy[d],
                d_pre[d],
                h_prev[d],
                dh0[d],
                bounds[chunk],
                bounds[chunk + 1],
                role,
                sync[d],
                per_direction,
            )
            chunk = next_chunk(claims, d, n_chunks, per_direction)


# The kernels without a parallel region, for forked processes (see `runtime.serial_twin`).
rnn_forward_serial = serial_twin(rnn_forward)
rnn_backward_serial = serial_twin(rnn_backward)
