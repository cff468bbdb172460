"""GRU recurrence (PyTorch/cuDNN "reset after" form), one layer and one direction.

Gate order r, z, n (torch's):
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h
The GEMMs over all steps (input projection, weight and input gradients) are the caller's; the
forward can instead compute the input projection step by step in the kernel
(`common.fuses_input_projection`).

Every array has a leading direction axis D (1, or 2 for a bidirectional layer: direction 1 runs
in reverse), so both directions of a layer run in one call, side by side on the threads.
Shapes (packed time-major rows, see `common`; N = sum(batch_sizes), B = batch_sizes[0]):
    projected (D, N, 3H) = x @ W_ih^T + b_ih (no rows when the kernel computes it);
    W_hh (D, 3H, H); b_hh (D, 3H) (zeros without bias);
    h0 (D, B, H); y (D, N, H); h_n (D, B, H);
    gate_cache (D, N, 4H): r, z, n and W_hn h + b_hn of every row (backward needs the last).
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
    add_row,
    add_rows,
    consumed_row,
    copy_previous_hidden,
    copy_row,
    copy_states,
    next_chunk,
    previous_step_rows,
    step_offsets,
    step_span,
    task_chunk,
)
from .panel_matmul import packed_panels
from .runtime import serial_twin
from .shared_product import shared_matmul, work_plan

_JIT = JIT_OPTIONS
_PARALLEL = PARALLEL_JIT_OPTIONS
_ROW = ROW_JIT_OPTIONS


@njit(**_ROW)
def gru_forward_row(xp, rec, b_hh, cache, h_row, hidden, one, keep_cache):
    """One row's gate math. xp (3H): x W_ih^T + b_ih; rec (3H): W_hh h (no bias); b_hh (3H);
    cache (4H) out: r, z, n, W_hn h + b_hn, written only with keep_cache (inference needs no
    cache); h_row (H): h in, h' out. Callers pass keep_cache as a literal True or False: each
    compiled form then has no branch in the loop (a runtime branch there stopped LLVM from
    vectorising it: 2x slower)."""
    for j in range(hidden):
        reset = sigmoid(xp[j] + rec[j] + b_hh[j])
        update = sigmoid(xp[hidden + j] + rec[hidden + j] + b_hh[hidden + j])
        hn = rec[2 * hidden + j] + b_hh[2 * hidden + j]
        n = tanh(xp[2 * hidden + j] + reset * hn)
        if keep_cache:
            cache[j] = reset
            cache[hidden + j] = update
            cache[2 * hidden + j] = n
            cache[3 * hidden + j] = hn
        h_row[j] = (one - update) * n + update * h_row[j]


@njit(**_ROW)
def gru_backward_row(cache, h_prev, dh_row, d_input, d_recurrent, hidden, one):
    """Backward of `gru_forward_row`: cache (4H) as written there, h_prev (H) = h;
    dh_row (H): dL/dh' in, out the part of dL/dh that skips W_hh (z * dL/dh'); d_input and
    d_recurrent (3H) out: the pre-activation gradients on the input and the recurrent side
    (they differ in the n block, scaled by r on the recurrent side)."""
    for j in range(hidden):
        reset = cache[j]
        update = cache[hidden + j]
        n = cache[2 * hidden + j]
        hn = cache[3 * hidden + j]
        dh = dh_row[j]
        dn = dh * (one - update) * (one - n * n)
        dz = dh * (h_prev[j] - n) * update * (one - update)
        d_reset = dn * hn * reset * (one - reset)
        d_input[j] = d_reset
        d_input[hidden + j] = dz
        d_input[2 * hidden + j] = dn
        d_recurrent[j] = d_reset
        d_recurrent[hidden + j] = dz
        d_recurrent[2 * hidden + j] = dn * reset
        dh_row[j] = dh * update


@njit(**_JIT)
def _forward_rows(
    batch_sizes, offsets, reverse, hh_panels, b_hh, projected, y, h_n, gate_cache, recurrent,
    fused, x, ih_panels, b_ih, x_side, first, last, role, sync, workers,
):  # fmt: skip
    """One direction, rows first..last-1, every step (arrays without the direction axis).
    recurrent (B, 3H) is the direction's scratch; a HELPER task only takes part in the
    products (`shared_product`). fused: each step first computes its rows of x @ W_ih^T + b_ih
    (ih_panels, b_ih (3H)) into x_side (B, 3H), which then stands in for `projected`. Not one
    joint product as in LSTM and RNN: the n gate needs the input and recurrent parts apart."""
    hidden = h_n.shape[1]
    one = np.ones(1, dtype=y.dtype)[0]
    keep_cache = gate_cache.shape[0] > 0  # no rows: inference, nothing kept for a backward
    product = np.int64(0)  # typed int64 from the start (see shared_matmul)
    for k in range(batch_sizes.shape[0]):
        t, off, end = step_span(k, batch_sizes, offsets, reverse, first, last)
        if end == first:
            continue
        if fused:
            if not shared_matmul(
                x[off + first : off + end], ih_panels, x_side[first:end], sync, product, role,
                workers,
            ):  # fmt: skip
                return
            product += 1
            if role != HELPER:
                for r in range(first, end):
                    add_row(x_side[r], b_ih)
        if not shared_matmul(
            h_n[first:end], hh_panels, recurrent[first:end], sync, product, role, workers
        ):
            return
        product += 1
        if role == HELPER:
            continue
        for r in range(first, end):
            h_row = h_n[r]
            pre = x_side[r] if fused else projected[off + r]
            if keep_cache:
                gru_forward_row(
                    pre, recurrent[r], b_hh, gate_cache[off + r], h_row, hidden, one, True
                )
            else:  # no cache to write: b_hh stands in for the unused cache row
                gru_forward_row(pre, recurrent[r], b_hh, b_hh, h_row, hidden, one, False)
            copy_row(y[off + r], h_row)


@njit(**_PARALLEL)
def gru_forward(
    batch_sizes, x, W_ih, b_ih, W_hh, b_hh, h0, projected, y, h_n, gate_cache, threads
):  # fmt: skip
    """Run the recurrence, filling y, h_n and gate_cache; a gate_cache with no rows
    (D, 0, 4H) is not written (inference: no backward will read it). W_ih (D, 3H, I) with rows,
    and b_ih (D, 3H) (or zeros): the kernel computes the input projection of x (N, I) step by
    step, and `projected` isn't read; W_ih (D, 0, 0): projected holds it, x and b_ih go unused."""
    offsets = step_offsets(batch_sizes)
    fused = W_ih.shape[1] > 0
    hh_panels = packed_panels(W_hh, False, threads)
    ih_panels = packed_panels(W_ih, False, threads)
    copy_states(h_n, h0)
    directions, batch, hidden = h0.shape
    recurrent = np.empty((directions, batch, 3 * hidden), dtype=y.dtype)
    x_side = np.empty((directions, batch if fused else 0, 3 * hidden), dtype=y.dtype)
    n_tasks, n_chunks, per_direction, bounds, sync, claims = work_plan(
        batch_sizes,
        directions,
        threads,
        W_hh.shape[1] * W_hh.shape[2],
        batch_sizes.shape[0] * (2 if fused else 1),
    )
    for task in prange(n_tasks):
        d, chunk, role = task_chunk(task, n_chunks, per_direction)
        while chunk < n_chunks:
            _forward_rows(
                batch_sizes,
                offsets,
                d == 1,
                hh_panels[d],
                b_hh[d],
                projected[d],
                y[d],
                h_n[d],
                gate_cache[d],
                recurrent[d],
                fused,
                x,
                ih_panels[d],
                b_ih[d],
                x_side[d],
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
    h0,
    y,
    gate_cache,
    dy,
    h_prev,
    d_input,
    dn_recurrent,
    dh0,
    step_rows,
    through_weights,
    first,
    last,
    role,
    sync,
    workers,
):
    """One direction, rows first..last-1, every step in reverse (no direction axis).
    step_rows (B, 3H) and through_weights (B, H) are the direction's scratch: a step's
    recurrent-side gradients and their product with W_hh; a HELPER task only takes part in the
    products."""
    hidden = h0.shape[1]
    one = np.ones(1, dtype=y.dtype)[0]
    product = np.int64(0)  # typed int64 from the start (see shared_matmul)
    for k in range(batch_sizes.shape[0] - 1, -1, -1):
        t, off, end = step_span(k, batch_sizes, offsets, reverse, first, last)
        if end == first:
            continue
        count = end - first
        if role != HELPER:
            prev, prev_rows = previous_step_rows(t, batch_sizes, reverse)
            copy_previous_hidden(y, h0, offsets, t, prev, prev_rows, first, count, h_prev)
            for r in range(first, end):
                dh_row = dh0[r]
                add_row(dh_row, dy[off + r])
                consumed = consumed_row(y, h0, offsets, prev, prev_rows, r)
                gru_backward_row(
                    gate_cache[off + r], consumed, dh_row, d_input[off + r], step_rows[r],
                    hidden, one,
                )  # fmt: skip
                copy_row(dn_recurrent[off + r], step_rows[r, 2 * hidden :])
        if not shared_matmul(
            step_rows[first:end], hh_panels, through_weights[first:end], sync, product, role,
            workers,
        ):  # fmt: skip
            return
        product += 1
        if role != HELPER:
            add_rows(dh0[first:end], through_weights[first:end])


@njit(**_PARALLEL)
def gru_backward(
    batch_sizes, W_hh, h0, y, gate_cache, dy, dh_n, h_prev, d_input, dn_recurrent, dh0, threads
):
    """Backward of `gru_forward`, per step; the caller does the GEMMs over all rows.

    Takes W_hh (D, 3H, H) as `gru_forward` does; the per-step product runs on it as
    transposed panels.

    In: dy (D, N, H), dh_n (D, B, H). Out: d_input (D, N, 3H), the gradients of the gate
    pre-activations on the input side, and dn_recurrent (D, N, H), the n block of those on the
    recurrent side (dn scaled by r; its r and z blocks are d_input's); h_prev (D, N, H), the
    state each row consumed (or (D, 0, H): not written); dh0 (D, B, H). So, per direction,
    dW_ih = d_input^T x, db_ih = sum(d_input), dx = d_input W_ih, and with d_recurrent =
    d_input whose n block is replaced by dn_recurrent, dW_hh = d_recurrent^T h_prev and db_hh =
    sum(d_recurrent). (A full recurrent-side copy cost N x 2H floats more: 26 MB of a T100 B64
    H512 fwd+bwd.)
    """
    offsets = step_offsets(batch_sizes)
    hh_panels = packed_panels(W_hh, True, threads)
    copy_states(dh0, dh_n)
    directions, batch, hidden = h0.shape
    through_weights = np.empty((directions, batch, hidden), dtype=y.dtype)
    step_rows = np.empty((directions, batch, 3 * hidden), dtype=y.dtype)
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
                hh_panels[d],
                h0[d],
                y[d],
                gate_cache[d],
                dy[d],
                h_prev[d],
                d_input[d],
                dn_recurrent[d],
                dh0[d],
                step_rows[d],
                through_weights[d],
                bounds[chunk],
                bounds[chunk + 1],
                role,
                sync[d],
                per_direction,
            )
            chunk = next_chunk(claims, d, n_chunks, per_direction)


# The kernels without a parallel region, for forked processes (see `runtime.serial_twin`).
gru_forward_serial = serial_twin(gru_forward)
gru_backward_serial = serial_twin(gru_backward)
