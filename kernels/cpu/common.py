"""The parts of every CPU recurrence that don't depend on the cell.

Sequence layout shared by all kernels (PyTorch's packed layout, which dense input is a special
case of): rows are time-major, step t holds `batch_sizes[t]` rows starting at `offsets[t]`, and
`batch_sizes` never increases, so the rows alive at step t are always a prefix 0..batch_sizes[t]-1
of the batch. A dense (T, B, F) tensor is the same memory with every batch size equal to B.

A layer-direction runs its steps in "processing order": t = 0..T-1, or T-1..0 when `reverse`.
The recurrence of a row depends only on that row, so a batch splits into contiguous row chunks,
one per thread (two per thread for packed batches, claimed at run time), each running the whole
sequence (one parallel region per call, none per step); the tasks of a call are a direction
and a first chunk (`direction_tasks`, `task_chunk`, `next_chunk`).
Per-step products are `panel_matmul`'s register-tiled loops (no BLAS inside the kernels); the big
GEMMs over all steps (input projection, weight and input gradients) are left to the caller.

A row's previous hidden state is the one from the previous processed step if that step had the
row, otherwise the initial state h0 (for reverse direction a row joins at its last time step).
"""

from __future__ import annotations

import numpy as np
from numba import njit
from numba.extending import overload

from .atomics import SLOT, fetch_add

# Options of every CPU kernel: on-disk cache, no zero-division checks (they keep gate loops
# scalar), GIL released. Entry points that spread work over threads add parallel=True.
JIT_OPTIONS = {"cache": True, "error_model": "numpy", "nogil": True}
PARALLEL_JIT_OPTIONS = {**JIT_OPTIONS, "parallel": True}
# The per-row gate math, shared by the layer kernels and the cell kernels, compiled as its own
# function and called once per row. Inlined instead (inline="always", or the loop written out
# in the caller as before), the gate loop of the cell kernels ran scalar as soon as a call had
# two or more rows: 40 ns per unit against 3.5 ns per unit as a call (LSTM, H = 1024, B = 2).
# For the layer kernels the call was as fast or faster: LSTM T100 B16 H256 forward kernel
# 12.4-14.3 ms against 13.9-14.9 ms inlined, over 2 x 2 runs.
ROW_JIT_OPTIONS = {**JIT_OPTIONS}
# A cell's per-step rows (`recurrence`), inlined into the skeleton's step loop in Numba's IR: as
# a call, the direction's arrays went over as some 170 scalar arguments every step (a T1000 B1
# H128 RNN fwd+bwd on one thread took 1.36x the time of the loop written out, in an interleaved
# A/B on a machine loaded by other work; 1.00-1.03x inlined).
STEP_JIT_OPTIONS = {**JIT_OPTIONS, "inline": "always"}
_JIT = JIT_OPTIONS


# Array copies and sums written as loops. A numpy-style `a[...] = b` between arrays makes Numba
# compile its shape-mismatch error (string formatting, 0.5-1.8 s per array rank), and every
# kernel that links it re-optimises that code again; the shapes here always match.
@njit(**_JIT)
def copy_rows(out, values):
    """out (R, C) = values (R, C)."""
    for r in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[r, j] = values[r, j]


@njit(**_JIT)
def copy_row(out, values):
    """out (C) = values (C)."""
    for j in range(out.shape[0]):
        out[j] = values[j]


@njit(**_JIT)
def add_row(out, values):
    """out (C) += values (C)."""
    for j in range(out.shape[0]):
        out[j] += values[j]


@njit(**_JIT)
def add_rows(out, values):
    """out (R, C) += values (R, C)."""
    for r in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[r, j] += values[r, j]


def scalar(like, value):
    """`value` as a scalar of the array `like`'s dtype, inside compiled code: a constant, where
    `np.ones(1, like.dtype)[0]` allocates an array on every call (the cells' per-step rows)."""
    return like.dtype.type(value)


@overload(scalar)
def _scalar(like, value):
    dtype = like.dtype
    return lambda like, value: dtype(value)


# Bytes per cache line: scratch that several threads write side by side starts on one.
CACHE_LINE = 64


@njit(**_JIT)
def aligned_empty(shape, like):
    """An uninitialised array of `shape` and like's dtype that starts on a cache line. Threads
    that split a direction's units (`shared_product`) write neighbouring columns of the same
    rows; np.empty inside Numba starts arrays 32 bytes into a line at times, and then every
    row's boundary line was written from both cores (a unit split ran at 0.6x until this)."""
    size = 1
    for extent in shape:
        size *= extent
    spare = CACHE_LINE // like.itemsize
    flat = np.empty(size + spare, dtype=like.dtype)
    offset = (CACHE_LINE - flat.ctypes.data % CACHE_LINE) % CACHE_LINE // like.itemsize
    return flat[offset : offset + size].reshape(shape)


@njit(**_JIT)
def fill_joint_rows(joint_rows, x, h, off, first, end, inputs):
    """joint_rows[r] = [x[off + r] | h[r]] for the rows r = first..end-1 of a step at row
    offset `off`: the rows of a forward step whose product has the input projection fused."""
    for r in range(first, end):
        row = joint_rows[r]
        x_row = x[off + r]
        for j in range(inputs):
            row[j] = x_row[j]
        h_row = h[r]
        for j in range(h.shape[1]):
            row[inputs + j] = h_row[j]


@njit(**_JIT)
def copy_states(out, values):
    """out (D, B, C) = values (D, B, C): a kernel's initial or final states."""
    for d in range(out.shape[0]):
        copy_rows(out[d], values[d])


@njit(**_JIT)
def step_offsets(batch_sizes):
    """(T,) int64 batch sizes -> (T + 1,) int64 row offsets of each step in the packed layout."""
    offsets = np.empty(batch_sizes.shape[0] + 1, dtype=np.int64)
    offsets[0] = 0
    for t in range(batch_sizes.shape[0]):
        offsets[t + 1] = offsets[t] + batch_sizes[t]
    return offsets


@njit(**_JIT)
def batch_sizes_problem(batch_sizes, rows):
    """0 if `batch_sizes` (T,) describes `rows` packed rows (T >= 1, sizes >= 0, never
    increasing); 1 if they don't add up to `rows`; 2 if a size is < 0 or increases.
    (One compiled pass: the same checks in numpy cost ~10 us a call, which shows at batch 1.)"""
    total = 0
    for t in range(batch_sizes.shape[0]):
        size = batch_sizes[t]
        if size < 0 or (t > 0 and size > batch_sizes[t - 1]):
            return 2
        total += size
    if batch_sizes.shape[0] == 0 or total != rows:
        return 1
    return 0


@njit(**_JIT)
def step_time(k, num_steps, reverse):
    """Time index of the k-th processed step."""
    return num_steps - 1 - k if reverse else k


@njit(**_JIT)
def previous_step_rows(t, batch_sizes, reverse):
    """(time index of the previous processed step, how many of its rows exist); -1, 0 for none."""
    prev = t + 1 if reverse else t - 1
    if prev < 0 or prev >= batch_sizes.shape[0]:
        return -1, 0
    return prev, batch_sizes[prev]


# Rows per register tile of the per-step product (`panel_matmul`); row chunks start on a
# multiple of it where they can.
TILE_ROWS = 4
# Rows per wide tile of the same product, used while a chunk has that many rows left: 8
# accumulator registers load each panel row once for twice the FMAs of a TILE_ROWS tile.
# 8 x 256 @ 256 x 1024 on one core: 98-106 against 74-84 GFLOP/s (same bits: each output is the
# same k-ordered FMA chain). Only where a panel is one vector register (AVX-512, see
# `wide_tile_fits`); the chunking rules count in WIDE_ROWS rows, except packed batches'
# run-time chunks (`SPLIT_MIN_ROWS`).
WIDE_ROWS = 8


def wide_tile_fits() -> bool:
    """Whether the machine Numba compiles for has AVX-512 (a 16-float panel is one zmm register).

    The wide tile keeps WIDE_ROWS x 16 float32 accumulators: 8 zmm registers with AVX-512, but
    16 ymm registers with AVX2, all there are, so LLVM spills them to the stack on every k. On a
    Zen 3 core (AVX2) the 8-row tile ran 8-80 x 256-512 @ 256-512 x 1024-2048 at 28-32 GFLOP/s
    against 60-80 for the 4-row tile (and a 5- or 6-row tile no better), so there every row
    goes through TILE_ROWS tiles. Read from Numba's own target settings, so that a cache built
    for another CPU (Numba keys its cache on the CPU name and features) never mixes the forms.
    """
    from numba.core import codegen, config

    features = config.CPU_FEATURES
    if features is None:
        features = codegen.get_host_cpu_features()
    return "+avx512f" in features.split(",")


# Read once at import: a compile-time constant for `panel_matmul.matmul_panels`.
WIDE_TILE_FITS = wide_tile_fits()


def panel_products_fit() -> bool:
    """Whether the backward's sequence-wide float32 products (weight gradients, dx) should run
    on `panel_matmul.matmul` rather than torch's GEMM: on AMD CPUs with AVX-512. torch's CPU
    GEMM is MKL, which runs its AVX2 kernels on CPUs that aren't Intel's: 180-220 GFLOP/s on
    two Zen 5 cores against 275-490 for the panels at the LSTM's backward shapes
    (bench/decisions.md). On Intel's AVX-512 CPUs MKL runs its own AVX-512 kernels and stays.
    The CPU name is the one Numba compiles for, as in `wide_tile_fits`."""
    from llvmlite import binding as llvm
    from numba.core import config

    name = config.CPU_NAME or llvm.get_host_cpu_name()
    return WIDE_TILE_FITS and name.startswith("znver")


PANEL_PRODUCTS = panel_products_fit()
# Rows a run-time chunk of a packed batch keeps at least (`direction_tasks`): the widest register
# tile this CPU runs, so that splitting the rows finer costs no tile its full height. With only
# TILE_ROWS tiles (AVX2), the T100 B16 I128 H256 forwards at lengths 50-100, torch-normalised
# over three alternations of two processes on a Zen 3: LSTM 2.11-2.29x against 1.82-2.20x, GRU
# 2.11-2.34x against 1.84-2.25x, RNN 2.08-2.45x against 1.93-2.07x with the WIDE_ROWS rule
# (fwd+bwd likewise; B20 and B24 within the noise of it).
SPLIT_MIN_ROWS = WIDE_ROWS if WIDE_TILE_FITS else TILE_ROWS

# Roles of a task within its direction (see `shared_product`): alone on its row chunk, or the
# owner or a helper of a direction's single row chunk, sharing its per-step products.
ALONE = 0
OWNER = 1
HELPER = 2


# Helpers share a direction's per-step product only when it has at least this many weights:
# below, the synchronisation costs more than half a product saves (T100 B1 forward, 1 thread
# against owner + helper: RNN H64 0.85x, GRU H64 0.97x, RNN H128 1.06x, GRU H128 1.17x,
# LSTM H128 1.19x, LSTM H256 1.46x).
HELPER_MIN_WEIGHTS = 1 << 15
# The RNN's threads split a direction's hidden units instead (`shared_product.unit_span`),
# from this many weights: T1000 B1 kernels, same process, alternating calls against one
# thread sharing nothing, 2 threads: H128 (16K weights) forward 1.45x, backward 1.47x; H256
# 1.20x (against owner and helper at 1.05x).
UNIT_SPLIT_MIN_WEIGHTS = 1 << 14
# Output columns per panel of the per-step product (`panel_matmul.PANEL`, which is this).
UNIT_PANEL = 16
# From this many weights per direction, a direction's threads share its per-step products at any
# batch size, over one row chunk, instead of splitting its rows: each thread then streams half the
# weights every step rather than all of them. At 16 MiB of float32 (LSTM H1024) the weights no
# longer stay in this machine's caches (32 MiB L3, shared), and one thread's product fell to
# 68 GFLOP/s (16 rows; 107 with 4 MiB of weights). LSTM T50 I512 H1024 inference forward, same
# process, against row chunks with torch's input projection: B32 1.11x (1.26x with the
# projection fused, which one 32-row chunk allows), B48 1.13x, B64 1.24x fused (as fast as
# fused 32-row chunks); at H768 (9.4 MiB) sharing lost (0.94x). Only while the row chunks would
# have at most SHARED_MAX_ROWS rows: module level, T20, sharing against not at B96 and B128
# (48- and 64-row chunks) read 0.98-1.02x, and with many rows the owner's gate math alone
# would keep the helpers waiting (and past their patience, see `shared_product`).
SHARED_MIN_WEIGHTS = 1 << 22
SHARED_MAX_ROWS = 4 * WIDE_ROWS


@njit(**_JIT)
def splits_units(hidden):
    """Whether a direction's threads may split its hidden units (`shared_product.unit_span`):
    each task's units must be whole panels of the product (the last one excepted), so that
    its columns are a panel range."""
    return hidden % UNIT_PANEL == 0


@njit(**_JIT)
def direction_tasks(directions, batch, threads, product_weights, uneven, min_weights, shares):
    """(tasks, row chunks per direction, tasks per direction): the threads are shared out between
    the directions of a layer first (each then runs its whole batch, the most efficient product
    shape), then between row chunks of a direction, down to one row per chunk. A direction
    left with a single chunk (batch 1) but several threads gets them all, one owner and helpers
    that share its per-step products, when those have at least HELPER_MIN_WEIGHTS weights
    (`product_weights`: W_hh's per direction). From SHARED_MIN_WEIGHTS weights a direction keeps
    its whole batch as one chunk shared that way, unless its chunks would have more than
    SHARED_MAX_ROWS rows. `min_weights` is HELPER_MIN_WEIGHTS, or UNIT_SPLIT_MIN_WEIGHTS for
    the RNN's unit split; `shares` False (an RNN whose units can't split, `splits_units`)
    keeps every direction's threads to row chunks.

    With uneven batch sizes (packed sequences) and at least SPLIT_MIN_ROWS rows per chunk, a
    direction's rows split into two chunks per task instead, which the tasks claim at run time
    (`task_chunk`, `next_chunk`): the thread that got the long rows does one chunk while the
    other does the short ones and then the rest. (T100 B16 H256, lengths 50-100, 2 threads,
    with 4-row tiles only: the LSTM forward kernel took 4.05-4.15 ms against 4.71-4.73 with
    one fixed chunk per thread. With the 8-row tiles (AVX-512), chunks below WIDE_ROWS rows
    lose them: same process, B16 5.31 against 5.94 ms and B24 7.65 against 8.32 without
    splitting below 8 rows; B20 6.72 against 6.52, B12 and B >= 32 unchanged. Hence
    SPLIT_MIN_ROWS, the tile height the CPU runs.)"""
    workers = max(1, threads // directions)
    n_chunks = max(1, min(workers, batch))
    big = product_weights >= SHARED_MIN_WEIGHTS
    if shares and big and batch // n_chunks <= SHARED_MAX_ROWS:
        n_chunks = 1
    elif n_chunks == 1 and (product_weights < min_weights or not shares):
        workers = 1
    per_direction = workers if n_chunks == 1 else n_chunks
    if uneven and n_chunks > 1 and batch >= 2 * n_chunks * SPLIT_MIN_ROWS:
        n_chunks *= 2
    return directions * per_direction, n_chunks, per_direction


# The LSTM and RNN forwards take the input projection into their per-step products (rows
# [x_t | h] times the joint panels of [W_ih | W_hh], `panel_matmul.packed_joint_panels`), and
# the GRU forward runs it as a second product per step (its n gate needs the two sides apart),
# when every row chunk fills the 8-row tiles and the joint weights stay within this many bytes:
# each thread streams them once per step. LSTM, same process, against torch's addmm over all steps
# plus the recurrence (T, B, I, H; 2 threads, inference):
# B16 I128 H256 1.16x, B16 I256 H512 1.13x, B32 I256 H256 1.13x, B64 I256 H512 1.13x,
# B16 I64 H128 1.07x, B8 I128 H256 (4-row chunks) 1.03x, B2 0.90x; past the limit
# B32 I384 H768 (14 MB) 0.92x, B32 I512 H1024 (24 MB) 0.87x, though B64 I512 H1024 1.12x.
# Bigger weights pay off again from FUSED_MANY_ROWS rows per chunk, as more rows share each
# streamed panel. Module level, T50, fused against not, inference / fwd+bwd: B48 I512 H1024
# 1.09x / 0.99x, B64 I512 H1024 1.08x, B64 I384 H768 1.11x / 1.00x; with 16-row chunks,
# B32 I384 H768 0.79x, B32 I512 H1024 1.01x / 0.96x.
FUSED_MAX_BYTES = 8 << 20
FUSED_MANY_ROWS = 3 * WIDE_ROWS


def fuses_input_projection(
    batch: int,
    directions: int,
    threads: int,
    inputs: int,
    proj: int,
    gates: int,
    itemsize: int,
    wide_tiles: bool = WIDE_TILE_FITS,
) -> bool:
    """Whether a forward kernel (`lstm.lstm_forward`, `gru.gru_forward`, `rnn.rnn_forward`)
    should take the input projection into its per-step products for a layer of `directions`
    directions whose per-step product has `gates` columns (G * H): each row chunk
    `direction_tasks` makes (the whole batch when its threads share the products, from
    SHARED_MIN_WEIGHTS weights in W_hh: gates x proj) must have WIDE_ROWS rows, and the
    weights [W_ih | W_hh] of a direction (gates x (inputs + proj)) take at most
    FUSED_MAX_BYTES, unless the chunks have FUSED_MANY_ROWS rows. Called from Python: callers
    decide before the kernel call whether torch computes the projection. It restates
    `direction_tasks`' chunk count rather than calling it: under torch.jit.trace the sizes
    arrive as tensors, which Numba can't take.

    Only with the wide tiles (`wide_tiles`, AVX-512; the numbers above are from such a core): on
    a Zen 3 core (AVX2, 4-row tiles only), module level, same process, fused against torch's
    input GEMM, two runs each, forward / fwd+bwd: LSTM B16 I128 H256 0.82-0.83x / 1.00-1.05x,
    B64 I256 H512 1.00-1.01x / 1.00x, T50 B32 I512 H1024 0.91-0.94x / 0.87-0.94x; GRU 0.90x /
    0.95x, 1.00x / 1.05x, 0.99x / 0.98x; RNN 1.00x / 1.00x, 0.99x / 1.01x, 0.95x / 0.97x. There
    the GEMM (oneDNN's AVX2 kernel) stays."""
    if not wide_tiles:
        return False
    rows = batch // max(1, min(max(1, threads // directions), batch))
    if gates * proj >= SHARED_MIN_WEIGHTS and rows <= SHARED_MAX_ROWS:
        rows = batch  # one chunk of the whole batch, its products shared
    if inputs == 0 or rows < WIDE_ROWS:
        return False
    return rows >= FUSED_MANY_ROWS or gates * (inputs + proj) * itemsize <= FUSED_MAX_BYTES


@njit(**_JIT)
def chunk_bounds(n_chunks, batch_sizes):
    """(n_chunks + 1,) int64: the first row of each row chunk, then the batch size. The rows split
    into contiguous chunks of about equal work, (row, step) pairs, not rows: with packed input
    the rows are sorted longest first, so equal row counts left the thread with the short rows
    idle for the last steps (lengths 50-100: ~30 % of the sequence). A boundary near a multiple
    of TILE_ROWS moves onto it (the per-step product works in tiles of that many rows, so a
    boundary beside one would add a short tile to both chunks), and every chunk keeps at least
    one row. One pass over the rows and steps, once per kernel call."""
    batch = batch_sizes[0]
    steps = batch_sizes.shape[0]
    total = 0
    for t in range(steps):
        total += batch_sizes[t]
    # balanced[i]: the row boundary nearest to where the first i/n_chunks of the work ends
    balanced = np.full(n_chunks + 1, batch, dtype=np.int64)
    chunk = 1
    work = 0
    length = steps  # row lengths never increase: the steps that have the row
    for row in range(batch):
        while length > 0 and batch_sizes[length - 1] <= row:
            length -= 1
        while chunk < n_chunks and work + length >= total * chunk / n_chunks:
            target = total * chunk / n_chunks
            balanced[chunk] = row if target - work <= work + length - target else row + 1
            chunk += 1
        work += length
    bounds = np.empty(n_chunks + 1, dtype=np.int64)
    bounds[0] = 0
    bounds[n_chunks] = batch
    for i in range(1, n_chunks):
        start = balanced[i]
        aligned = (start + TILE_ROWS // 2) // TILE_ROWS * TILE_ROWS
        if aligned > 0 and aligned < batch:
            start = aligned
        # strictly after the previous boundary, leaving a row for each chunk after this one
        bounds[i] = min(max(bounds[i - 1] + 1, start), batch - (n_chunks - i))
    return bounds


@njit(**_JIT)
def task_chunk(task, n_chunks, per_direction):
    """(direction, first row chunk, role) of a task: chunk i of its direction for the i-th task
    (`chunk_bounds` gives the chunks' rows), or for a single-chunk direction that chunk, as its
    owner or a helper. Further chunks, if any, come from `next_chunk`."""
    d = task // per_direction
    i = task % per_direction
    if n_chunks == 1:
        return d, 0, ALONE if per_direction == 1 else (OWNER if i == 0 else HELPER)
    return d, i, ALONE


@njit(**_JIT)
def chunk_claims(directions):
    """Zeroed counters (D, SLOT) of the chunks claimed beyond each task's first (`next_chunk`)."""
    return np.zeros((directions, SLOT), dtype=np.int64)


@njit(**_JIT)
def next_chunk(claims, d, n_chunks, per_direction):
    """The next row chunk of direction d for a task that finished one, or n_chunks when none is
    left: with one chunk per task there is none; with more chunks than tasks, the unclaimed
    chunks go in order to whichever task asks first (longest rows first: packed rows are sorted
    by length)."""
    if n_chunks <= per_direction:
        return n_chunks
    return per_direction + fetch_add(claims, d, 0, 1)


@njit(**_JIT)
def active_rows(first, last, step_rows):
    """How many of the rows first..last-1 exist at a step that has `step_rows` rows."""
    return max(0, min(last, step_rows) - first)


@njit(**_JIT)
def step_span(k, batch_sizes, offsets, reverse, first, last):
    """For the k-th processed step: (time index, row offset of the step, end row of the chunk
    first..last-1 at that step); end == first when none of the chunk's rows exist there."""
    t = step_time(k, batch_sizes.shape[0], reverse)
    return t, offsets[t], first + active_rows(first, last, batch_sizes[t])


@njit(**_JIT)
def consumed_row(states, initial, offsets, prev, prev_rows, r):
    """Row r's state as consumed at a step: its row of the previous processed step in `states`
    (y, or LSTM's cell cache) if that step had it, else `initial`'s row (h0 or c0)."""
    return states[offsets[prev] + r] if r < prev_rows else initial[r]


@njit(**_JIT)
def copy_previous_hidden(y, h0, offsets, t, prev, prev_rows, first, count, out):
    """out[rows first..first+count-1 of step t] = the hidden state each row consumed there:
    that row of the previous processed step if it had one, else h0's row. Nothing when `out`
    has no rows (the caller derives those states from y itself: dense input)."""
    if out.shape[0] == 0:
        return
    off = offsets[t]
    for r in range(first, first + count):
        copy_row(out[off + r], consumed_row(y, h0, offsets, prev, prev_rows, r))
