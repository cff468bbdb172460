"""Persistent strategy: one cooperative launch runs the whole recurrence of a layer; float32 or
float16 storage, float32 math and weights (in shared memory).

Grid (blocks per direction, directions); block x of direction d owns hidden units
u0 = x * U .. u0 + U - 1 and keeps their rows of W_hh in shared memory for the whole sequence
(loaded once), computing the recurrent products itself; a grid-wide barrier separates the steps,
the only point where one block needs another's results (the previous step's h, or in backward
the next step's gate gradients). Everything a block writes per step is either its own units'
state or a new row of the packed outputs, so no two blocks ever write the same element.

Shared memory per block: the weights, forward G*U*H floats (W_hh[d, g*H + u0 + u, p] at
p*G*U + g*U + u), backward the same count (W_hh[d, q, u0 + u] at q*U + u), then 4 floats per
thread for partial sums (`shared_floats`). The launcher picks U so that fits.

Small batches: with fewer (row, unit) items than threads, several threads ("lanes") split each
item's dot products and lane 0 adds their partial sums, so more of the block works per step.
Under Numba's simulator a grid runs one block at a time, so there the launcher runs one launch
per direction whose single block stands in for several (`virtual_blocks`, see `_block_layout`):
the unit split, the per-block shared memory and the per-step barrier are exercised all the same.

Projections (proj_size) are not handled here: the launcher uses the stepwise strategy for them.
See `cells` for the array layouts.
"""

from __future__ import annotations

import numba
from numba import cuda

from .cells import unit_backward, unit_forward
from .common import LSTM, gate_count, put, step_span, wide

_JIT = {"cache": True}


@cuda.jit(device=True)
def _block_layout(virtual_blocks, units_per_block, hidden, weights_per_block):
    """(first unit, units owned, thread index, threads, first shared-memory slot) of this
    block. Each block's shared memory holds its weights, then 4 partial sums per thread
    (`shared_floats`). With virtual_blocks = V > 0 (the simulator's tests), the one real block
    of a launch stands in for V blocks of blockDim.x / V threads each, with their own slices of
    shared memory, so that the multi-block split and its barrier run where blocks can't run at
    once."""
    block, tid, threads = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    slot = 0  # a real block's shared memory is its own: its slice starts at 0
    if virtual_blocks > 0:
        threads = cuda.blockDim.x // virtual_blocks
        block = cuda.threadIdx.x // threads
        tid = cuda.threadIdx.x % threads
        slot = block * (weights_per_block + 4 * threads)
    first = block * units_per_block
    return first, min(units_per_block, hidden - first), tid, threads, slot


def shared_floats(weights_per_block: int, threads: int) -> int:
    """Floats of shared memory one block uses (host side, to size the launch)."""
    return weights_per_block + 4 * threads


@cuda.jit(device=True)
def _lanes(items, threads):
    """Threads per work item: the largest power of two with items x lanes <= threads, at most
    32 (a warp), at least 1."""
    lanes = 1
    while lanes < 32 and 2 * lanes * items <= threads:
        lanes *= 2
    return lanes


@cuda.jit(**_JIT)
def persistent_forward(
    cell,
    relu,
    direction_offset,
    virtual_blocks,
    units_per_block,
    batch_sizes,
    offsets,
    W_hh,
    b_hh,
    h0,
    c0,
    inputs,
    gate_cache,
    cell_cache,
    c_state,
    y,
    h_n,
    one,
):
    """Forward of directions direction_offset + blockIdx.y: fills y (D, N, H), h_n, c_state
    (= c_n) and the caches. W_hh (D, G*H, H); h0, c0 (D, B, H)."""
    weights = cuda.shared.array(0, numba.float32)
    d = direction_offset + cuda.blockIdx.y
    gates = gate_count(cell)
    hidden = W_hh.shape[1] // gates
    width = W_hh.shape[2]
    stride = gates * units_per_block
    u0, units, tid, threads, first_slot = _block_layout(
        virtual_blocks, units_per_block, hidden, width * stride
    )
    partials = first_slot + width * stride  # 4 partial sums per thread after the weights
    for idx in range(tid, width * stride, threads):
        u = idx % units_per_block
        if u < units:
            row = ((idx % stride) // units_per_block) * hidden + u0 + u
            weights[first_slot + idx] = wide(W_hh[d, row, idx // stride], one)
    for idx in range(tid, h0.shape[1] * units, threads):
        b, j = idx // units, u0 + idx % units
        h_n[d, b, j] = h0[d, b, j]  # same storage: a plain copy
        if cell == LSTM:
            put(c_state, d, b, j, wide(c0[d, b, j], one))
    cuda.syncthreads()
    grid = cuda.cg.this_grid()
    zero = one - one
    for k in range(batch_sizes.shape[0]):
        rows, off = step_span(k, d, batch_sizes, offsets)
        rows_prev, off_prev = step_span(k - 1, d, batch_sizes, offsets)
        # Work item (row b, unit u); `lanes` threads share an item's dot products when there
        # are fewer items than threads (small batches), then lane 0 adds their partial sums.
        # Every bound below is the same for all (virtual) blocks, so all reach each barrier.
        items = rows * units_per_block
        lanes = _lanes(items, threads)
        for first_item in range(0, items * lanes, threads):
            item, lane = (first_item + tid) // lanes, (first_item + tid) % lanes
            b, u = item // units_per_block, item % units_per_block
            active = item < items and u < units
            # The previous h of this row: the previous step's output, or h0 for a row that
            # starts here (reverse direction of a packed batch) and at the first step.
            source, row = (y, off_prev + b) if b < rows_prev else (h0, b)
            rec0, rec1, rec2, rec3 = zero, zero, zero, zero
            if active:
                for p in range(lane, width, lanes):
                    h = wide(source[d, row, p], one)
                    base = first_slot + p * stride + u
                    rec0 += weights[base] * h
                    if gates > 1:
                        rec1 += weights[base + units_per_block] * h
                        rec2 += weights[base + 2 * units_per_block] * h
                    if gates > 3:
                        rec3 += weights[base + 3 * units_per_block] * h
            if lanes > 1:
                slot = partials + 4 * tid
                weights[slot] = rec0
                weights[slot + 1] = rec1
                weights[slot + 2] = rec2
                weights[slot + 3] = rec3
                cuda.syncthreads()
                if lane == 0:
                    for other in range(slot + 4, slot + 4 * lanes, 4):
                        rec0 += weights[other]
                        rec1 += weights[other + 1]
                        rec2 += weights[other + 2]
                        rec3 += weights[other + 3]
            if active and lane == 0:
                j = u0 + u
                h = unit_forward(
                    cell,
                    relu,
                    d,
                    off + b,
                    b,
                    j,
                    hidden,
                    rec0,
                    rec1,
                    rec2,
                    rec3,
                    wide(source[d, row, j], one),
                    inputs,
                    gate_cache,
                    cell_cache,
                    c_state,
                    b_hh,
                    one,
                )
                put(y, d, off + b, j, h)
                put(h_n, d, b, j, h)
            if lanes > 1:
                cuda.syncthreads()  # the partial sums are read before the next items reuse them
        grid.sync()


@cuda.jit(**_JIT)
def persistent_backward(
    cell,
    relu,
    direction_offset,
    virtual_blocks,
    units_per_block,
    batch_sizes,
    offsets,
    W_hh,
    h0,
    c0,
    dy,
    dh_n,
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
    """Backward of `persistent_forward` for directions direction_offset + blockIdx.y. dc_state
    must hold dc_n on entry (it ends as dc0). dy (D, N, H); dh_direct (D, B, H) scratch.
    Writes d_input, d_recurrent (the same array for LSTM and RNN) and dh0."""
    weights = cuda.shared.array(0, numba.float32)
    d = direction_offset + cuda.blockIdx.y
    gates = gate_count(cell)
    hidden = W_hh.shape[1] // gates
    rows_hh = W_hh.shape[1]
    u0, units, tid, threads, first_slot = _block_layout(
        virtual_blocks, units_per_block, hidden, rows_hh * units_per_block
    )
    partials = first_slot + rows_hh * units_per_block
    for idx in range(tid, rows_hh * units_per_block, threads):
        u = idx % units_per_block
        if u < units:
            weights[first_slot + idx] = wide(W_hh[d, idx // units_per_block, u0 + u], one)
    cuda.syncthreads()
    grid = cuda.cg.this_grid()
    zero = one - one
    # k = -1 hands the gradients carried out of the first processed step to dh0.
    for k in range(batch_sizes.shape[0] - 1, -2, -1):
        rows, off = step_span(k, d, batch_sizes, offsets)
        rows_next, off_next = step_span(k + 1, d, batch_sizes, offsets)
        rows_prev, off_prev = step_span(k - 1, d, batch_sizes, offsets)
        # As in forward: lanes split each item's dot product when items are fewer than threads.
        items = max(rows, rows_next) * units_per_block
        lanes = _lanes(items, threads)
        for first_item in range(0, items * lanes, threads):
            item, lane = (first_item + tid) // lanes, (first_item + tid) % lanes
            b, u = item // units_per_block, item % units_per_block
            active = item < items and u < units
            j = u0 + u
            carried = zero
            if active and b < rows_next:
                for q in range(lane, rows_hh, lanes):
                    weight = weights[first_slot + q * units_per_block + u]
                    carried += wide(d_recurrent[d, off_next + b, q], one) * weight
            if lanes > 1:
                weights[partials + 4 * tid] = carried
                cuda.syncthreads()
                if lane == 0:
                    for other in range(partials + 4 * (tid + 1), partials + 4 * (tid + lanes), 4):
                        carried += weights[other]
            if active and lane == 0:
                if b < rows_next:
                    carried += wide(dh_direct[d, b, j], one)
                if b < rows:
                    dh = wide(dy[d, off + b, j], one)
                    dh += carried if b < rows_next else wide(dh_n[d, b, j], one)
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
                else:
                    put(dh0, d, b, j, carried)
            if lanes > 1:
                cuda.syncthreads()  # the partial sums are read before the next items reuse them
        grid.sync()
