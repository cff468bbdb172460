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
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .atomics import SLOT, fetch_add, load_acquire, spin_pause, store_release
from .common import ALONE, JIT_OPTIONS, OWNER, chunk_bounds, chunk_claims, direction_tasks
from .panel_matmul import matmul_panels

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
    batch = batch_sizes[0]
    n_tasks, n_chunks, per_direction = direction_tasks(
        directions, batch, threads, product_weights, batch_sizes[-1] < batch
    )
    bounds = chunk_bounds(n_chunks, batch_sizes)
    sync = sync_counters(directions, products, per_direction > n_chunks)
    return n_tasks, n_chunks, per_direction, bounds, sync, chunk_claims(directions)
