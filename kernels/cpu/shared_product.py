"""Several threads sharing one direction's per-step products: at batch 1, and for big weights.

A direction's rows split into chunks, one thread each (`common.direction_tasks`); at batch 1
there is one chunk, and the other threads would idle while one thread streams the whole W_hh
through its cache every step. With weights too big for the caches (`common.SHARED_MIN_WEIGHTS`)
every thread of a split batch would stream all of them from memory each step. In both cases the
direction keeps one chunk, and the spare threads become helpers of that chunk's owner:
for each product the owner publishes that its input is ready, then every thread claims groups
of panels from a shared counter, computes them, and counts them done; the owner waits until all
groups are done and goes on with the gate math alone (it is a few percent of a step).

Deadlock-free by construction: the owner only ever waits for groups some running thread has
claimed, so it finishes alone if no helper shows up (e.g. when Numba runs the tasks one after
another on one thread), and a helper that sees no new product for a long time gives up and
leaves the rest to the owner.

Counters: `sync` is an int64 array (products + 1, SLOT * 2): row 0 holds the number of products
published so far; row 1 + n holds product n's claimed and done counts, each on its own cache line.

The RNN splits a direction's hidden units between its threads instead (`unit_span`): each
computes the product columns of its own units and their tanh / relu, and the threads meet once
a step (`exchange`), when the next product needs every unit of h (the backward: every unit of
the step's gradient). Task 0 starts alone and the split begins at the first step boundary after
every helper has arrived (`first_step`, `opens_split`, `close_split`), so a helper woken late
from sleep costs nothing but its absence. A step then costs half a product, half the
activations and one hand-over of a few cache lines between cores (~50 ns here), against the
owner's publish, claim and done counters of a shared product. T1000 B1 kernels, alternating
calls: RNN H128 forward 1.45x and backward 1.47x of one thread (which owner and helper didn't
beat: 1.06x); RNN H256 1.20x of owner and helper. For GRU and LSTM the same split, built and
measured, didn't pay (B1 forward 0.90-0.96x of owner and helper; their gate math
needs each gate block as its own view to vectorise: bench/decisions.md), so they share
products (a cell's SPLITS_UNITS, `recurrence`).
Results are bitwise the same either way: every output column is the same k-ordered FMA chain.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .atomics import SLOT, compare_exchange, fetch_add, load_acquire, spin_pause, store_release
from .common import (
    ALONE,
    HELPER_MIN_WEIGHTS,
    JIT_OPTIONS,
    OWNER,
    UNIT_SPLIT_MIN_WEIGHTS,
    aligned_empty,
    chunk_bounds,
    chunk_claims,
    copy_rows,
    direction_tasks,
)
from .panel_matmul import PANEL, matmul_panels, panel_count

# A helper gives up after this many spins with no new product (~28 ms here), or a sixteenth of
# that (~2 ms) before the first one: an owner that hasn't started by then is most likely queued
# behind the helper on the same thread (possible with TBB's scheduler), and will finish alone.
HELPER_PATIENCE = 1 << 20


@njit(**JIT_OPTIONS)
def sync_counters(directions, products, shared):
    """Zeroed counters (D, products + 1, 2 * SLOT) for `shared_matmul`: row 0 of a direction
    counts the products published, row 1 + n holds product n's claimed and done counts. Without
    sharing (`shared` False) one row per direction is enough."""
    return np.zeros((directions, products + 1 if shared else 1, 2 * SLOT), dtype=np.int64)


@njit(**JIT_OPTIONS)
def shared_matmul(rows, panels, out, sync, index, role, groups):
    """out = rows @ W^T as `panel_matmul.matmul_panels`, product number `index` of a direction,
    computed by every thread of that direction that calls it (`groups` panel groups claimed
    one at a time). ALONE: a plain call. Returns False only when a helper gave up waiting, after
    which it must not call again in this kernel call.

    Callers pass `index` as an int64 variable, never a literal 0: Numba compiles a separate copy
    of a function for each literal argument it is first called with (~1-2 s of compile)."""
    if role == ALONE:
        matmul_panels(rows, panels, out, np.int64(0), panels.shape[0])
        return True
    if role == OWNER:
        store_release(sync, 0, 0, index + 1)
    else:
        spins = 0
        patience = HELPER_PATIENCE if index > 0 else HELPER_PATIENCE >> 4
        while load_acquire(sync, 0, 0) <= index:
            spins += 1
            if spins > patience:
                return False
            spin_pause()
    n_panels = panels.shape[0]
    per_group = (n_panels + groups - 1) // groups
    while True:
        group = fetch_add(sync, index + 1, 0, 1)
        if group * per_group >= n_panels:
            break
        first = group * per_group
        last = min(n_panels, first + per_group)
        matmul_panels(rows, panels, out, first, last)
        fetch_add(sync, index + 1, SLOT, 1)
    if role == OWNER:
        n_groups = (n_panels + per_group - 1) // per_group if n_panels > 0 else 0
        while load_acquire(sync, index + 1, SLOT) < n_groups:
            spin_pause()
    return True


@njit(**JIT_OPTIONS)
def work_plan(batch_sizes, directions, threads, product_weights, products):
    """How a kernel entry spreads a layer over its threads: (tasks, row chunks per direction,
    tasks per direction, chunk bounds, batch-1 helper counters, chunk claims), from
    `common.direction_tasks` (uneven batch sizes: packed input), `common.chunk_bounds`,
    `sync_counters` (for `products` per-step products) and `common.chunk_claims`."""
    n_tasks, n_chunks, per_direction, bounds = _tasks_and_chunks(
        batch_sizes, directions, threads, product_weights, HELPER_MIN_WEIGHTS, True
    )
    sync = sync_counters(directions, products, per_direction > n_chunks)
    return n_tasks, n_chunks, per_direction, bounds, sync, chunk_claims(directions)


@njit(**JIT_OPTIONS)
def _tasks_and_chunks(batch_sizes, directions, threads, product_weights, min_weights, shares):
    """(tasks, row chunks per direction, tasks per direction, chunk bounds) of a layer:
    `common.direction_tasks` (uneven batch sizes: packed input) and `common.chunk_bounds`."""
    batch = batch_sizes[0]
    n_tasks, n_chunks, per_direction = direction_tasks(
        directions, batch, threads, product_weights, batch_sizes[-1] < batch, min_weights, shares
    )
    return n_tasks, n_chunks, per_direction, chunk_bounds(n_chunks, batch_sizes)


# A task's first step when there is none for it (`first_step`).
NO_STEPS = -1
# Spins a unit-split helper waits for its direction's first task to start (~2 ms here): one
# that hasn't started by then most likely runs after the helper on the same thread, and then
# runs alone.
SPLIT_PATIENCE = 1 << 16


@njit(**JIT_OPTIONS)
def unit_span(index, workers, hidden):
    """(first panel, end panel, first unit, end unit) of task `index` of the `workers` tasks
    splitting a direction's `hidden` units: whole panels of PANEL units each, as even as they
    go (the last task's last panel may be partial)."""
    n = panel_count(hidden)
    first = index * n // workers
    end = (index + 1) * n // workers
    return first, end, min(hidden, first * PANEL), min(hidden, end * PANEL)


@njit(**JIT_OPTIONS)
def first_step(sync, index, workers, first):
    """The processing step a task of a unit-split direction (`workers` tasks) starts at:
    task 0 at `first`, alone until every helper has arrived (`opens_split`); a helper at the
    step where task 0 opened the split, or NO_STEPS when task 0 finished or closed it first
    (`close_split`), or hasn't started within SPLIT_PATIENCE spins (then the helper closes
    it). sync row 0 holds the split's state (0 undecided, 1 closed, step + 2 opened), the
    helpers' arrivals and whether task 0 has started."""
    if index == 0:
        if workers > 1:
            store_release(sync, 0, 2, 1)
        return first
    fetch_add(sync, 0, 1, 1)
    spins = 0
    while True:
        state = load_acquire(sync, 0, 0)
        if state == 1:
            return NO_STEPS
        if state > 1:
            return state - 2
        spins += 1
        if spins > SPLIT_PATIENCE and load_acquire(sync, 0, 2) == 0:
            if compare_exchange(sync, 0, 0, 0, 1) == 0:
                return NO_STEPS
        spin_pause()


@njit(**JIT_OPTIONS)
def opens_split(sync, workers, step):
    """Task 0, before processing step `step` alone: True when all `workers - 1` helpers have
    arrived and the split now starts at this step (its states so far are in the shared
    buffers, written before this publishes them). A direction whose helpers arrive late
    starts alone rather than waiting for a thread woken from sleep."""
    if load_acquire(sync, 0, 1) < workers - 1:
        return False
    return compare_exchange(sync, 0, 0, 0, step + 2) == 0


@njit(**JIT_OPTIONS)
def close_split(sync):
    """Task 0 ran every step alone: a helper arriving now finds nothing to do."""
    compare_exchange(sync, 0, 0, 0, 1)


@njit(**JIT_OPTIONS)
def exchange(sync, index, workers, count):
    """Task `index` has written its units of the `count`-th exchange (its stores happen before
    this publishes them); returns when every other task has published as many, so their
    units are readable. Nothing to do for a task alone."""
    if workers == 1:
        return
    store_release(sync, 1 + index, 0, count)
    for other in range(workers):
        if other != index:
            while load_acquire(sync, 1 + other, 0) < count:
                spin_pause()


@njit(**JIT_OPTIONS)
def split_matmul(rows, panels, out, workers, first_panel, end_panel):
    """`panel_matmul.matmul_panels` for a task's units: out = rows @ W^T in the columns of
    panels first_panel..end_panel-1 (`unit_span`), or in every column for a task alone
    (workers = 1)."""
    if workers == 1:
        first_panel, end_panel = 0, panels.shape[0]
    matmul_panels(rows, panels, out, first_panel, end_panel)


@njit(**JIT_OPTIONS)
def split_states(h0, split):
    """(D, 2, B, P): both buffers of a unit-split direction's states (`recurrence._forward_task`)
    start as h0, which is each row's state until its first step; (D, 0, B, P) unsplit."""
    directions, batch, width = h0.shape
    states = aligned_empty((directions, 2 if split else 0, batch, width), h0)
    for d in range(directions if split else 0):
        for buffer in range(2):
            copy_rows(states[d, buffer], h0[d])
    return states


@njit(**JIT_OPTIONS)
def unit_plan(batch_sizes, directions, threads, product_weights, splittable):
    """`work_plan` for a kernel whose threads split units (the RNN): (tasks, row chunks per
    direction, tasks per direction, chunk bounds, counters (D, 1 + workers, SLOT), chunk
    claims); `splittable`: `common.splits_units`. A direction splits its units when it has one
    row chunk and several tasks."""
    n_tasks, n_chunks, per_direction, bounds = _tasks_and_chunks(
        batch_sizes, directions, threads, product_weights, UNIT_SPLIT_MIN_WEIGHTS, splittable
    )
    workers = per_direction if n_chunks == 1 else 1
    sync = np.zeros((directions, 1 + workers, SLOT), dtype=np.int64)  # see `first_step`
    return n_tasks, n_chunks, per_direction, bounds, sync, chunk_claims(directions)
