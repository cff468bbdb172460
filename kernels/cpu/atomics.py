"""Atomic counters and a spin hint for the CPU kernels' threads, as Numba intrinsics on int64
arrays: `fetch_add` (sequentially consistent), `load_acquire`, `store_release`, `spin_pause`.
Used by the batch-1 helpers (`shared_product`) and by row chunks claimed at run time
(`common.next_chunk`).
"""

from __future__ import annotations

import platform

from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# int64s per counter, so that each counter has a 64-byte cache line to itself.
SLOT = 8
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


def _is_counters(counters) -> bool:
    """The intrinsics below take a 2-D int64 array of counters."""
    return isinstance(counters, types.Array) and counters.dtype == types.int64


def _counter_pointer(context, builder, signature, args):
    array_type = signature.args[0]
    array = context.make_array(array_type)(context, builder, args[0])
    indices = [
        context.cast(builder, args[1], signature.args[1], types.intp),
        context.cast(builder, args[2], signature.args[2], types.intp),
    ]
    return cgutils.get_item_pointer(context, builder, array_type, array, indices)


@intrinsic
def fetch_add(typingctx, counters, row, column, value):
    """Atomically add `value` to counters[row, column] (int64, 2-D); returns the old value."""
    if not _is_counters(counters):
        return None

    def codegen(context, builder, signature, args):
        pointer = _counter_pointer(context, builder, signature, args)
        amount = context.cast(builder, args[3], signature.args[3], types.int64)
        return builder.atomic_rmw("add", pointer, amount, "seq_cst")

    return types.int64(counters, row, column, value), codegen


@intrinsic
def load_acquire(typingctx, counters, row, column):
    """counters[row, column] read atomically, ordered before the reads that follow it."""
    if not _is_counters(counters):
        return None

    def codegen(context, builder, signature, args):
        pointer = _counter_pointer(context, builder, signature, args)
        return builder.load_atomic(pointer, "acquire", 8)

    return types.int64(counters, row, column), codegen


@intrinsic
def store_release(typingctx, counters, row, column, value):
    """counters[row, column] = value atomically, ordered after the writes before it."""
    if not _is_counters(counters):
        return None

    def codegen(context, builder, signature, args):
        pointer = _counter_pointer(context, builder, signature, args)
        amount = context.cast(builder, args[3], signature.args[3], types.int64)
        builder.store_atomic(amount, pointer, "release", 8)
        return context.get_dummy_value()

    return types.none(counters, row, column, value), codegen


@intrinsic
def spin_pause(typingctx):
    """x86 `pause` (eases the spinning core's pressure on its sibling); nothing elsewhere."""

    def codegen(context, builder, signature, args):
        if _X86:
            function_type = cgutils.ir.FunctionType(cgutils.ir.VoidType(), [])
            pause = cgutils.get_or_insert_function(
                builder.module, function_type, "llvm.x86.sse2.pause"
            )
            builder.call(pause, [])
        return context.get_dummy_value()

    return types.none(), codegen


@intrinsic
def compare_exchange(typingctx, counters, row, column, expected, desired):
    """Atomically set counters[row, column] to `desired` if it holds `expected` (int64, 2-D,
    sequentially consistent); returns the value it held, so the exchange happened iff that
    equals `expected`."""
    if not _is_counters(counters):
        return None

    def codegen(context, builder, signature, args):
        pointer = _counter_pointer(context, builder, signature, args)
        old = context.cast(builder, args[3], signature.args[3], types.int64)
        new = context.cast(builder, args[4], signature.args[4], types.int64)
        result = builder.cmpxchg(pointer, old, new, "seq_cst", "seq_cst")
        return builder.extract_value(result, 0)

    return types.int64(counters, row, column, expected, desired), codegen
