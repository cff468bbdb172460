"""Device helpers shared by every CUDA kernel: the packed sequence layout and the gate functions.

Layout (the same as the CPU kernels'): rows are time-major, step t holds `batch_sizes[t]` rows
starting at `offsets[t]`; the rows alive at a step are a prefix of the batch. Direction d = 0 runs
t = 0..T-1, direction d = 1 (reverse) t = T-1..0; "step k" is the k-th step a direction processes.

Numbers: every kernel takes `one`, a 1 of the compute dtype (float32 for float32 and float16
data, float64 for float64), because a Python float literal would promote float32 arithmetic to
float64 on the GPU; loads go through `wide` to reach that dtype.
"""

from __future__ import annotations

import math

import numpy as np
from numba import config, cuda, float32, types

# Threads per block of every kernel. 256 keeps a persistent block's registers within one SM's
# file at any register count the compiler picks (256 x 255 < 65536), so one block per SM always
# fits and the cooperative grid can be sized from the SM count.
THREADS_PER_BLOCK = 256

# Cell codes, a runtime argument of the shared kernels (one skeleton serves all three cells).
LSTM = 0
GRU = 1
RNN = 2
GATES = {LSTM: 4, GRU: 3, RNN: 1}


@cuda.jit(device=True)
def step_span(k, d, batch_sizes, offsets):
    """(rows, first row) of direction d's k-th processed step; (0, 0) for k outside 0..T-1."""
    steps = batch_sizes.shape[0]
    if k < 0 or k >= steps:
        return 0, 0
    t = steps - 1 - k if d == 1 else k
    return batch_sizes[t], offsets[t]


# Storage. float64, float32 and float16 arrays hold their values. bfloat16 tensors arrive as
# their int16 bit patterns (torch exports no bfloat16 through __cuda_array_interface__, and
# numba-cuda has no bfloat16 arrays): `wide` decodes them on load, and `put` rounds to nearest
# even on store. `wide` and `put` are plain Python here, which is what the simulator runs; on a
# GPU, their numba-cuda overloads (`_register_gpu_overloads`) pick the code by type at compile
# time.


def _bfloat16_to_float(bits):
    return np.uint32((int(bits) & 0xFFFF) << 16).view(np.float32)


def _float_to_bfloat16(value):
    bits = int(np.float32(value).view(np.uint32))
    if bits & 0x7F800000 == 0x7F800000 and bits & 0x007FFFFF:
        rounded = (bits >> 16) | 0x40  # NaN stays a (quiet) NaN
    else:
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return np.uint16(rounded & 0xFFFF).view(np.int16)


def wide(x, one):
    """A loaded value in the compute dtype (`one`'s): float16 widens to float32, bfloat16 bits
    decode to float32; a no-op otherwise (x * 1 is exact, and the compiler drops it)."""
    if isinstance(x, np.int16):
        return _bfloat16_to_float(x) * one
    return x * one


def put(array, d, n, j, value):
    """array[d, n, j] = value, rounded to the array's storage (bfloat16 bits for int16)."""
    if array.dtype == np.int16:
        array[d, n, j] = _float_to_bfloat16(value)
    else:
        array[d, n, j] = value


def _register_gpu_overloads() -> None:
    from numba import int16, int32, int64
    from numba.cuda import libdevice
    from numba.cuda.extending import overload

    @overload(wide, target="cuda", inline="always")
    def _wide(x, one):
        if isinstance(x, types.Integer):

            def decode(x, one):
                return libdevice.int_as_float(int32((int64(x) & 0xFFFF) << 16)) * one

            return decode
        return lambda x, one: x * one

    @overload(put, target="cuda", inline="always")
    def _put(array, d, n, j, value):
        if isinstance(array.dtype, types.Integer):

            def encode(array, d, n, j, value):
                bits = int64(libdevice.float_as_int(float32(value))) & 0xFFFFFFFF
                if bits & 0x7F800000 == 0x7F800000 and bits & 0x007FFFFF:
                    rounded = (bits >> 16) | 0x40
                else:
                    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
                array[d, n, j] = int16(rounded & 0xFFFF)

            return encode

        def store(array, d, n, j, value):
            array[d, n, j] = value

        return store


if not config.ENABLE_CUDASIM:
    _register_gpu_overloads()


@cuda.jit(device=True)
def sigmoid(x, one):
    # exp(-x) overflows to inf for x < -88 (float32), giving exactly 0; NaN stays NaN.
    return one / (one + math.exp(-x))


@cuda.jit(device=True)
def activation(x, relu, one):
    """tanh, or relu (NaN propagates through both)."""
    if relu:
        return x if not x < one - one else one - one
    return math.tanh(x)


@cuda.jit(device=True)
def activation_grad(y, relu, one):
    """Derivative of `activation` written in terms of its output y."""
    if relu:
        return one if y > one - one else one - one
    return one - y * y


@cuda.jit(device=True)
def gate_count(cell):
    """G: gate blocks of W_hh's rows (LSTM 4, GRU 3, RNN 1)."""
    if cell == LSTM:
        return 4
    if cell == GRU:
        return 3
    return 1
