"""The per-step recurrent product of every CPU kernel: out (M, N) = rows (M, K) @ W^T.

A recurrence multiplies a few rows (one chunk of the batch) by the same weight matrix at every
step, so the weights are re-laid once per call into panels of PANEL output columns, k-major:
panels[p, k, j] = W[p * PANEL + j, k] (zero past N). A register tile then keeps
TILE_ROWS x PANEL accumulators (8 AVX2 registers for float32) in registers over the whole K
loop, loading one panel row and broadcasting one input value per row per k.

Why not BLAS: OpenBLAS's sgemm, called from njit per step, ran these shapes at 40-55 % of a
core (16 x 256 @ 256 x 1024 single-threaded: 8 rows 83 us). This tile ran it at ~110 GFLOP/s
a core on the same machine (8 rows 38 us), and its one-row form beat OpenBLAS's sgemv.

The accumulators live in a stack buffer (`_stack_buffer`), not a Numba array: LLVM can only
keep memory in registers across a loop when it knows nothing else in the loop writes it, which
it can prove for an alloca but not for a heap array next to the input arrays.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from numba.np.numpy_support import carray

from .common import (
    JIT_OPTIONS,
    PARALLEL_JIT_OPTIONS,
    TILE_ROWS,
    UNIT_PANEL,
    WIDE_ROWS,
    WIDE_TILE_FITS,
    add_row,
)

# Output columns per panel: two AVX2 registers of float32.
PANEL = UNIT_PANEL
# Rows per register tile (`common.TILE_ROWS` = 4): TILE_ROWS * PANEL floats of accumulators,
# 8 AVX2 or 4 AVX-512 registers; a wide tile (`common.WIDE_ROWS` = 8) keeps twice that.
# The one-row form walks this many panels at once, for enough independent accumulators.
ROW_PANELS = 4
# The float64 products on a CPU without the wide tiles (AVX2) take tiles of NARROW_ROWS rows x
# one panel, and single rows NARROW_PANELS panels at a time (`_narrow_matmul`): a float64 panel
# row is four ymm registers there, so the float32 forms' 4 x 16 accumulators filled all 16
# registers and LLVM spilled them every k (12 x 256 @ 256 x 1024: 25 GFLOP/s on a Zen 3 core),
# while its vectorisers left 2- and 3-row forms written like the others scalar (4-5 GFLOP/s).
# These tiles are vector code written directly (`_vector_tile`). Three rows: 12 accumulators
# plus the panel row's 4 registers, which it reuses, spilled again (16 GFLOP/s); a single row's
# panels are read once, straight into the FMAs, so three panels fit.
NARROW_ROWS = 2
NARROW_PANELS = 3
# Weights smaller than this (elements) are packed by the calling thread: waking the pool for a
# second parallel region cost more than the copy (LSTM H = 128: ~15 us a call, most of a T = 1
# kernel call).
PARALLEL_PACK_SIZE = 1 << 18
# Rows of a transposed weight packed per task.
PACK_ROWS = 64
# Rows of W copied side by side into a panel (see `_pack_block`).
PACK_GROUP = 8
_TILE = TILE_ROWS * PANEL
_WIDE_TILE = WIDE_ROWS * PANEL
_PAIR_TILE = 2 * _WIDE_TILE
_ROW_TILE = ROW_PANELS * PANEL
_NARROW_TILE = max(NARROW_ROWS, NARROW_PANELS) * PANEL
# Only FMA contraction: the full fastmath set (no-NaN, no-inf assumptions) was no faster here
# (same speed and bits in a same-process A/B) and would let LLVM drop NaN handling.
_JIT = {**JIT_OPTIONS, "fastmath": {"contract"}}


@intrinsic
def _stack_buffer(typingctx, size, like):
    """A `size`-element stack buffer (size a compile-time constant) of `like`'s dtype."""
    if not isinstance(size, types.IntegerLiteral) or not isinstance(like, types.Array):
        return None
    count = size.literal_value
    dtype = like.dtype

    def codegen(context, builder, signature, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype), size=count)

    return types.CPointer(dtype)(size, like), codegen


def _no_unrolling(module):
    """Loop metadata that keeps LLVM from unrolling a tile's k loop: unrolled twice, an 8-row
    two-panel tile needs 16 accumulators, 16 broadcasts and 4 panel rows, more than the 32 zmm
    registers, and LLVM spilled them on every k (it did so once the tile sat inlined in a
    kernel; compiled alone it wasn't unrolled)."""
    disable = module.add_metadata([ir.MetaDataString(module, "llvm.loop.unroll.disable")])
    # A loop ID is a node of its own that refers to itself (the string only keeps the cache of
    # add_metadata from handing two loops the same node).
    loop = module.add_metadata([disable, ir.MetaDataString(module, str(len(module.metadata)))])
    loop.operands = (loop, disable)
    return loop


def _emit_vector_tile(context, builder, dtype, row_pointers, panel_pointers, depth, out):
    """IR of sum over k < depth of row[k] * panel[k, :] for every row pointer (elements at a
    byte stride each, as (pointer, stride)) and panel pointer (PANEL contiguous elements a k),
    in vector accumulators (one FMA each per vector and k, k in order), stored to out (a
    CPointer): row r, panel p at ((r * P + p) * PANEL)."""
    element = context.get_value_type(dtype)
    lanes = (64 if WIDE_TILE_FITS else 32) // (dtype.bitwidth // 8)  # one vector register
    vector = ir.VectorType(element, lanes)
    per_panel = PANEL // lanes
    i64 = ir.IntType(64)
    suffix = f"v{lanes}f{dtype.bitwidth}"
    fma = cgutils.get_or_insert_function(
        builder.module, ir.FunctionType(vector, [vector] * 3), f"llvm.fma.{suffix}"
    )
    zero = ir.Constant(vector, [0.0] * lanes)
    splat = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
    count = len(row_pointers) * len(panel_pointers) * per_panel
    entry = builder.block
    loop = builder.append_basic_block("vector_tile.loop")
    done = builder.append_basic_block("vector_tile.done")
    builder.cbranch(builder.icmp_signed(">", depth, ir.Constant(i64, 0)), loop, done)
    builder.position_at_end(loop)
    k = builder.phi(i64)
    k.add_incoming(ir.Constant(i64, 0), entry)
    accumulators = [builder.phi(vector) for _ in range(count)]
    for acc in accumulators:
        acc.add_incoming(zero, entry)
    broadcasts = []
    for pointer, stride in row_pointers:
        address = builder.gep(pointer, [builder.mul(k, stride)])
        value = builder.load(builder.bitcast(address, element.as_pointer()))
        lane = builder.insert_element(ir.Constant(vector, None), value, ir.Constant(i64, 0))
        broadcasts.append(builder.shuffle_vector(lane, ir.Constant(vector, None), splat))
    weights = []
    for pointer in panel_pointers:
        base = builder.gep(pointer, [builder.mul(k, ir.Constant(i64, PANEL))])
        for q in range(per_panel):
            address = builder.gep(base, [ir.Constant(i64, q * lanes)])
            load = builder.load(builder.bitcast(address, vector.as_pointer()))
            load.align = dtype.bitwidth // 8
            weights.append(load)
    updated = []
    for r, broadcast in enumerate(broadcasts):
        for w, weight in enumerate(weights):
            acc = accumulators[r * len(weights) + w]
            updated.append(builder.call(fma, [broadcast, weight, acc]))
    k_next = builder.add(k, ir.Constant(i64, 1))
    end = builder.block
    k.add_incoming(k_next, end)
    for acc, new in zip(accumulators, updated, strict=True):
        acc.add_incoming(new, end)
    back = builder.cbranch(builder.icmp_signed("<", k_next, depth), loop, done)
    back.set_metadata("llvm.loop", _no_unrolling(builder.module))
    builder.position_at_end(done)
    results = []
    for new in updated:  # every phi first: they must lead the block
        result = builder.phi(vector)
        result.add_incoming(zero, entry)
        result.add_incoming(new, end)
        results.append(result)
    for i, result in enumerate(results):
        address = builder.gep(out, [ir.Constant(i64, i * lanes)])
        store = builder.store(result, builder.bitcast(address, vector.as_pointer()))
        store.align = dtype.bitwidth // 8


def _array_parts(context, builder, array_type, value):
    array = context.make_array(array_type)(context, builder, value)
    shape = cgutils.unpack_tuple(builder, array.shape, array_type.ndim)
    strides = cgutils.unpack_tuple(builder, array.strides, array_type.ndim)
    return array.data, shape, strides


def _is_float_array(t, ndim):
    return (
        isinstance(t, types.Array) and t.ndim == ndim and t.dtype in (types.float32, types.float64)
    )


@intrinsic
def _vector_tile(typingctx, rows, row_indices, panels, panel_indices, out):
    """out[(r * P + p) * PANEL + j] = sum over k of rows[row_indices[r], k] * panels[
    panel_indices[p], k, j] (tuples of R and P indices, R * P * PANEL accumulators in vector
    registers; each sum an FMA chain in k order, as every form of `matmul_panels`).
    rows (M, K) any layout; panels (n, K, PANEL) C-contiguous; out a CPointer of their dtype."""
    if not (
        _is_float_array(rows, 2)
        and _is_float_array(panels, 3)
        and panels.layout == "C"
        and panels.dtype == rows.dtype
        and isinstance(row_indices, types.UniTuple)
        and isinstance(panel_indices, types.UniTuple)
        and isinstance(out, types.CPointer)
        and out.dtype == rows.dtype
    ):
        return None
    dtype = rows.dtype

    def codegen(context, builder, signature, args):
        rows_value, row_tuple, panels_value, panel_tuple, out_pointer = args
        i64 = ir.IntType(64)
        byte = ir.IntType(8).as_pointer()
        row_data, row_shape, row_strides = _array_parts(
            context, builder, signature.args[0], rows_value
        )
        panel_data, panel_shape, _ = _array_parts(context, builder, signature.args[2], panels_value)
        depth = row_shape[1]
        row_bytes = builder.bitcast(row_data, byte)
        row_pointers = []
        for index in cgutils.unpack_tuple(builder, row_tuple, signature.args[1].count):
            index = context.cast(builder, index, signature.args[1].dtype, types.int64)
            start = builder.gep(row_bytes, [builder.mul(index, row_strides[0])])
            row_pointers.append((start, row_strides[1]))
        panel_size = builder.mul(panel_shape[1], ir.Constant(i64, PANEL))
        panel_pointers = []
        for index in cgutils.unpack_tuple(builder, panel_tuple, signature.args[3].count):
            index = context.cast(builder, index, signature.args[3].dtype, types.int64)
            panel_pointers.append(builder.gep(panel_data, [builder.mul(index, panel_size)]))
        _emit_vector_tile(context, builder, dtype, row_pointers, panel_pointers, depth, out_pointer)
        return context.get_dummy_value()

    return types.none(rows, row_indices, panels, panel_indices, out), codegen


def _narrow(rows):
    """Whether products of `rows`' dtype take `_narrow_matmul` (float64 without the wide
    tiles). A constant of each compiled form (see the overload)."""
    return False


@overload(_narrow)
def _overload_narrow(rows):
    narrow = rows.dtype.bitwidth == 64 and not WIDE_TILE_FITS
    return lambda rows: narrow


def _pairs(rows):
    """Whether products of `rows`' dtype run their wide tiles over two panels at once (float32
    with the wide tiles). A constant of each compiled form (see the overload)."""
    return False


@overload(_pairs)
def _overload_pairs(rows):
    pairs = rows.dtype.bitwidth == 32 and WIDE_TILE_FITS
    return lambda rows: pairs


@njit(**JIT_OPTIONS)
def panel_count(columns):
    """How many panels hold `columns` output columns."""
    return (columns + PANEL - 1) // PANEL


@njit(**JIT_OPTIONS)
def _pack_blocks(W, transposed):
    """How many independent pieces `_pack_block` splits the packing of a direction of W into."""
    if transposed:
        return (W.shape[1] + PACK_ROWS - 1) // PACK_ROWS
    return panel_count(W.shape[1])


@njit(**JIT_OPTIONS)
def _pack_block(W, transposed, panels, d, block, depth_offset):
    """Piece `block` of direction d's panels (see `pack_panels`), reading W along its rows,
    into panel rows depth_offset... W (D, N, K): panel `block`, each panel column from a row
    of W. Transposed, W (D, K, N): rows block * PACK_ROWS... of every panel, each from a row of
    W. (Transposed, one panel at a time read W down its columns, 64 bytes from every 4 KiB row:
    the pack of a 4096 x 1024 LSTM weight took 12-15 ms, against 2.5 ms untransposed.)"""
    if transposed:
        columns = W.shape[2]
        for k in range(block * PACK_ROWS, min(W.shape[1], (block + 1) * PACK_ROWS)):
            for p in range(panels.shape[1]):
                first = p * PANEL
                width = min(PANEL, columns - first)
                for j in range(width):
                    panels[d, p, depth_offset + k, j] = W[d, k, first + j]
                for j in range(width, PANEL):
                    panels[d, p, depth_offset + k, j] = 0
    else:
        depth = W.shape[2]
        panel = panels[d, block]
        first = block * PANEL
        width = min(PANEL, W.shape[1] - first)
        if width == PANEL:
            # Down the depth for PACK_GROUP rows of W at a time, writing whole panel rows:
            # 2.4-2.7x faster than one W row at a time (LSTM H128: 512 x 128 in 18 against
            # 49 us, a sixth of a T100 batch-1 forward). All 16 rows at once thrashed L1 when
            # W's rows were 4 KiB apart (4096 x 1024: 3.9 against 2.2 ms).
            for j0 in range(0, PANEL, PACK_GROUP):
                for k in range(depth):
                    for j in range(j0, j0 + PACK_GROUP):
                        panel[depth_offset + k, j] = W[d, first + j, k]
        else:
            for j in range(width):
                for k in range(depth):
                    panel[depth_offset + k, j] = W[d, first + j, k]
            for j in range(width, PANEL):
                for k in range(depth):
                    panel[depth_offset + k, j] = 0


@njit(**PARALLEL_JIT_OPTIONS)
def pack_panels(W, transposed, panels, depth_offset):
    """Lay out the weights of every direction as panels (D, panel_count(N), K, PANEL), all
    threads sharing the panels: W's K rows of depth go to panel rows depth_offset...

    W is (D, N, K) for out = rows @ W^T, or (D, K, N) with transposed=True for out = rows @ W
    (the backward products, which then need no transposed copy of the weights)."""
    blocks = _pack_blocks(W, transposed)
    for task in prange(panels.shape[0] * blocks):
        _pack_block(W, transposed, panels, task // blocks, task % blocks, depth_offset)


@njit(**_JIT)
def _one_row(row, panels, first_panel, end_panel, out_row):
    """out_row's columns of ROW_PANELS panels from first_panel (not past end_panel) = row (K) @
    those panels (a short group repeats its last panel and stores only the real ones)."""
    depth = row.shape[0]
    acc = carray(_stack_buffer(_ROW_TILE, panels), (_ROW_TILE,))
    for i in range(_ROW_TILE):
        acc[i] = 0
    w0 = panels[first_panel]
    w1 = panels[min(first_panel + 1, end_panel - 1)]
    w2 = panels[min(first_panel + 2, end_panel - 1)]
    w3 = panels[min(first_panel + 3, end_panel - 1)]
    for k in range(depth):
        a = row[k]
        for j in range(PANEL):
            acc[j] += a * w0[k, j]
            acc[PANEL + j] += a * w1[k, j]
            acc[2 * PANEL + j] += a * w2[k, j]
            acc[3 * PANEL + j] += a * w3[k, j]
    columns = out_row.shape[0]
    for q in range(min(ROW_PANELS, end_panel - first_panel)):
        column = (first_panel + q) * PANEL
        for j in range(min(PANEL, columns - column)):
            out_row[column + j] = acc[q * PANEL + j]


@njit(**_JIT)
def _narrow_matmul(rows, panels, out, first_panel, end_panel):
    """`matmul_panels` in NARROW_ROWS-row tiles of one panel (a short tile repeats its last
    row), or for a single row NARROW_PANELS panels at a time (a short group repeats its last
    panel), all in `_vector_tile`'s registers. (The index tuples spell NARROW_ROWS = 2 and
    NARROW_PANELS = 3 out: `_vector_tile` takes their lengths as compile-time constants.)"""
    count = rows.shape[0]
    columns = out.shape[1]
    pointer = _stack_buffer(_NARROW_TILE, rows)
    acc = carray(pointer, (_NARROW_TILE,))
    if count == 1:
        for p in range(first_panel, end_panel, NARROW_PANELS):
            last = end_panel - 1
            group = (p, min(p + 1, last), min(p + 2, last))
            _vector_tile(rows, (0,), panels, group, pointer)
            for q in range(min(NARROW_PANELS, end_panel - p)):
                column = (p + q) * PANEL
                for j in range(min(PANEL, columns - column)):
                    out[0, column + j] = acc[q * PANEL + j]
        return
    for p in range(first_panel, end_panel):
        column = p * PANEL
        width = min(PANEL, columns - column)
        for first in range(0, count, NARROW_ROWS):
            _vector_tile(rows, (first, min(first + 1, count - 1)), panels, (p,), pointer)
            for r in range(min(NARROW_ROWS, count - first)):
                for j in range(width):
                    out[first + r, column + j] = acc[r * PANEL + j]


@njit(**_JIT)
def matmul_panels(rows, panels, out, first_panel, end_panel):
    """out (M, N) = rows (M, K) @ W^T in the columns of panels first_panel..end_panel-1 (all of
    them: 0, panel_count(N)), W given as `pack_panels` panels (panel_count(N), K, PANEL).
    (A panel range rather than column slices of `out`: one compiled form for every caller.)

    Tiles of WIDE_ROWS rows while that many are left, then full and short tiles of TILE_ROWS
    rows; a single row left over (or M = 1) takes the one-row form, which reads the weights once
    for that row instead of once for a whole tile. Every form sums each output over k in the
    same order, so a row's result doesn't depend on which tile it fell in."""
    count = rows.shape[0]
    if count == 0:
        return
    depth = rows.shape[1]
    columns = out.shape[1]
    if depth == 0:
        for r in range(count):
            for j in range(first_panel * PANEL, min(columns, end_panel * PANEL)):
                out[r, j] = 0
        return
    if _narrow(rows):
        _narrow_matmul(rows, panels, out, first_panel, end_panel)
        return
    # The tile loops are written here, not called: a call per tile passes three arrays (with
    # their reference counting), which cost ~30 % at K = 256 (74 against 110 GFLOP/s). And each
    # tile's rows are spelled out rather than looped over: with an inner loop over the panels
    # of the one-row form instead, LLVM kept the accumulators in memory (512 x 128: 13.6-16.0
    # against 3.6 us), so the 8-row and the 4-row tile are two written-out loops.
    # Rows taken by WIDE_ROWS-row tiles: none where they don't fit the vector registers
    # (AVX2, `common.wide_tile_fits`); the same sums either way.
    wide = count // WIDE_ROWS * WIDE_ROWS if WIDE_TILE_FITS else 0
    tiled = count if (count - wide) % TILE_ROWS != 1 else count - 1
    # float32 on AVX-512: the wide tiles take two panels at once, 16 zmm accumulators, so that
    # a k's 8 broadcasts and 2 panel loads feed 16 FMAs (one panel: 9 loads for 8 FMAs, which
    # kept the two FMA ports of a Zen 5 core from filling; see bench/decisions.md). Written as
    # vector IR (`_vector_tile`, k loop not unrolled): as a Python loop it was fine compiled
    # alone, but inlined in a kernel LLVM unrolled it and spilled accumulators every k.
    paired = first_panel + ((end_panel - first_panel) // 2 * 2 if _pairs(rows) and wide else 0)
    pair_pointer = _stack_buffer(_PAIR_TILE, rows)
    pair = carray(pair_pointer, (_PAIR_TILE,))
    for p in range(first_panel, paired, 2):
        for first in range(0, wide, WIDE_ROWS):
            r = first
            tile = (r, r + 1, r + 2, r + 3, r + 4, r + 5, r + 6, r + 7)
            _vector_tile(rows, tile, panels, (p, p + 1), pair_pointer)
            for q in range(2):
                column = (p + q) * PANEL
                if columns - column >= PANEL:
                    for r in range(WIDE_ROWS):
                        for j in range(PANEL):
                            out[first + r, column + j] = pair[(2 * r + q) * PANEL + j]
                else:
                    for r in range(WIDE_ROWS):
                        for j in range(columns - column):
                            out[first + r, column + j] = pair[(2 * r + q) * PANEL + j]
    acc = carray(_stack_buffer(_WIDE_TILE, rows), (_WIDE_TILE,))
    for p in range(first_panel, end_panel):
        panel = panels[p]
        column = p * PANEL
        width = min(PANEL, columns - column)
        for first in range(0 if p >= paired else wide, wide, WIDE_ROWS):
            for i in range(_WIDE_TILE):
                acc[i] = 0
            for k in range(depth):
                a0 = rows[first, k]
                a1 = rows[first + 1, k]
                a2 = rows[first + 2, k]
                a3 = rows[first + 3, k]
                a4 = rows[first + 4, k]
                a5 = rows[first + 5, k]
                a6 = rows[first + 6, k]
                a7 = rows[first + 7, k]
                for j in range(PANEL):
                    w = panel[k, j]
                    acc[j] += a0 * w
                    acc[PANEL + j] += a1 * w
                    acc[2 * PANEL + j] += a2 * w
                    acc[3 * PANEL + j] += a3 * w
                    acc[4 * PANEL + j] += a4 * w
                    acc[5 * PANEL + j] += a5 * w
                    acc[6 * PANEL + j] += a6 * w
                    acc[7 * PANEL + j] += a7 * w
            if width == PANEL:
                for r in range(WIDE_ROWS):
                    for j in range(PANEL):
                        out[first + r, column + j] = acc[r * PANEL + j]
            else:
                for r in range(WIDE_ROWS):
                    for j in range(width):
                        out[first + r, column + j] = acc[r * PANEL + j]
        for first in range(wide, tiled, TILE_ROWS):
            # A short tile repeats its last row and stores only the real ones.
            r1 = min(first + 1, count - 1)
            r2 = min(first + 2, count - 1)
            r3 = min(first + 3, count - 1)
            for i in range(_TILE):
                acc[i] = 0
            for k in range(depth):
                a0 = rows[first, k]
                a1 = rows[r1, k]
                a2 = rows[r2, k]
                a3 = rows[r3, k]
                for j in range(PANEL):
                    w = panel[k, j]
                    acc[j] += a0 * w
                    acc[PANEL + j] += a1 * w
                    acc[2 * PANEL + j] += a2 * w
                    acc[3 * PANEL + j] += a3 * w
            # A whole panel's store in a loop of constant length: with the store loop's length
            # known only at run time the tile ran 7-14 % slower on a Zen 3 core (8-120 x
            # 256-512 @ 256-512 x 1024-2048, interleaved: 54-63 against 58-71 GFLOP/s).
            if width == PANEL:
                for r in range(min(TILE_ROWS, count - first)):
                    for j in range(PANEL):
                        out[first + r, column + j] = acc[r * PANEL + j]
            else:
                for r in range(min(TILE_ROWS, count - first)):
                    for j in range(width):
                        out[first + r, column + j] = acc[r * PANEL + j]
    if tiled < count:
        for p in range(first_panel, end_panel, ROW_PANELS):
            _one_row(rows[count - 1], panels, p, end_panel, out[count - 1])


@njit(**JIT_OPTIONS)
def _pack_into(W, transposed, panels, depth_offset, threads):
    """`pack_panels`, on the calling thread when the weights are small (see PARALLEL_PACK_SIZE)
    or the kernel has one thread (which then never enters a parallel region)."""
    if W.size < PARALLEL_PACK_SIZE or threads <= 1:
        for d in range(W.shape[0]):
            for block in range(_pack_blocks(W, transposed)):
                _pack_block(W, transposed, panels, d, block, depth_offset)
    else:
        pack_panels(W, transposed, panels, depth_offset)


@njit(**JIT_OPTIONS)
def packed_panels(W, transposed, threads):
    """A new (D, panel_count(N), K, PANEL) array holding `pack_panels(W, transposed)`, packed
    by up to `threads` threads."""
    if transposed:
        columns, depth = W.shape[2], W.shape[1]
    else:
        columns, depth = W.shape[1], W.shape[2]
    panels = np.empty((W.shape[0], panel_count(columns), depth, PANEL), dtype=W.dtype)
    _pack_into(W, transposed, panels, np.int64(0), threads)
    return panels


@njit(**JIT_OPTIONS)
def packed_joint_panels(W_first, W_second, threads):
    """Panels (D, panel_count(N), K1 + K2, PANEL) of the side-by-side weights [W_first |
    W_second], each (D, N, K1) / (D, N, K2): one product of rows [a | b] gives a @ W_first^T +
    b @ W_second^T (the LSTM forward with its input projection fused, `lstm.lstm_forward`)."""
    depth = W_first.shape[2]
    panels = np.empty(
        (W_first.shape[0], panel_count(W_first.shape[1]), depth + W_second.shape[2], PANEL),
        dtype=W_first.dtype,
    )
    _pack_into(W_first, False, panels, np.int64(0), threads)
    _pack_into(W_second, False, panels, depth, threads)
    return panels


# Rows of a per product call in `matmul`: a block of a that stays in L2 while the panels
# stream past it once.
CHUNK_ROWS = 64
# `matmul` sums K in blocks of this many terms, one FMA chain each, then adds the blocks' sums in
# order: the weight gradients' K is every row of the sequence, and one chain over all of them
# drifted 7x further from torch's GEMM (GRU T100 B64 dW_ih: 5.6e-4 against 7.6e-5 at |dW| ~ 6).
# T100 B16 H256 dW_hh against float64: 256-term blocks 7.0e-5 (torch 5.9e-5) but 1.20x torch's
# time, 512 1.2e-4 and 1.86x, 1024 1.8e-4 and 1.95x (Zen 5).
DEPTH_BLOCK = 512


@njit(**JIT_OPTIONS)
def _matmul_task(a, panels, out, task, tasks):
    """Task `task` of `tasks`: chunks task, task + tasks, ... of CHUNK_ROWS rows of a, each
    through every DEPTH_BLOCK panel block in order. A strided a (a transposed view) is first
    copied chunk by chunk into a contiguous block, since its rows read straight from the view
    touch a new page every k."""
    rows, depth = a.shape
    columns = out.shape[1]
    chunks = (rows + CHUNK_ROWS - 1) // CHUNK_ROWS
    strided = a.strides[1] != a.itemsize
    block = np.empty((CHUNK_ROWS if strided else 0, depth), dtype=a.dtype)
    partial = np.empty((CHUNK_ROWS if panels.shape[0] > 1 else 0, columns), dtype=out.dtype)
    for c in range(task, chunks, tasks):
        first = c * CHUNK_ROWS
        last = min(rows, first + CHUNK_ROWS)
        if strided:
            part = block[: last - first]
            for k in range(depth):  # k outer: each k's row of the view is one cache line
                for r in range(last - first):
                    part[r, k] = a[first + r, k]
        else:
            part = a[first:last]
        target = out[first:last]
        for i in range(panels.shape[0]):
            start = i * DEPTH_BLOCK
            rows_in = part[:, start : min(depth, start + DEPTH_BLOCK)]
            if i == 0:
                matmul_panels(rows_in, panels[i], target, np.int64(0), panels.shape[1])
            else:
                sums = partial[: last - first]
                matmul_panels(rows_in, panels[i], sums, np.int64(0), panels.shape[1])
                for r in range(last - first):
                    add_row(target[r], sums[r])


@njit(**PARALLEL_JIT_OPTIONS)
def _matmul_tasks(a, panels, out, tasks):
    for task in prange(tasks):
        _matmul_task(a, panels, out, task, tasks)


@njit(**JIT_OPTIONS)
def _pack_depth_blocks(W, panels, offset, threads):
    """W (K, N), rows offset.. of the stacked operand, into the DEPTH_BLOCK blocks of panels."""
    k = 0
    while k < W.shape[0]:
        i = (offset + k) // DEPTH_BLOCK
        within = offset + k - i * DEPTH_BLOCK
        end = min(W.shape[0], k + DEPTH_BLOCK - within)
        target = np.expand_dims(panels[i], 0)
        _pack_into(np.expand_dims(W[k:end], 0), True, target, np.int64(within), threads)
        k = end


@njit(**JIT_OPTIONS)
def matmul(a, b, more, out, threads):
    """out (M, N) = a (M, K1 + K2) @ [b (K1, N); more (K2, N)] (more may have no rows), a in
    any layout (a transposed view too): [b; more] packed into panels of DEPTH_BLOCK rows of K
    each, the rows of a split between `threads` threads in CHUNK_ROWS chunks (one thread: no
    parallel region). Each output sums every block in one k-ordered FMA chain and the blocks in
    order, so the bits don't depend on the thread count."""
    depth = b.shape[0] + more.shape[0]
    blocks = max(1, (depth + DEPTH_BLOCK - 1) // DEPTH_BLOCK)
    panels = np.empty(
        (blocks, panel_count(b.shape[1]), min(depth, DEPTH_BLOCK), PANEL), dtype=b.dtype
    )
    _pack_depth_blocks(b, panels, 0, threads)
    _pack_depth_blocks(more, panels, b.shape[0], threads)
    if threads <= 1:  # no parallel region: a forked process may run none (`runtime`)
        _matmul_task(a, panels, out, 0, 1)
    else:
        _matmul_tasks(a, panels, out, threads)
