"""Kernels (through their autograd Functions) against the plain-torch reference, one layer with
one or two directions, in the packed layout with awkward batch sizes, float32 and float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_bits_for_thread_counts
from numba import njit

from fastrnn import reference
from fastrnn.autograd import LayerFunction
from fastrnn.kernels.cpu.common import STEP_JIT_OPTIONS

BATCH_SIZES = {
    "dense": [3, 3, 3, 3, 3],
    "packed": [5, 4, 4, 2, 1, 1, 1],
    "single-step": [2],
    "one-row": [1, 1, 1],
}
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}
DIRECTIONS = pytest.mark.parametrize("directions", [1, 2], ids=["uni", "bi"])
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
LAYOUTS = pytest.mark.parametrize("layout", list(BATCH_SIZES))


def _leaf(g, shape, dtype, scale=0.4):
    return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()


def _compare(fast_out, ref_out, leaves, dtype):
    """Outputs and the gradients of every leaf, for one random cotangent on every output."""
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g, dtype=dtype) for o in ref_out]
    results = []
    for outs in (fast_out, ref_out):
        loss = sum((o * c).sum() for o, c in zip(outs, cotangents, strict=True))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append([*outs, *grads])
    for fast, ref in zip(*results, strict=True):
        if ref is None:
            assert fast is None or not fast.abs().max() > 0
            continue
        err = (fast - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err <= TOL[dtype], err


LAYER_CASES = [
    ("lstm", True, 0),
    ("lstm", False, 2),
    ("lstm", True, 2),
    ("gru", True, 0),
    ("gru", False, 0),
    ("rnn_tanh", True, 0),
    ("rnn_relu", True, 0),
    ("rnn_relu", False, 0),
]


LAYER_IDS = [f"{c}-{'bias' if b else 'nobias'}-proj{p}" for c, b, p in LAYER_CASES]


@DTYPES
@DIRECTIONS
@LAYOUTS
@pytest.mark.parametrize("cell, bias, proj", LAYER_CASES, ids=LAYER_IDS)
def test_layer_function_matches_reference(cell, bias, proj, layout, directions, dtype):
    """`LayerFunction` against `reference.layer`, called with the same arguments (the same
    signature): outputs, final states and, through autograd, every gradient."""
    from fastrnn.cells import SPECS

    spec = SPECS[cell]
    sizes = BATCH_SIZES[layout]
    hidden, inp, D = 5, 3, directions
    P = proj or hidden
    rows = spec.gates * hidden
    g = torch.Generator().manual_seed(0)
    x = _leaf(g, (sum(sizes), inp), dtype, 1.0)
    h0 = _leaf(g, (D, sizes[0], P), dtype, 0.5)
    c0 = _leaf(g, (D, sizes[0], hidden), dtype, 0.5) if spec.states == 2 else None
    W_ih, W_hh = _leaf(g, (D, rows, inp), dtype), _leaf(g, (D, rows, P), dtype)
    b_ih = _leaf(g, (D, rows), dtype) if bias else None
    b_hh = _leaf(g, (D, rows), dtype) if bias else None
    W_hr = _leaf(g, (D, P, hidden), dtype) if proj else None
    arguments = (cell, x, np.array(sizes, dtype=np.int64), h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr)
    fast = LayerFunction.apply(*arguments)
    leaves = [t for t in (x, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr) if t is not None]
    _compare(fast, reference.layer(*arguments), leaves, dtype)


@pytest.mark.parametrize("directions", [1, 2], ids=["uni", "bi"])
def test_work_split_across_threads_matches_one_thread(directions):
    """Directions and row chunks spread over threads give the results of a single thread."""
    import numba

    torch.manual_seed(0)
    sizes = [16, 16, 12, 9, 9, 3]
    D = directions
    x = torch.randn(sum(sizes), 6)
    h0, c0 = torch.randn(D, 16, 8), torch.randn(D, 16, 8)
    W = [torch.randn(D, 32, 6) * 0.3, torch.randn(D, 32, 8) * 0.3]
    W += [torch.randn(D, 32), torch.randn(D, 32)]
    bs = np.array(sizes, dtype=np.int64)
    before = numba.get_num_threads()
    try:
        outs = []
        for threads in (1, before):
            numba.set_num_threads(threads)
            outs.append(LayerFunction.apply("lstm", x, bs, h0, c0, *W, None))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_kernels_run_on_numbas_openmp_layer():
    """fastrnn asks Numba for its `omp` layer first (measured best next to torch's pool)."""
    import os

    import numba

    if "NUMBA_THREADING_LAYER" in os.environ:
        pytest.skip("threading layer chosen by the environment")
    assert numba.config.THREADING_LAYER_PRIORITY[0] == "omp"
    h0 = torch.zeros(1, 8, 4)
    W = [torch.randn(1, 4, 3), torch.randn(1, 4, 4), None, None]
    sizes = np.full(2, 8, dtype=np.int64)
    LayerFunction.apply("rnn_tanh", torch.randn(16, 3), sizes, h0, None, *W, None)
    assert numba.threading_layer() == "omp"


def test_wide_tile_only_where_avx512_holds_it():
    """The 8-row tile keeps 8 x 16 float32 accumulators: 8 AVX-512 registers, or all 16 AVX2 ones
    (spilled on every k, half the speed of 4-row tiles on a Zen 3 core). The choice follows the
    CPU Numba compiles for, checked here against the CPU's own flags."""
    import os

    from fastrnn.kernels.cpu.common import WIDE_TILE_FITS, wide_tile_fits

    assert WIDE_TILE_FITS == wide_tile_fits()
    if os.environ.get("NUMBA_CPU_FEATURES") or os.environ.get("NUMBA_CPU_NAME"):
        pytest.skip("Numba compiles for a CPU set by the environment, not this one")
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            flags = next(line for line in cpuinfo if line.startswith("flags")).split()
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags to compare with")
    assert WIDE_TILE_FITS == ("avx512f" in flags)


@pytest.mark.parametrize("np_dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("transposed", [False, True], ids=["W", "W^T"])
def test_panel_matmul_matches_numpy(np_dtype, transposed):
    """The per-step product against numpy: every row count the tiles treat differently (8-row
    tiles, full and short 4-row tiles, a lone row, and their mixes), column counts that end
    mid-panel and mid panel-group, K = 0. Each row's result is bitwise the one it gets alone
    (the thread-count equality of the layer kernels rests on that: a chunk boundary moves a row
    into another kind of tile)."""
    from fastrnn.kernels.cpu.panel_matmul import PANEL, matmul_panels, packed_panels

    rng = np.random.default_rng(0)
    tol = 1e-5 if np_dtype == np.float32 else 1e-12
    for rows in (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12, 13, 16, 17, 21):
        for depth, columns in ((0, 5), (3, 1), (7, 16), (20, 33), (33, 150)):
            W = rng.standard_normal((2, columns, depth)).astype(np_dtype)
            source = np.ascontiguousarray(W.transpose(0, 2, 1)) if transposed else W
            panels = packed_panels(source, transposed, 2)
            a = rng.standard_normal((rows, depth)).astype(np_dtype)
            out = np.full((rows, columns), np.nan, dtype=np_dtype)
            matmul_panels(a, panels[1], out, 0, panels.shape[1])
            np.testing.assert_allclose(out, a @ W[1].T, rtol=0, atol=tol * max(1, depth))
            for r in range(rows):
                alone = np.empty((1, columns), dtype=np_dtype)
                matmul_panels(a[r : r + 1], panels[1], alone, 0, panels.shape[1])
                np.testing.assert_array_equal(out[r], alone[0])
            # A panel range writes its columns and nothing else (the shared product's groups).
            first, end = 1, panels.shape[1] - 1
            if first < end:
                out[:] = np.nan
                matmul_panels(a, panels[1], out, first, end)
                inside = slice(first * PANEL, min(columns, end * PANEL))
                np.testing.assert_allclose(
                    out[:, inside], (a @ W[1].T)[:, inside], rtol=0, atol=tol * max(1, depth)
                )
                out[:, inside] = np.nan
                assert np.isnan(out).all()


@pytest.mark.parametrize("cell", ["LSTM", "LSTM-proj", "GRU", "RNN", "RNN-units"])
@pytest.mark.parametrize("batch", [1, 3, 9, 33])
@DIRECTIONS
def test_thread_counts_give_bitwise_equal_results(
    cell, batch, directions, monkeypatch, wide_tile_fusing
):
    """Splitting the work differently (row chunks, at batch 1 an owner and helpers sharing
    each step's product column-wise, `shared_product`, or for the RNN with hidden 192 threads
    splitting the units; at packed batch 33 more chunks than threads, claimed at run time;
    rows falling in 8-row, 4-row or one-row tiles) must not change a single bit: every output
    element is summed in the same order whichever thread computes it. threads=4 on Numba's
    2-thread pool also runs an owner and its helper one after the other on one thread, which
    must neither deadlock nor lose work. Batch 9 with the wide tiles' rule (`wide_tile_fusing`,
    as on an AVX-512 CPU): one 9-row chunk could fuse the input projection into the per-step
    product where two chunks of 4-5 rows could not, and the two sums differ in the last bits;
    the decision must not follow the thread count."""
    import fastrnn
    from fastrnn.kernels.cpu.common import HELPER_MIN_WEIGHTS

    assert 190 * 190 >= HELPER_MIN_WEIGHTS

    torch.manual_seed(0)
    kind, _, variant = cell.partition("-")
    kwargs = {"proj_size": 64} if variant == "proj" else {}
    # hidden 190: every W_hh has enough weights for batch-1 helpers (HELPER_MIN_WEIGHTS), and
    # the RNN's units don't split (not whole panels); hidden 192: they do
    hidden = 192 if variant == "units" else 190
    model = getattr(fastrnn, kind)(5, hidden, num_layers=2, bidirectional=directions == 2, **kwargs)
    lengths = torch.tensor([6, 4, 5] + [1 + (5 * i) % 6 for i in range(batch - 3)])[:batch]
    x = torch.randn(6, batch, 5)
    assert_same_bits_for_thread_counts(model, x, lengths, monkeypatch)


def test_unit_split_starts_when_its_helpers_arrive():
    """`shared_product`'s unit split: task 0 runs alone until every helper has arrived, then
    opens the split at a step boundary, which the helpers start at; a helper whose task 0
    never starts closes the split and has nothing to do, after which task 0 stays alone."""
    from fastrnn.kernels.cpu.common import splits_units
    from fastrnn.kernels.cpu.shared_product import (
        NO_STEPS,
        close_split,
        first_step,
        opens_split,
        unit_span,
    )

    sync = np.zeros((3, 8), dtype=np.int64)
    assert first_step(sync, 0, 2, 0) == 0
    assert not opens_split(sync, 2, 0)  # no helper yet
    sync[0, 1] = 1  # the helper's arrival
    assert opens_split(sync, 2, 5)
    assert first_step(sync, 1, 2, 0) == 5  # (arrives once more: the split is open already)
    idle = np.zeros((3, 8), dtype=np.int64)
    assert first_step(idle, 1, 2, 0) == NO_STEPS  # task 0 never started: closes, ~2 ms
    assert not opens_split(idle, 2, 0)
    done = np.zeros((3, 8), dtype=np.int64)
    close_split(done)
    assert first_step(done, 1, 2, 0) == NO_STEPS
    # units in whole panels: 2 tasks of 192 units, 4 of 100 (the last panel partial)
    assert splits_units(192) and not splits_units(190)
    assert [unit_span(i, 2, 192)[2:] for i in range(2)] == [(0, 96), (96, 192)]
    assert [unit_span(i, 4, 100)[2:] for i in range(4)] == [(0, 16), (16, 48), (48, 80), (80, 100)]


def test_a_helper_with_no_owner_gives_up():
    """A helper whose owner never publishes a product returns False instead of spinning forever
    (`shared_product`: the owner can always finish alone)."""
    from fastrnn.kernels.cpu.common import HELPER
    from fastrnn.kernels.cpu.panel_matmul import packed_panels
    from fastrnn.kernels.cpu.shared_product import shared_matmul, sync_counters

    panels = packed_panels(np.ones((1, 8, 4), dtype=np.float32), False, 1)[0]
    out = np.zeros((1, 8), dtype=np.float32)
    sync = sync_counters(1, 1, True)[0]
    rows = np.ones((1, 4), dtype=np.float32)
    assert not shared_matmul(rows, panels, out, sync, 0, HELPER, 2)
    assert not out.any()


def test_row_chunks_cover_the_batch_and_balance_packed_work():
    """`task_chunk` / `next_chunk`: every direction's chunks are contiguous, non-empty and cover
    the batch, each claimed once; with packed lengths the chunk with the long rows gets fewer of
    them, and with enough rows there are two chunks per task; at batch 1 the spare threads
    become helpers of one owner."""
    from fastrnn.kernels.cpu.common import (
        ALONE,
        HELPER,
        HELPER_MIN_WEIGHTS,
        OWNER,
        SHARED_MAX_ROWS,
        SHARED_MIN_WEIGHTS,
        SPLIT_MIN_ROWS,
        chunk_bounds,
        chunk_claims,
        direction_tasks,
        next_chunk,
        task_chunk,
    )

    rng = np.random.default_rng(0)
    for batch in (1, 2, 3, 5, 16, 37):
        lengths = np.sort(rng.integers(1, 30, batch))[::-1]
        batch_sizes = np.array([(lengths > t).sum() for t in range(lengths[0])], dtype=np.int64)
        uneven = bool(batch_sizes[-1] < batch)
        for directions in (1, 2):
            for threads in (1, 2, 3, 4, 8):
                n_tasks, n_chunks, per_direction = direction_tasks(
                    directions, batch, threads, 1 << 20, uneven, HELPER_MIN_WEIGHTS, True
                )
                assert n_tasks == directions * per_direction
                if uneven and per_direction > 1 and batch >= 2 * per_direction * SPLIT_MIN_ROWS:
                    assert n_chunks == 2 * per_direction
                bounds = chunk_bounds(n_chunks, batch_sizes)
                claims = chunk_claims(directions)
                for d in range(directions):
                    tasks = [
                        task_chunk(d * per_direction + i, n_chunks, per_direction)
                        for i in range(per_direction)
                    ]
                    assert all(task[0] == d for task in tasks)
                    roles = [task[2] for task in tasks]
                    if n_chunks == 1 and per_direction > 1:
                        assert roles == [OWNER] + [HELPER] * (per_direction - 1)
                        assert all(task[1] == 0 for task in tasks)
                        assert next_chunk(claims, d, n_chunks, per_direction) == n_chunks
                        continue
                    assert roles == [ALONE] * per_direction
                    chunks = [task[1] for task in tasks]
                    while (chunk := next_chunk(claims, d, n_chunks, per_direction)) < n_chunks:
                        chunks.append(chunk)
                    assert sorted(chunks) == list(range(n_chunks))
                    rows = [(bounds[c], bounds[c + 1]) for c in range(n_chunks)]
                    assert rows[0][0] == 0 and rows[-1][1] == batch
                    assert all(first < last for first, last in rows)
                    assert all(a[1] == b[0] for a, b in zip(rows[:-1], rows[1:], strict=True))
    # From SHARED_MIN_WEIGHTS weights, one shared chunk while the chunks would have at most
    # SHARED_MAX_ROWS rows.
    big, least = SHARED_MIN_WEIGHTS, HELPER_MIN_WEIGHTS
    assert direction_tasks(1, 2 * SHARED_MAX_ROWS, 2, big, False, least, True) == (2, 1, 2)
    assert direction_tasks(1, 2 * SHARED_MAX_ROWS + 2, 2, big, False, least, True) == (2, 2, 2)
    assert direction_tasks(1, 2 * SHARED_MAX_ROWS, 2, big - 1, False, least, True) == (2, 2, 2)
    assert direction_tasks(2, 40, 4, big, True, least, True) == (4, 1, 2)
    assert direction_tasks(1, 40, 1, big, False, least, True) == (1, 1, 1)
    # Batch 1: helpers from `min_weights` weights; none when the units can't split (RNN).
    assert direction_tasks(1, 1, 2, least, False, least, True) == (2, 1, 2)
    assert direction_tasks(1, 1, 2, least - 1, False, least, True) == (1, 1, 1)
    assert direction_tasks(1, 1, 2, least, False, least, False) == (1, 1, 1)
    assert direction_tasks(1, 2 * SHARED_MAX_ROWS, 2, big, False, least, False) == (2, 2, 2)
    # 8 long rows and 24 short ones: equal work puts the boundary well before the middle.
    lengths = np.array([100] * 8 + [10] * 24)
    batch_sizes = np.array([(lengths > t).sum() for t in range(100)], dtype=np.int64)
    bounds = chunk_bounds(2, batch_sizes)
    assert (bounds[0], bounds[1]) == (0, 4)


def test_float64_products_use_vector_tiles():
    """float64 products on AVX2 go through the directly written vector tiles (`_narrow_matmul`):
    the float32 forms spilled their 16 accumulators there, or ran scalar. The compiled code
    must hold packed double FMAs on ymm registers. (A fresh compile: the on-disk cache keeps no
    assembly.)"""
    import platform
    import re

    import numba

    from fastrnn.kernels.cpu import panel_matmul
    from fastrnn.kernels.cpu.common import WIDE_TILE_FITS

    if platform.machine() not in ("x86_64", "AMD64") or WIDE_TILE_FITS:
        pytest.skip("the narrow float64 tiles are for x86-64 without AVX-512")
    fresh = numba.njit(error_model="numpy", fastmath={"contract"})(
        panel_matmul._narrow_matmul.py_func
    )
    W = np.ones((1, 40, 24))
    panels = panel_matmul.packed_panels(W, False, 1)[0]
    for rows in (1, 5):
        a = np.arange(rows * 24, dtype=np.float64).reshape(rows, 24)
        out = np.empty((rows, 40))
        fresh(a, panels, out, 0, panels.shape[0])
        np.testing.assert_allclose(out, a @ W[0].T, rtol=1e-14)
    asm = "\n".join(fresh.inspect_asm().values())
    assert len(re.findall(r"vfmadd\w*pd\s+.*ymm", asm)) >= 8


def test_float32_wide_tiles_pair_panels():
    """float32 products on AVX-512 run 8-row tiles over two panels at once: the compiled code
    must hold a loop of 16 zmm FMAs (16 accumulators), and every row and column, whichever tile
    it fell in (pairs, a lone last panel, 4-row and one-row tiles), must get the same k-ordered
    sum as a plain loop."""
    import platform
    import re

    import numba

    from fastrnn.kernels.cpu import panel_matmul
    from fastrnn.kernels.cpu.common import WIDE_TILE_FITS

    if platform.machine() not in ("x86_64", "AMD64") or not WIDE_TILE_FITS:
        pytest.skip("the paired wide tiles are for AVX-512")
    fresh = numba.njit(error_model="numpy", fastmath={"contract"})(
        panel_matmul.matmul_panels.py_func
    )
    rng = np.random.default_rng(0)
    for rows, columns, depth in ((16, 64, 24), (9, 40, 7), (21, 72, 33), (8, 16, 5)):
        W = rng.standard_normal((1, columns, depth)).astype(np.float32)
        a = rng.standard_normal((rows, depth)).astype(np.float32)
        panels = panel_matmul.packed_panels(W, False, 1)[0]
        out = np.empty((rows, columns), np.float32)
        fresh(a, panels, out, 0, panels.shape[0])
        expected = np.zeros((rows, columns), np.float64)
        for k in range(depth):  # k in order, as the tiles sum
            expected += a[:, k, None].astype(np.float64) * W[0][:, k].astype(np.float64)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
        # A column's result doesn't depend on the tile it fell in: the same row alone.
        single = np.empty((1, columns), np.float32)
        fresh(a[-1:], panels, single, 0, panels.shape[0])
        assert np.array_equal(single[0], out[-1])
    asm = "\n".join(fresh.inspect_asm().values())
    loops = re.split(r"\n\.LBB\d+_\d+:", asm)
    # Accumulators: the distinct zmm registers a loop's FMAs write (their last operand).
    written = [set(re.findall(r"vfmadd\w*ps\s+[^\n]*(%zmm\d+)\n", body)) for body in loops]
    assert max(len(registers) for registers in written) >= 16


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sequence_wide_products_match_and_ignore_thread_count(dtype):
    """`panel_matmul.matmul` (the backward's weight gradients and dx where it runs): a (M, K1 +
    K2) @ [b; more] equals float64's product within float rounding, for a contiguous a and a
    transposed view, with and without `more`, at sizes that leave short chunks, tiles, panels
    and K blocks; and 1, 2 and 3 threads give the same bits (every output summed in one
    order)."""
    from fastrnn.kernels.cpu.panel_matmul import matmul

    rng = np.random.default_rng(1)
    sizes = ((130, 37, 0, 40), (9, 5, 3, 17), (200, 64, 64, 48), (70, 300, 230, 33))
    for rows, first, second, columns in sizes:  # the last: K blocks, one split by b / more
        for transposed in (False, True):
            shape = (first + second, rows) if transposed else (rows, first + second)
            a = rng.standard_normal(shape).astype(dtype)
            a = a.T if transposed else a
            b = rng.standard_normal((first, columns)).astype(dtype)
            more = rng.standard_normal((second, columns)).astype(dtype)
            expected = a.astype(np.float64) @ np.concatenate([b, more]).astype(np.float64)
            results = []
            for threads in (1, 2, 3):
                out = np.full((rows, columns), np.nan, dtype)
                matmul(a, b, more, out, threads)
                results.append(out)
            tolerance = 1e-4 if dtype == np.float32 else 1e-12
            np.testing.assert_allclose(results[0], expected, rtol=tolerance, atol=tolerance)
            assert all(np.array_equal(results[0], other) for other in results[1:])


def test_kernel_cache_tag_follows_every_kernel_source(tmp_path):
    """The layer kernels' cache names carry a hash of every CPU kernel source, so that an edit
    to a callee (the panel product, the gate math) compiles them afresh: Numba's cache checks
    only the file that holds a function, and a kernel compiles its callees into itself."""
    import shutil
    from pathlib import Path

    from fastrnn.kernels.cpu.recurrence import _source_tag

    root = Path(__file__).resolve().parents[1] / "kernels"
    copy = tmp_path / "kernels"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("__pycache__"))
    tags = {_source_tag(copy / "cpu")}
    for edited in ("cpu/panel_matmul.py", "math.py", "cpu/common.py"):
        with open(copy / edited, "a") as source:
            source.write("# edited\n")
        tags.add(_source_tag(copy / "cpu"))
    assert len(tags) == 4 and "" not in tags


@njit(**STEP_JIT_OPTIONS)
def _linear_forward_rows(a, off, first, end, unit, end_unit, fused, variant):
    """A cell made only of rows (see test_a_new_cell_is_its_rows): h' = pre + W_hh h, into y
    (in place of pre) and h_n."""
    for r in range(first, end):
        for j in range(a.h_n.shape[1]):
            a.y[off + r, j] += a.recurrent[r, j]
            a.h_n[r, j] = a.y[off + r, j]


@njit(**STEP_JIT_OPTIONS)
def _linear_backward_rows(
    a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant
):
    for r in range(first, end):
        for j in range(dh.shape[1]):
            a.d_input[off + r, j] = dh[r, j]


@pytest.mark.parametrize("directions", [1, 2], ids=["uni", "bi"])
def test_a_new_cell_is_its_rows(directions, monkeypatch):
    """`recurrence.instantiate` turns a module of traits and two row functions into working
    kernels, forward and backward, with every direction, packed rows and several threads:
    a linear recurrence h' = pre + W_hh h against a plain numpy loop."""
    import sys
    import types

    from fastrnn.kernels.cpu.recurrence import instantiate

    cell = types.ModuleType("kernels.cpu.linear")
    # importable by name, as a cell's module is: Numba's cache rebuilds its environment from it
    monkeypatch.setitem(sys.modules, cell.__name__, cell)
    cell.GATES, cell.JOINT_INPUT = 1, True
    cell.SPLITS_UNITS = cell.SEPARATE_RECURRENT_GRADIENT = False
    cell.forward_rows, cell.backward_rows = _linear_forward_rows, _linear_backward_rows
    kernels = instantiate(cell)
    assert sorted(kernels) == [
        "linear_backward",
        "linear_backward_serial",
        "linear_forward",
        "linear_forward_serial",
    ]
    rng = np.random.default_rng(0)
    D, H, sizes = directions, 5, np.array([4, 4, 3, 1], dtype=np.int64)
    B, N = sizes[0], sizes.sum()
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    W_hh = 0.3 * rng.standard_normal((D, H, H))
    h0, pre = rng.standard_normal((D, B, H)), rng.standard_normal((D, N, H))
    dy, dh_n = rng.standard_normal((D, N, H)), rng.standard_normal((D, B, H))
    nothing, no_proj = np.empty((D, 0, 0)), np.empty((D, 0, H))
    y, h_n = pre.copy(), np.empty((D, B, H))
    kernels["linear_forward"](
        sizes, False, np.empty((0, 0)), nothing, np.empty((D, 0)), W_hh, np.empty((D, 0)),
        no_proj, h0, nothing, y, y, h_n, nothing, nothing, nothing, 2,
    )  # fmt: skip
    d_pre, h_prev, dh0 = np.empty((D, N, H)), np.empty((D, N, H)), np.empty((D, B, H))
    kernels["linear_backward"](
        sizes, False, W_hh, no_proj, h0, nothing, y, nothing, nothing, dy, dh_n, nothing, d_pre,
        no_proj, h_prev, no_proj, no_proj, dh0, nothing, 2,
    )  # fmt: skip
    for d in range(D):
        order = range(len(sizes))[::-1] if d == 1 else range(len(sizes))
        h = h0[d].copy()
        ref_y, ref_prev = np.empty((N, H)), np.empty((N, H))
        for t in order:
            rows = slice(offsets[t], offsets[t + 1])
            ref_prev[rows] = h[: sizes[t]]
            h[: sizes[t]] = pre[d, rows] + h[: sizes[t]] @ W_hh[d].T
            ref_y[rows] = h[: sizes[t]]
        np.testing.assert_allclose(y[d], ref_y, rtol=1e-12)
        np.testing.assert_allclose(h_n[d], h, rtol=1e-12)
        np.testing.assert_allclose(h_prev[d], ref_prev, rtol=1e-12)
        dh = dh_n[d].copy()
        ref_d = np.empty((N, H))
        for t in order[::-1]:
            rows = slice(offsets[t], offsets[t + 1])
            dh[: sizes[t]] += dy[d, rows]
            ref_d[rows] = dh[: sizes[t]]
            dh[: sizes[t]] = ref_d[rows] @ W_hh[d]
        np.testing.assert_allclose(d_pre[d], ref_d, rtol=1e-12)
        np.testing.assert_allclose(dh0[d], dh, rtol=1e-12)
