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

from numba import cuda

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


@cuda.jit(device=True)
def wide(x, one):
    """x in the compute dtype (`one`'s): float16 storage widens to float32; a no-op otherwise
    (x * 1 is exact, and the compiler drops it)."""
    return x * one


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
