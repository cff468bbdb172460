"""One layer's recurrence on the CPU, forward and backward, all its directions: written once,
specialised per cell.

The skeleton owns everything that does not depend on the cell: packing the weights into panels,
the initial and final states, the work plan (directions, row chunks, batch-1 helpers or the unit
split, `shared_product`), the parallel region over tasks, the step loop over the packed layout
(`common`), the per-step products (recurrent, input projection fused as a joint product or as
a product of its own, the LSTM-style projection h = h_raw @ W_hr^T) and the gradients'
bookkeeping. A cell is a module (`lstm`, `gru`, `rnn`) that contributes only:

    GATES          product columns per hidden unit (the product has GATES * H columns);
    JOINT_INPUT    True: a fused input projection joins the recurrent product, rows [x | h]
                   through [W_ih | W_hh]; False: it is a product of its own each step (the
                   GRU's n gate needs the two sides apart);
    SPLITS_UNITS   True: the threads of a one-chunk direction split its hidden units (for
                   elementwise cells, GATES == 1, no projection); False: they share products;
    SEPARATE_RECURRENT_GRADIENT
                   True: the gradient rows that go through W_hh differ from d_input (the
                   GRU's r-scaled n block), and dL/dh keeps a part that skips W_hh;
    MASKED         optional, False when absent: the kernels take `masks` (see below), and
                   the cell's hooks apply its own share of them (the LSTM's zoneout of c);
    forward_rows(a, off, first, end, unit, end_unit, fused, variant)
                   one step's gate math for rows first..end-1 (units unit..end_unit-1) from
                   the products in the direction's arrays `a` (`Forward`): the new states, y
                   (without a projection; h_raw with one) and what backward needs cached;
    backward_rows(a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant)
                   one step's gate gradients from dh (dL/dh' of the gate math's output),
                   into d_input (and the cell's own gradients and caches).
A cell may also set (optional, the defaults below keep the other cells' code as it was):
    GATED_GATES    how many trailing gate blocks of W_hh multiply the cell's gated state
                   rather than h (the "reset before" GRU's n block: W_hn (r * h)); default 0.
                   With G2 = GATED_GATES > 0 each step has a second recurrent product: the
                   first covers W_hh's leading (G - G2) * H rows (into `recurrent`), then
                   forward_rows writes the gated rows (`Forward.gated`, B x P), the second
                   product multiplies them by the last G2 * H rows (into `gated_product`), and
                   forward_gated_rows (same arguments as forward_rows) finishes the step.
                   Backward: backward_rows writes the gated blocks' pre-activation gradients
                   into `Backward.gated_grads` (B x G2*H), the second product gives
                   `gated_through` = gated_grads @ W_hh[last G2 * H rows] (dL/d gated state),
                   backward_gated_rows (same arguments as backward_rows) adds the part of dL/dh
                   through the gated state and fills rec_grads (B x (G - G2) * H), which the
                   first product takes (SEPARATE_RECURRENT_GRADIENT must be True). Not with
                   SPLITS_UNITS (the gated rows need every unit of the step).
Both row hooks are compiled with `common.STEP_JIT_OPTIONS` (inlined into the step loop) and
call the cell's per-row gate math, compiled on its own (`common.ROW_JIT_OPTIONS`), which the
CPU cells (`cells`) share.

How a cell is specialised: `instantiate` copies the Python functions below that name `cell`
(the entries and the task loops) into a namespace where `cell` is the cell's module, under
the cell's own names (`lstm_forward`, ...), and compiles each copy with `@njit(cache=True)`.
Numba treats globals as compile-time constants, so `cell.forward_rows` is a direct call and
`cell.JOINT_INPUT` a constant whose branches LLVM drops, with no dispatch at run time. A copy
with its own qualified name gets its own cache entry (Numba's cache keys a function by its
source file and qualified name, not by its globals), which a closure made by a factory would
not, and a cell's functions passed as first-class arguments would put a dispatcher object into
the signature, which a new process doesn't find in the cache (it compiled afresh every time).
Numba's cache checks only the file that holds a function's code, here this one, while a
kernel compiles in the code of every function it calls (the gate math, the panel product, the
work plan); the copies' qualified names carry a hash of every source file of the CPU kernels
(`_source_tag`), so that an edit to any of them compiles afresh (an edit to the panel product
alone once left the old product in the cached kernels).

Masks (a cell with MASKED; `layer_forward` / `layer_backward` take them as one trailing
argument, a tuple (h_mask, zone_h, zone_c), and the cells without it never see one): the
skeleton applies the two that concern h. h_mask (D, B, P), recurrent dropout: the product
W_hh h of every step reads h_mask * h (the scaled Bernoulli mask m / (1 - p), one per sequence
row for the whole sequence); y and the states stay unmasked. zone_h (D, N, P), zoneout: after
each step's gate math (and projection), h' = zone_h * h + (1 - zone_h) * h_new, per row and
unit (0/1 draws in training, the rate itself in eval). zone_c (D, N, H), the LSTM's zoneout of
c, is its hook's. A mask with no rows is off.

Arrays keep a leading direction axis D (direction 1 runs in reverse); rows are in the packed
time-major layout of `common` (N = sum(batch_sizes), B = batch_sizes[0]); H hidden units, P
the state width (H, or the LSTM's proj_size), I inputs, G = GATES. Arguments a cell has no use
for are arrays with no rows or columns.
"""

from __future__ import annotations

import hashlib
import types
from collections import namedtuple
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from .common import (
    HELPER,
    JIT_OPTIONS,
    PARALLEL_JIT_OPTIONS,
    STEP_JIT_OPTIONS,
    add_row,
    add_rows,
    aligned_empty,
    copy_previous_hidden,
    copy_row,
    copy_rows,
    copy_states,
    fill_joint_rows,
    next_chunk,
    previous_step_rows,
    scalar,
    splits_units,
    step_offsets,
    step_span,
    task_chunk,
)
from .panel_matmul import PANEL, packed_joint_panels, packed_panels
from .runtime import serial_twin
from .shared_product import (
    NO_STEPS,
    close_split,
    exchange,
    first_step,
    opens_split,
    shared_matmul,
    split_matmul,
    split_states,
    unit_plan,
    unit_span,
    work_plan,
)

# The cell module a specialised copy runs, and whether it takes masks (`cell.MASKED`, False
# where the cell doesn't say; see `instantiate`); the unspecialised functions below are templates
# and are never compiled themselves.
cell = None
MASKED = False

# The optional traits (see the module docstring), as a cell without them has them: no second
# product. `instantiate` takes a cell's own where it defines them.
GATED_GATES = 0


@njit(**STEP_JIT_OPTIONS)
def forward_gated_rows(a, off, first, end, unit, end_unit, fused, variant):
    """A GATED_GATES cell's rows after the second product; nothing for other cells."""


@njit(**STEP_JIT_OPTIONS)
def backward_gated_rows(a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant):
    """A GATED_GATES cell's gradient rows after the second product; nothing for other cells."""


_OPTIONAL_TRAITS = ("GATED_GATES", "forward_gated_rows", "backward_gated_rows")

# One direction's arrays in the forward (no direction axis): the inputs x (N, I) and pre
# (N, G*H), the input side's pre-activations when not fused; b_ih (G*H), the input side's bias
# when fused (with b_hh added for a joint product), b_hh (G*H) for cells that keep it apart
# (else empty); the outputs y (N, P), h_n (B, P), c_n (B, H) and the caches; the scratch rows
# recurrent (B, G*H), x_side (B, G*H) (a separate input product), h_raw (B, H) (before the
# projection), joint_rows (B, I + P) ([x | h] of a joint product), h_state (2, B, P) (a unit
# split's states); the panels and the direction's counters. A GATED_GATES cell's second
# product: gated (B, P) in, gated_product (B, G2*H) out, gated_panels (W_hh's last G2*H rows);
# no rows and no panels for other cells. With masks (MASKED cells; else stand-ins never read):
# h_mask (B, P), zone_h (N, P), zone_c (N, H) (see the module docstring), scratch h_keep (B, P)
# and c_keep (B, H) (the states before the step, for zoneout) and masked_rows (B, P) (h_mask * h
# for a product that reads h as it is).
Forward = namedtuple(
    "Forward",
    "x pre b_ih b_hh y h_n c_n gate_cache cell_cache recurrent x_side h_raw joint_rows h_state "
    "hh_panels ih_panels hr_panels sync gated gated_product gated_panels h_mask zone_h zone_c "
    "h_keep c_keep masked_rows",
)
# One direction's arrays in the backward: the forward's h0, c0, y and caches, dy (N, P); out
# d_input (N, G*H), dn_recurrent (N, H) (the GRU's recurrent-side n block), h_prev (N, P),
# dh_total (N, P) and h_raw (N, H) (with a projection), dh0 (B, P), dc0 (B, H); scratch dh_raw
# (B, H) (dL/dh_raw, with a projection), rec_grads (B, G*H) and through (B, P) (a separate
# recurrent gradient and its product with W_hh); the panels and the counters. A GATED_GATES
# cell's second product: gated_grads (B, G2*H) in, gated_through (B, P) out, gated_panels. With
# masks: h_mask, zone_h, zone_c as in `Forward`; scratch h_skip (B, P) (zone_h * dL/dh', the
# part of dL/dh that zoneout passes straight through), c_new (B, H) and c_skip (B, H) (the LSTM
# hook's).
Backward = namedtuple(
    "Backward",
    "h0 c0 y gate_cache cell_cache dy d_input dn_recurrent h_prev dh_total h_raw dh0 dc0 dh_raw "
    "rec_grads through hh_panels hr_panels sync gated_grads gated_through gated_panels h_mask "
    "zone_h zone_c h_skip c_new c_skip",
)


@njit(**JIT_OPTIONS)
def _mask_columns(rows, mask, first, end, start, first_unit, end_unit):
    """rows[r, start + j] *= mask[r, j] for rows first..end-1 and units j of
    first_unit..end_unit-1: recurrent dropout where h enters a product ([x | h] rows: start =
    I), or on dL/dh after the product with W_hh (start = 0)."""
    for r in range(first, end):
        row = rows[r]
        m = mask[r]
        for j in range(first_unit, end_unit):
            row[start + j] *= m[j]


@njit(**JIT_OPTIONS)
def _masked_copy(out, h, mask, first, end):
    """out[r] = h[r] * mask[r], rows first..end-1: the rows of a product that reads h."""
    for r in range(first, end):
        o, row, m = out[r], h[r], mask[r]
        for j in range(row.shape[0]):
            o[j] = row[j] * m[j]


@njit(**JIT_OPTIONS)
def _copy_columns(out, values, first, end, first_unit, end_unit):
    """out[r, j] = values[r, j], rows first..end-1, units first_unit..end_unit-1."""
    for r in range(first, end):
        for j in range(first_unit, end_unit):
            out[r, j] = values[r, j]


@njit(**JIT_OPTIONS)
def _zone_out(h, kept, zone, off, first, end, first_unit, end_unit, one):
    """Zoneout: h[r] = zone[off + r] * kept[r] + (1 - zone[off + r]) * h[r] (the new state
    in, the step's state out), rows first..end-1, units first_unit..end_unit-1."""
    for r in range(first, end):
        row, old, z = h[r], kept[r], zone[off + r]
        for j in range(first_unit, end_unit):
            row[j] = z[j] * old[j] + (one - z[j]) * row[j]


@njit(**JIT_OPTIONS)
def _zone_out_gradient(dh, skip, zone, off, first, end, first_unit, end_unit, one):
    """Backward of `_zone_out`: dh (dL/dh') in, dL/dh_new out; skip[r] = zone * dL/dh', the
    part of dL/dh that skips the cell."""
    for r in range(first, end):
        row, s, z = dh[r], skip[r], zone[off + r]
        for j in range(first_unit, end_unit):
            s[j] = z[j] * row[j]
            row[j] = (one - z[j]) * row[j]


@njit(**JIT_OPTIONS)
def _add_columns(out, values, first, end, first_unit, end_unit):
    """out[r, j] += values[r, j], rows first..end-1, units first_unit..end_unit-1."""
    for r in range(first, end):
        for j in range(first_unit, end_unit):
            out[r, j] += values[r, j]


@njit(**STEP_JIT_OPTIONS)
def _product(rows, panels, out, sync, product, units, crew):
    """Per-step product number `product`, out = rows @ W^T, by the way this direction's threads
    cooperate (`crew`, from `_crew`): with `units`, this task's panels of a unit split
    (`split_matmul`; all of them for a team of one), else shared by owner and helpers
    (`shared_matmul`). False: a helper gave up, and must leave."""
    role, workers, team, first_panel, end_panel = crew
    if units:
        split_matmul(rows, panels, out, team, first_panel, end_panel)
        return True
    return shared_matmul(rows, panels, out, sync, product, role, workers)


@njit(**JIT_OPTIONS)
def _plan(batch_sizes, directions, threads, weights, hidden, units, products):
    """The work plan of a layer (`shared_product.work_plan`, or `unit_plan` where the cell's
    threads split units): (tasks, row chunks per direction, tasks per direction, chunk bounds,
    counters, chunk claims) for W_hh of `weights` weights per direction and `products`
    per-step products."""
    if units:
        return unit_plan(batch_sizes, directions, threads, weights, splits_units(hidden))
    return work_plan(batch_sizes, directions, threads, weights, products)


@njit(**JIT_OPTIONS)
def _task_place(task, n_chunks, per_direction):
    """(direction, first row chunk, role, index, workers) of a task (`common.task_chunk`): in a
    direction of one row chunk, its index among the `workers` tasks that share it; else 0 of 1."""
    d, chunk, role = task_chunk(task, n_chunks, per_direction)
    if n_chunks == 1:
        return d, chunk, role, task % per_direction, per_direction
    return d, chunk, role, 0, 1


@njit(**JIT_OPTIONS)
def _crew(split, role, index, workers, hidden):
    """((role, workers, team, first panel, end panel), first unit, end unit) of task `index`:
    how it takes part in its direction's products (`_product`), and its units: its share of a
    unit split among `workers` tasks, or all of them alone (`shared_product.unit_span`)."""
    team = workers if split else 1
    first_panel, end_panel, unit, end_unit = unit_span(index, team, hidden)
    return (role, workers, team, first_panel, end_panel), unit, end_unit


def _forward_task(
    a, batch_sizes, offsets, reverse, fused, variant, first, last, role, index, workers
):
    """Rows first..last-1 of one direction (`Forward` a), every step. A HELPER task of a shared
    direction only takes part in the products; in a unit-split direction (`workers` > 1 tasks
    of a SPLITS_UNITS cell) task `index` does its units of everything, task 0 alone until every
    helper has arrived (`shared_product.first_step`). Those directions pass their states to the
    next step through h_state, one buffer per step parity (a task may start the next product
    while another still reads this step's states); h_n then gets each task's units."""
    hidden = a.recurrent.shape[1] // cell.GATES
    inputs = a.x.shape[1]
    joint = fused and cell.JOINT_INPUT
    apart = fused and not cell.JOINT_INPUT
    has_proj = a.h_raw.shape[0] > 0
    units = cell.SPLITS_UNITS
    buffered = units and workers > 1
    rows_task = units or role != HELPER
    width = a.h_n.shape[1]
    dropout = MASKED and a.h_mask.shape[0] > 0
    zoneout = MASKED and a.zone_h.shape[0] > 0
    one = scalar(a.y, 1)
    h_unit, h_end = 0, width
    start = first_step(a.sync, index, workers, np.int64(0)) if units else np.int64(0)
    if start == NO_STEPS:
        return
    split = buffered and index > 0  # a helper starts split; task 0 alone until `opens_split`
    crew, unit, end_unit = _crew(split, role, index, workers, hidden)
    product = np.int64(0)  # typed int64 from the start (see shared_matmul)
    exchanges = np.int64(0)
    for k in range(start, batch_sizes.shape[0]):
        t, off, end = step_span(k, batch_sizes, offsets, reverse, first, last)
        if end == first:
            continue
        if buffered and not split and opens_split(a.sync, workers, k):
            split = True
            crew, unit, end_unit = _crew(split, role, index, workers, hidden)
        h_prev = a.h_state[k % 2] if buffered else a.h_n
        if joint and rows_task:
            fill_joint_rows(a.joint_rows, a.x, h_prev, off, first, end, inputs)
            if dropout:
                _mask_columns(a.joint_rows, a.h_mask, first, end, inputs, 0, width)
        if zoneout and rows_task:
            h_unit, h_end = (unit, end_unit) if units else (0, width)
            _copy_columns(a.h_keep, a.h_n, first, end, h_unit, h_end)
        if apart:
            xs = a.x[off + first : off + end]
            if not _product(xs, a.ih_panels, a.x_side[first:end], a.sync, product, units, crew):
                return
            product += 1
            if rows_task:
                for r in range(first, end):
                    add_row(a.x_side[r], a.b_ih)
        if joint:
            rows = a.joint_rows[first:end]
        elif dropout:
            if rows_task:
                _masked_copy(a.masked_rows, h_prev, a.h_mask, first, end)
            rows = a.masked_rows[first:end]
        else:
            rows = h_prev[first:end]
        if not _product(rows, a.hh_panels, a.recurrent[first:end], a.sync, product, units, crew):
            return
        product += 1
        if rows_task:
            cell.forward_rows(a, off, first, end, unit, end_unit, fused, variant)
            if zoneout and not has_proj:
                _zone_out(a.h_n, a.h_keep, a.zone_h, off, first, end, h_unit, h_end, one)
                _copy_columns(a.y[off:], a.h_n, first, end, h_unit, h_end)
            if buffered:
                h_next = a.h_state[(k + 1) % 2]
                for r in range(first, end):
                    copy_row(h_next[r, unit:end_unit], a.h_n[r, unit:end_unit])
        if GATED_GATES:
            gated_out = a.gated_product[first:end]
            if not _product(
                a.gated[first:end], a.gated_panels, gated_out, a.sync, product, units, crew
            ):
                return
            product += 1
            if rows_task:
                forward_gated_rows(a, off, first, end, unit, end_unit, fused, variant)
        if has_proj:
            if not _product(
                a.h_raw[first:end], a.hr_panels, a.h_n[first:end], a.sync, product, units, crew
            ):
                return
            product += 1
            if rows_task:
                if zoneout:
                    _zone_out(a.h_n, a.h_keep, a.zone_h, off, first, end, 0, width, one)
                copy_rows(a.y[off + first : off + end], a.h_n[first:end])
        if split:
            exchanges += 1
            exchange(a.sync, index, workers, exchanges)
    if buffered and not split:
        close_split(a.sync)


def layer_forward(
    batch_sizes, variant, x, W_ih, b_ih, W_hh, b_hh, W_hr, h0, c0, pre, y, h_n, c_n, gate_cache,
    cell_cache, threads, masks=None,
):  # fmt: skip
    """Run the recurrence of one layer: fills y, h_n, c_n and the cell's caches (none when
    they have no rows: inference).

    W_hh (D, G*H, P); W_hr (D, P, H), or (D, 0, H) without projection; h0 (D, B, P), c0 (D, B, H)
    or (D, B, 0) for cells without a cell state; variant: a cell's option (the RNN's relu).
    W_ih (D, G*H, I) with rows fuses the input projection of x (N, I) into the per-step
    products, with b_ih (D, G*H) (b_ih + b_hh for a JOINT_INPUT cell, or zeros), and pre is
    not read; W_ih (D, 0, 0): pre (D, N, G*H) holds x @ W_ih^T + biases (those the cell takes
    on the input side), and x and b_ih go unused. b_hh (D, G*H) for cells that add it apart,
    else (D, 0). The cell's forward_rows says which of pre, gate_cache and cell_cache it writes.
    masks: (h_mask, zone_h, zone_c) for a MASKED cell (see the module docstring), else left out."""
    offsets = step_offsets(batch_sizes)
    directions, batch, width = h0.shape
    hidden = W_hh.shape[1] // cell.GATES
    fused = W_ih.shape[1] > 0
    joint = fused and cell.JOINT_INPUT
    apart = fused and not cell.JOINT_INPUT
    gated_columns = GATED_GATES * hidden
    lead = W_hh.shape[1] - gated_columns
    if GATED_GATES:  # the first product's rows of W_hh, and the second's
        hh_panels = packed_panels(np.ascontiguousarray(W_hh[:, :lead]), False, threads)
        gated_panels = packed_panels(np.ascontiguousarray(W_hh[:, lead:]), False, threads)
    elif joint:
        hh_panels = packed_joint_panels(W_ih, W_hh, threads)
        gated_panels = np.empty((directions, 0, 0, PANEL), dtype=y.dtype)
    else:
        hh_panels = packed_panels(W_hh, False, threads)
        gated_panels = np.empty((directions, 0, 0, PANEL), dtype=y.dtype)
    if apart:
        ih_panels = packed_panels(W_ih, False, threads)
    else:
        ih_panels = np.empty((directions, 0, 0, PANEL), dtype=y.dtype)
    hr_panels = packed_panels(W_hr, False, threads)
    copy_states(h_n, h0)
    copy_states(c_n, c0)
    has_proj = W_hr.shape[1] > 0
    recurrent = aligned_empty((directions, batch, W_hh.shape[1]), y)
    x_side = np.empty((directions, batch if apart else 0, W_hh.shape[1]), dtype=y.dtype)
    h_raw = np.empty((directions, batch if has_proj else 0, hidden), dtype=y.dtype)
    weights = W_hh.shape[1] * W_hh.shape[2]
    gated_rows = batch if GATED_GATES else 0
    gated = np.empty((directions, gated_rows, width), dtype=y.dtype)
    gated_product = np.empty((directions, gated_rows, gated_columns), dtype=y.dtype)
    products = batch_sizes.shape[0] * (1 + has_proj + apart + (GATED_GATES > 0))
    n_tasks, n_chunks, per_direction, bounds, sync, claims = _plan(
        batch_sizes, directions, threads, weights, hidden, cell.SPLITS_UNITS, products
    )
    split = cell.SPLITS_UNITS and n_chunks == 1 and per_direction > 1
    h_state = split_states(h0, split)
    joint_rows = np.empty(
        (directions, per_direction if split else 1, batch, x.shape[1] + width if joint else 0),
        dtype=y.dtype,
    )
    if masks is None:  # a cell without masks: x_side and joint_rows stand in, never read
        h_mask = zone_h = zone_c = h_keep = c_keep = x_side
        masked_rows = joint_rows
    else:
        h_mask, zone_h, zone_c = masks
        h_keep = np.empty((directions, batch, width), dtype=y.dtype)
        c_keep = np.empty((directions, batch, c0.shape[2]), dtype=y.dtype)
        tasks = per_direction if split else 1
        masked_rows = np.empty((directions, tasks, batch, 0 if joint else width), dtype=y.dtype)
    for task in prange(n_tasks):
        d, chunk, role, index, workers = _task_place(task, n_chunks, per_direction)
        a = Forward(
            x, pre[d], b_ih[d], b_hh[d], y[d], h_n[d], c_n[d], gate_cache[d], cell_cache[d],
            recurrent[d], x_side[d], h_raw[d], joint_rows[d, index if split else 0], h_state[d],
            hh_panels[d], ih_panels[d], hr_panels[d], sync[d], gated[d], gated_product[d],
            gated_panels[d], h_mask[d], zone_h[d], zone_c[d], h_keep[d], c_keep[d],
            masked_rows[d, index if split else 0],
        )  # fmt: skip
        while chunk < n_chunks:
            _forward_task(
                a, batch_sizes, offsets, d == 1, fused, variant, bounds[chunk], bounds[chunk + 1],
                role, index, workers,
            )  # fmt: skip
            chunk = next_chunk(claims, d, n_chunks, per_direction)


def _backward_task(a, batch_sizes, offsets, reverse, variant, first, last, role, index, workers):
    """Rows first..last-1 of one direction (`Backward` a), every step in reverse; the threads
    cooperate as in `_forward_task`. Each step: dh0 (dL/dh of each row's latest state) gets
    the step's output gradient; through W_hr^T with a projection; the cell's gate gradients;
    then dh0 = (the recurrent gradient rows) @ W_hh, plus the part that skips W_hh if any."""
    hidden = a.d_input.shape[1] // cell.GATES
    has_proj = a.h_raw.shape[0] > 0
    separate = cell.SEPARATE_RECURRENT_GRADIENT
    units = cell.SPLITS_UNITS
    buffered = units and workers > 1
    lead = index == 0  # the owner, or task 0 of a unit split
    rows_task = units or role != HELPER
    width = a.dh0.shape[1]
    dropout = MASKED and a.h_mask.shape[0] > 0
    zoneout = MASKED and a.zone_h.shape[0] > 0
    one = scalar(a.y, 1)
    start = np.int64(batch_sizes.shape[0] - 1)
    start = first_step(a.sync, index, workers, start) if units else start
    if start == NO_STEPS:
        return
    split = buffered and index > 0
    crew, unit, end_unit = _crew(split, role, index, workers, hidden)
    dh = a.dh_raw if has_proj else a.dh0
    product = np.int64(0)  # typed int64 from the start (see shared_matmul)
    exchanges = np.int64(0)
    for k in range(start, -1, -1):
        t, off, end = step_span(k, batch_sizes, offsets, reverse, first, last)
        if end == first:
            continue
        if buffered and not split and opens_split(a.sync, workers, k):
            split = True
            crew, unit, end_unit = _crew(split, role, index, workers, hidden)
        prev, prev_rows = previous_step_rows(t, batch_sizes, reverse)
        if lead:
            count = end - first
            copy_previous_hidden(a.y, a.h0, offsets, t, prev, prev_rows, first, count, a.h_prev)
            if dropout and a.h_prev.shape[0] > 0:  # dW_hh takes the states the product read
                _mask_columns(a.h_prev[off:], a.h_mask, first, end, 0, 0, width)
        if rows_task:
            for r in range(first, end):
                add_row(a.dh0[r, unit:end_unit], a.dy[off + r, unit:end_unit])
        h_unit, h_end = (unit, end_unit) if units else (0, width)
        if zoneout and rows_task:
            _zone_out_gradient(a.dh0, a.h_skip, a.zone_h, off, first, end, h_unit, h_end, one)
        if has_proj:
            if rows_task:
                copy_rows(a.dh_total[off + first : off + end], a.dh0[first:end])
            if not _product(
                a.dh0[first:end], a.hr_panels, a.dh_raw[first:end], a.sync, product, units, crew
            ):
                return
            product += 1
        if rows_task:
            cell.backward_rows(
                a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant
            )
        if GATED_GATES:
            gated_rows, into = a.gated_grads[first:end], a.gated_through[first:end]
            if not _product(gated_rows, a.gated_panels, into, a.sync, product, units, crew):
                return
            product += 1
            if rows_task:
                backward_gated_rows(
                    a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant
                )
        if split:
            exchanges += 1
            exchange(a.sync, index, workers, exchanges)
        if separate:
            rows, into = a.rec_grads[first:end], a.through[first:end]
        else:
            rows, into = a.d_input[off + first : off + end], a.dh0[first:end]
        if not _product(rows, a.hh_panels, into, a.sync, product, units, crew):
            return
        product += 1
        if dropout and rows_task:  # W_hh read h_mask * h: dL/dh = h_mask * (the product)
            _mask_columns(a.through if separate else a.dh0, a.h_mask, first, end, 0, h_unit, h_end)
        if separate and rows_task:
            add_rows(a.dh0[first:end], a.through[first:end])
        if zoneout and rows_task:
            _add_columns(a.dh0, a.h_skip, first, end, h_unit, h_end)
    if buffered and not split:
        close_split(a.sync)


def layer_backward(
    batch_sizes, variant, W_hh, W_hr, h0, c0, y, gate_cache, cell_cache, dy, dh_n, dc_n, d_input,
    dn_recurrent, h_prev, dh_total, h_raw, dh0, dc0, threads, masks=None,
):  # fmt: skip
    """Backward of `layer_forward`, per step; the caller does the GEMMs over all rows.

    Takes the weights as `layer_forward` does (W_hh (D, G*H, P), W_hr (D, P, H) or (D, 0, H));
    the per-step products run on them as transposed panels. In: the forward's h0, c0, y and
    caches; dy (D, N, P), dh_n (D, B, P), dc_n (D, B, H) (or (D, B, 0)). Out: d_input
    (D, N, G*H), the gradients of the gate pre-activations on the input side; dn_recurrent
    (D, N, H) for a SEPARATE_RECURRENT_GRADIENT cell (its recurrent side's n block), else
    (D, 0, H); h_prev (D, N, P), the state each row consumed (or (D, 0, P): not written); with
    a projection dh_total (D, N, P) = dL/dh and h_raw (D, N, H) (else both (D, 0, *));
    dh0 (D, B, P), dc0 (D, B, H) (or (D, B, 0)). masks: as `layer_forward`'s (then h_prev
    holds the states as the product read them, h_mask * h, for dW_hh)."""
    offsets = step_offsets(batch_sizes)
    directions, batch, width = h0.shape
    hidden = W_hh.shape[1] // cell.GATES
    gated_columns = GATED_GATES * hidden
    lead = W_hh.shape[1] - gated_columns
    if GATED_GATES:  # the first product's rows of W_hh, and the second's
        hh_panels = packed_panels(np.ascontiguousarray(W_hh[:, :lead]), True, threads)
        gated_panels = packed_panels(np.ascontiguousarray(W_hh[:, lead:]), True, threads)
    else:
        hh_panels = packed_panels(W_hh, True, threads)
        gated_panels = np.empty((directions, 0, 0, PANEL), dtype=y.dtype)
    hr_panels = packed_panels(W_hr, True, threads)
    copy_states(dh0, dh_n)
    copy_states(dc0, dc_n)
    has_proj = W_hr.shape[1] > 0
    separate = cell.SEPARATE_RECURRENT_GRADIENT
    dh_raw = np.empty((directions, batch if has_proj else 0, hidden), dtype=y.dtype)
    rec_grads = np.empty((directions, batch if separate else 0, lead), dtype=y.dtype)
    through = np.empty((directions, batch if separate else 0, width), dtype=y.dtype)
    gated_rows = batch if GATED_GATES else 0
    gated_grads = np.empty((directions, gated_rows, gated_columns), dtype=y.dtype)
    gated_through = np.empty((directions, gated_rows, width), dtype=y.dtype)
    if masks is None:  # a cell without masks: rec_grads stands in, never read
        h_mask = zone_h = zone_c = h_skip = c_new = c_skip = rec_grads
    else:
        h_mask, zone_h, zone_c = masks
        h_skip = np.empty((directions, batch, width), dtype=y.dtype)
        c_new = np.empty((directions, batch, c0.shape[2]), dtype=y.dtype)
        c_skip = np.empty((directions, batch, c0.shape[2]), dtype=y.dtype)
    weights = W_hh.shape[1] * W_hh.shape[2]
    products = batch_sizes.shape[0] * (1 + has_proj + (GATED_GATES > 0))
    n_tasks, n_chunks, per_direction, bounds, sync, claims = _plan(
        batch_sizes, directions, threads, weights, hidden, cell.SPLITS_UNITS, products
    )
    for task in prange(n_tasks):
        d, chunk, role, index, workers = _task_place(task, n_chunks, per_direction)
        a = Backward(
            h0[d], c0[d], y[d], gate_cache[d], cell_cache[d], dy[d], d_input[d], dn_recurrent[d],
            h_prev[d], dh_total[d], h_raw[d], dh0[d], dc0[d], dh_raw[d], rec_grads[d],
            through[d], hh_panels[d], hr_panels[d], sync[d], gated_grads[d], gated_through[d],
            gated_panels[d], h_mask[d], zone_h[d], zone_c[d], h_skip[d], c_new[d], c_skip[d],
        )  # fmt: skip
        while chunk < n_chunks:
            _backward_task(
                a, batch_sizes, offsets, d == 1, variant, bounds[chunk], bounds[chunk + 1], role,
                index, workers,
            )  # fmt: skip
            chunk = next_chunk(claims, d, n_chunks, per_direction)


# The functions that name `cell`, copied per cell; the entries last, once the task loops they
# call are in the namespace.
_TASKS = (_forward_task, _backward_task)
_ENTRIES = {"forward": layer_forward, "backward": layer_backward}


def _copy(function, namespace: dict, name: str, module: str):
    """`function` as a new Python function named `name` that looks its globals up in
    `namespace`."""
    twin = types.FunctionType(function.__code__, namespace, name, function.__defaults__)
    twin.__qualname__ = name
    twin.__module__ = module
    twin.__doc__ = function.__doc__
    return twin


_HERE = Path(__file__).resolve().parent


def _source_tag(here: Path = _HERE) -> str:
    """Eight hex digits of a hash of the CPU kernels' source files (`here`: `kernels/cpu/*.py`,
    and `kernels/math.py`), or "" if one can't be read."""
    digest = hashlib.sha256()
    try:
        for source in [*sorted(here.glob("*.py")), here.parent / "math.py"]:
            digest.update(source.read_bytes())
    except OSError:
        return ""
    return "_" + digest.hexdigest()[:8]


_SOURCE_TAG = _source_tag()


def instantiate(cell_module) -> dict[str, numba.core.registry.CPUDispatcher]:
    """The kernels of a cell, by name: `<cell>_forward`, `<cell>_backward` (parallel) and their
    `_serial` twins (`runtime.serial_twin`), for the cell module `cell_module` named
    `kernels.cpu.<cell>`, whose attributes are those the module docstring lists. The module
    must be importable by that name: a cache entry's environment is rebuilt from it."""
    prefix = cell_module.__name__.rsplit(".", 1)[-1]
    tag = _SOURCE_TAG
    namespace = dict(globals())
    namespace["cell"] = cell_module
    for trait in _OPTIONAL_TRAITS:
        namespace[trait] = getattr(cell_module, trait, namespace[trait])
    if namespace["GATED_GATES"] and (
        cell_module.SPLITS_UNITS
        or cell_module.JOINT_INPUT
        or not cell_module.SEPARATE_RECURRENT_GRADIENT
    ):
        raise ValueError(
            f"{cell_module.__name__}: a GATED_GATES cell needs SPLITS_UNITS and JOINT_INPUT "
            "False and SEPARATE_RECURRENT_GRADIENT True"
        )
    namespace["MASKED"] = getattr(cell_module, "MASKED", False)
    for task in _TASKS:
        copy = _copy(task, namespace, f"{prefix}{task.__name__}", cell_module.__name__)
        copy.__qualname__ += tag
        namespace[task.__name__] = njit(**JIT_OPTIONS)(copy)
    kernels = {}
    for part, entry in _ENTRIES.items():
        name = f"{prefix}_{part}"
        copy = _copy(entry, namespace, name, cell_module.__name__)
        copy.__qualname__ += tag
        kernel = njit(**PARALLEL_JIT_OPTIONS)(copy)
        kernels[name] = kernel
        kernels[f"{name}_serial"] = serial_twin(kernel)
    return kernels
