"""Persistent strategy: one cooperative launch runs the whole recurrence of a layer; float32 or
16-bit storage, float32 math and weights (in shared memory).

Grid (blocks per direction, directions); block x of direction d owns hidden units
u0 = x * U .. u0 + U - 1 and keeps their part of W_hh in shared memory for the whole sequence
(loaded once), computing the recurrent products itself; a grid-wide barrier separates the steps,
the only point where one block needs another's results (the previous step's h, or in backward
the next step's gate gradients). Everything a block writes per step is either its own units'
state or a new row of the packed outputs, so no two blocks ever write the same element.

Shared memory of a block (float32 slots, `_block_layout`):
  weights   forward  W_hh[d, g*H + u0 + u, p] at (u*G + g)*W + p  (G*U*W floats)
            backward W_hh[d, q, u0 + u]       at u*G*H + q        (the same count)
  stage     `stage_rows` rows of the step's operand, copied from global memory once a step:
            forward h_{t-1} (W floats a row), backward the next step's gate gradients (G*H)
  partials  simulator only: 4 floats per thread for the group sums (`group_sums`)
Each item of a step, a pair of rows and one unit, belongs to a group of `lanes` threads (a warp
on a GPU) that splits its dot products over p (or q): consecutive lanes read consecutive
shared-memory words of the weights and of the stage, so a warp's loads are free of bank
conflicts, each weight loaded serves both rows, and nothing is read from global memory inside
the loop. The group's partial sums meet by warp shuffles (`shfl_xor`, a butterfly: every lane
gets the sums); lane 0 does the first row's gate math, lane 1 the second's. Rows beyond
`stage_rows` (even) run as further chunks of the same step; a chunk's odd last row is paired
with a zero row.

Under Numba's simulator (no warp shuffles, blocks run one after another) the group sums go
through shared memory instead, and the launcher runs one launch per direction whose single block
stands in for several (`virtual_blocks`, see `_block_layout`): the unit split, the per-block
shared memory and the per-step barrier are exercised all the same. The shuffle path is checked
by compiling to PTX only.

Projections (proj_size) are not handled here: the launcher uses the stepwise strategy for them.
See `cells` for the array layouts.
"""

from __future__ import annotations

import numba
from numba import config, cuda

from .cells import unit_backward, unit_forward
from .common import LSTM, gate_count, put, step_span, wide

_JIT = {"cache": True}
# Shared-memory floats per thread for the group sums: only the simulator needs them.
PARTIALS_PER_THREAD = 4 if config.ENABLE_CUDASIM else 0
_FULL_MASK = 0xFFFFFFFF


@cuda.jit(device=True)
def _block_layout(virtual_blocks, units_per_block, hidden, weight_floats, row_floats, stage_rows):
    """(first unit, units owned, thread index, threads, then the first shared-memory slots of
    the weights, the stage and the partials) of this thread's block. On a GPU a block's shared
    memory is its own (its slots start at 0). With virtual_blocks = V > 0 (the simulator's
    tests), the one real block of a launch stands in for V blocks of blockDim.x / V threads
    each, with their own slices of shared memory, so that the multi-block split and its barrier
    run where blocks can't run at once."""
    block, tid, threads = cuda.blockIdx.x, cuda.threadIdx.x, cuda.blockDim.x
    stage_floats = stage_rows * row_floats
    base = 0
    if virtual_blocks > 0:
        threads = cuda.blockDim.x // virtual_blocks
        block = cuda.threadIdx.x // threads
        tid = cuda.threadIdx.x % threads
        base = block * (weight_floats + stage_floats + PARTIALS_PER_THREAD * threads)
    first, stage = block * units_per_block, base + weight_floats
    units = min(units_per_block, hidden - first)
    return first, units, tid, threads, base, stage, stage + stage_floats


if config.ENABLE_CUDASIM:

    @cuda.jit(device=True)
    def group_sums(a, b, c, e, lane, lanes, tid, shared, partials):
        """The sums of a, b, c, e over the `lanes` threads of this thread's group, in every
        lane. Every thread of the block calls it together (it has block barriers)."""
        slot = partials + 4 * tid
        shared[slot] = a
        shared[slot + 1] = b
        shared[slot + 2] = c
        shared[slot + 3] = e
        cuda.syncthreads()
        first = partials + 4 * (tid - lane)
        a = b = c = e = numba.float32(0)
        for other in range(first, first + 4 * lanes, 4):
            a += shared[other]
            b += shared[other + 1]
            c += shared[other + 2]
            e += shared[other + 3]
        cuda.syncthreads()  # read before the next call overwrites them
        return a, b, c, e

else:

    @cuda.jit(device=True)
    def group_sums(a, b, c, e, lane, lanes, tid, shared, partials):
        """The sums of a, b, c, e over this thread's warp (lanes = 32), in every lane: a
        butterfly of shuffles. Every lane of the warp calls it together."""
        offset = 16
        while offset > 0:
            a += cuda.shfl_xor_sync(_FULL_MASK, a, offset)
            b += cuda.shfl_xor_sync(_FULL_MASK, b, offset)
            c += cuda.shfl_xor_sync(_FULL_MASK, c, offset)
            e += cuda.shfl_xor_sync(_FULL_MASK, e, offset)
            offset //= 2
        return a, b, c, e


@cuda.jit(device=True)
def _forward_row(
    cell, relu, d, off, b, j, hidden, rec0, rec1, rec2, rec3, h_prev, inputs, gate_cache,
    cell_cache, c_state, b_hh, y, h_n, one,
):  # fmt: skip
    """Gate math of batch row b, unit j, at the step whose rows start at `off`; writes y, h_n."""
    h = unit_forward(
        cell, relu, d, off + b, b, j, hidden, rec0, rec1, rec2, rec3, h_prev, inputs,
        gate_cache, cell_cache, c_state, b_hh, one,
    )  # fmt: skip
    put(y, d, off + b, j, h)
    put(h_n, d, b, j, h)


@cuda.jit(**_JIT)
def persistent_forward(
    cell, relu, direction_offset, virtual_blocks, units_per_block, lanes, stage_rows, batch_sizes,
    offsets, W_hh, b_hh, h0, c0, inputs, gate_cache, cell_cache, c_state, y, h_n, one,
):  # fmt: skip
    """Forward of directions direction_offset + blockIdx.y: fills y (D, N, H), h_n, c_state
    (= c_n) and the caches. W_hh (D, G*H, H); h0, c0 (D, B, H). `lanes` threads per item (32 on
    a GPU), `stage_rows` rows of h_{t-1} staged in shared memory at once."""
    shared = cuda.shared.array(0, numba.float32)
    d = direction_offset + cuda.blockIdx.y
    gates = gate_count(cell)
    hidden = W_hh.shape[1] // gates
    width = W_hh.shape[2]
    row_floats = gates * width  # one unit's weights
    weight_floats = units_per_block * row_floats
    u0, units, tid, threads, base, stage, partials = _block_layout(
        virtual_blocks, units_per_block, hidden, weight_floats, width, stage_rows
    )
    for idx in range(tid, weight_floats, threads):
        u = idx // row_floats
        if u < units:
            g, p = (idx % row_floats) // width, idx % width
            shared[base + idx] = wide(W_hh[d, g * hidden + u0 + u, p], one)
    for idx in range(tid, h0.shape[1] * units, threads):
        b, j = idx // units, u0 + idx % units
        h_n[d, b, j] = h0[d, b, j]  # same storage: a plain copy
        if cell == LSTM:
            put(c_state, d, b, j, wide(c0[d, b, j], one))
    cuda.syncthreads()
    grid = cuda.cg.this_grid()
    zero = one - one
    groups = threads // lanes
    group, lane = tid // lanes, tid % lanes
    for k in range(batch_sizes.shape[0]):
        rows, off = step_span(k, d, batch_sizes, offsets)
        rows_prev, off_prev = step_span(k - 1, d, batch_sizes, offsets)
        for r0 in range(0, rows, stage_rows):
            chunk = min(stage_rows, rows - r0)
            pairs = (chunk + 1) // 2
            # h_{t-1} of the chunk's rows: the previous step's output, or h0 for a row that
            # starts here (reverse direction of a packed batch) and at the first step; an odd
            # chunk's pad row is 0.
            for idx in range(tid, 2 * pairs * width, threads):
                b, p = r0 + idx // width, idx % width
                if b >= rows:
                    shared[stage + idx] = zero
                elif b < rows_prev:
                    shared[stage + idx] = wide(y[d, off_prev + b, p], one)
                else:
                    shared[stage + idx] = wide(h0[d, b, p], one)
            cuda.syncthreads()
            # Every bound below is the same for all groups and (virtual) blocks, so all reach
            # each barrier and every lane of a warp each shuffle.
            items = pairs * units_per_block
            for first in range(0, items, groups):
                item = first + group
                pair, u = item // units_per_block, item % units_per_block
                active = item < items and u < units
                a0, a1, a2, a3 = zero, zero, zero, zero  # row 2 * pair
                b0, b1, b2, b3 = zero, zero, zero, zero  # row 2 * pair + 1
                if active:
                    weights = base + u * row_floats
                    h_rows = stage + 2 * pair * width
                    for p in range(lane, width, lanes):
                        ha, hb = shared[h_rows + p], shared[h_rows + width + p]
                        w = shared[weights + p]
                        a0 += w * ha
                        b0 += w * hb
                        if gates > 1:
                            w = shared[weights + width + p]
                            a1 += w * ha
                            b1 += w * hb
                            w = shared[weights + 2 * width + p]
                            a2 += w * ha
                            b2 += w * hb
                        if gates > 3:
                            w = shared[weights + 3 * width + p]
                            a3 += w * ha
                            b3 += w * hb
                a0, a1, a2, a3 = group_sums(a0, a1, a2, a3, lane, lanes, tid, shared, partials)
                b0, b1, b2, b3 = group_sums(b0, b1, b2, b3, lane, lanes, tid, shared, partials)
                if active:
                    r = 2 * pair
                    if lane == 0:
                        _forward_row(
                            cell, relu, d, off, r0 + r, u0 + u, hidden, a0, a1, a2, a3,
                            shared[stage + r * width + u0 + u], inputs, gate_cache,
                            cell_cache, c_state, b_hh, y, h_n, one,
                        )  # fmt: skip
                    if lane == 1 % lanes and r + 1 < chunk:
                        _forward_row(
                            cell, relu, d, off, r0 + r + 1, u0 + u, hidden, b0, b1, b2, b3,
                            shared[stage + (r + 1) * width + u0 + u], inputs, gate_cache,
                            cell_cache, c_state, b_hh, y, h_n, one,
                        )  # fmt: skip
            cuda.syncthreads()  # the stage is read before the next chunk replaces it
        grid.sync()


@cuda.jit(device=True)
def _backward_row(
    cell, relu, d, b, j, hidden, carried, rows, off, rows_next, rows_prev, off_prev, h0, c0, dy,
    dh_n, y, gate_cache, cell_cache, dc_state, d_input, d_recurrent, dh_direct, dh0, one,
):  # fmt: skip
    """Batch row b, unit j of a backward step, given `carried` = (d_recurrent @ W_hh)[b, j] of
    the next processed step: the gate gradients of a row of this step, or dh0 of a row that
    starts at the next one."""
    if b < rows_next:
        carried += wide(dh_direct[d, b, j], one)
    if b < rows:
        dh = wide(dy[d, off + b, j], one)
        dh += carried if b < rows_next else wide(dh_n[d, b, j], one)
        direct = unit_backward(
            cell, relu, d, off + b, b, j, hidden, dh, rows_prev, off_prev, h0, c0, y,
            gate_cache, cell_cache, dc_state, d_input, d_recurrent, gate_cache, False, one,
        )  # fmt: skip
        put(dh_direct, d, b, j, direct)
    else:
        put(dh0, d, b, j, carried)


@cuda.jit(**_JIT)
def persistent_backward(
    cell, relu, direction_offset, virtual_blocks, units_per_block, lanes, stage_rows, batch_sizes,
    offsets, W_hh, h0, c0, dy, dh_n, y, gate_cache, cell_cache, dc_state, d_input, d_recurrent,
    dh_direct, dh0, one,
):  # fmt: skip
    """Backward of `persistent_forward` for directions direction_offset + blockIdx.y. dc_state
    must hold dc_n on entry (it ends as dc0). dy (D, N, H); dh_direct (D, B, H) scratch.
    Writes d_input, d_recurrent (the same array for LSTM and RNN) and dh0. `stage_rows` rows of
    the next step's gate gradients (G*H floats each) are staged in shared memory at once."""
    shared = cuda.shared.array(0, numba.float32)
    d = direction_offset + cuda.blockIdx.y
    gates = gate_count(cell)
    hidden = W_hh.shape[1] // gates
    rows_hh = W_hh.shape[1]
    weight_floats = units_per_block * rows_hh
    u0, units, tid, threads, base, stage, partials = _block_layout(
        virtual_blocks, units_per_block, hidden, weight_floats, rows_hh, stage_rows
    )
    # W_hh's columns u0.. of each row are contiguous: read row by row (coalesced), stored unit by
    # unit (once per launch: the strided shared-memory stores don't matter)
    for idx in range(tid, weight_floats, threads):
        q, u = idx // units_per_block, idx % units_per_block
        if u < units:
            shared[base + u * rows_hh + q] = wide(W_hh[d, q, u0 + u], one)
    cuda.syncthreads()
    grid = cuda.cg.this_grid()
    zero = one - one
    groups = threads // lanes
    group, lane = tid // lanes, tid % lanes
    # k = -1 hands the gradients carried out of the first processed step to dh0.
    for k in range(batch_sizes.shape[0] - 1, -2, -1):
        rows, off = step_span(k, d, batch_sizes, offsets)
        rows_next, off_next = step_span(k + 1, d, batch_sizes, offsets)
        rows_prev, off_prev = step_span(k - 1, d, batch_sizes, offsets)
        total = max(rows, rows_next)
        for r0 in range(0, total, stage_rows):
            chunk = min(stage_rows, total - r0)
            pairs = (chunk + 1) // 2
            # the next processed step's gate gradients of the chunk's rows (0 past its rows)
            for idx in range(tid, 2 * pairs * rows_hh, threads):
                b = r0 + idx // rows_hh
                if b < rows_next:
                    shared[stage + idx] = wide(d_recurrent[d, off_next + b, idx % rows_hh], one)
                else:
                    shared[stage + idx] = zero
            cuda.syncthreads()
            items = pairs * units_per_block
            for first in range(0, items, groups):
                item = first + group
                pair, u = item // units_per_block, item % units_per_block
                active = item < items and u < units
                r = 2 * pair
                carried_a, carried_b = zero, zero
                if active and r0 + r < rows_next:
                    weights = base + u * rows_hh
                    grads = stage + r * rows_hh
                    if r0 + r + 1 < rows_next:  # two rows: each weight serves both
                        for q in range(lane, rows_hh, lanes):
                            w = shared[weights + q]
                            carried_a += shared[grads + q] * w
                            carried_b += shared[grads + rows_hh + q] * w
                    else:
                        for q in range(lane, rows_hh, lanes):
                            carried_a += shared[grads + q] * shared[weights + q]
                carried_a, carried_b, _, _ = group_sums(
                    carried_a, carried_b, zero, zero, lane, lanes, tid, shared, partials
                )
                if active:
                    j = u0 + u
                    if lane == 0:
                        _backward_row(
                            cell, relu, d, r0 + r, j, hidden, carried_a, rows, off, rows_next,
                            rows_prev, off_prev, h0, c0, dy, dh_n, y, gate_cache, cell_cache,
                            dc_state, d_input, d_recurrent, dh_direct, dh0, one,
                        )  # fmt: skip
                    if lane == 1 % lanes and r + 1 < chunk:
                        _backward_row(
                            cell, relu, d, r0 + r + 1, j, hidden, carried_b, rows, off,
                            rows_next, rows_prev, off_prev, h0, c0, dy, dh_n, y, gate_cache,
                            cell_cache, dc_state, d_input, d_recurrent, dh_direct, dh0, one,
                        )  # fmt: skip
            cuda.syncthreads()  # the stage is read before the next chunk replaces it
        grid.sync()
