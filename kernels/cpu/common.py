"""The parts of every CPU recurrence that don't depend on the cell.

Sequence layout shared by all kernels (PyTorch's packed layout, which dense input is a special
case of): rows are time-major, step t holds `batch_sizes[t]` rows starting at `offsets[t]`, and
`batch_sizes` never increases, so the rows alive at step t are always a prefix 0..batch_sizes[t]-1
of the batch. A dense (T, B, F) tensor is the same memory with every batch size equal to B.

A layer-direction runs its steps in "processing order": t = 0..T-1, or T-1..0 when `reverse`.
A row's previous hidden state is the one from the previous processed step if that step had the
row, otherwise the initial state h0 (for reverse direction a row joins at its last time step).
"""

from __future__ import annotations

import numpy as np
from numba import njit

_JIT = {"cache": True, "error_model": "numpy", "nogil": True}


@njit(**_JIT)
def step_offsets(batch_sizes):
    """(T,) int64 batch sizes -> (T + 1,) int64 row offsets of each step in the packed layout."""
    offsets = np.empty(batch_sizes.shape[0] + 1, dtype=np.int64)
    offsets[0] = 0
    for t in range(batch_sizes.shape[0]):
        offsets[t + 1] = offsets[t] + batch_sizes[t]
    return offsets


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


@njit(**_JIT)
def gather_previous_hidden(y, h0, batch_sizes, offsets, reverse, out):
    """out[row of step t] = the hidden state that step t consumed for that row.

    y (N, P) outputs of the layer-direction, h0 (B, P) initial state, out (N, P).
    """
    num_steps = batch_sizes.shape[0]
    for t in range(num_steps):
        prev, prev_rows = previous_step_rows(t, batch_sizes, reverse)
        off = offsets[t]
        for r in range(batch_sizes[t]):
            if r < prev_rows:
                out[off + r, :] = y[offsets[prev] + r, :]
            else:
                out[off + r, :] = h0[r, :]


@njit(**_JIT)
def input_projection(x, W_ih, out):
    """out (N, G*H) = x (N, I) @ W_ih (G*H, I)^T, one GEMM over every step; biases come later."""
    if x.shape[0] == 0:
        return
    if x.shape[1] == 0:
        out[:] = 0
        return
    np.dot(x, W_ih.T, out)


@njit(**_JIT)
def accumulate_matmul_tn(a, b, out):
    """out += a^T @ b for a (N, M), b (N, K), out (M, K): a weight gradient over all rows."""
    if a.shape[0] == 0:
        return
    out += np.dot(a.T, b)


@njit(**_JIT)
def matmul_into(a, b, out):
    """out = a (N, M) @ b (M, K), with empty operands handled (BLAS rejects zero sizes)."""
    if a.shape[0] == 0:
        return
    if a.shape[1] == 0:
        out[:] = 0
        return
    np.dot(a, b, out)


@njit(**_JIT)
def column_sums(a, out):
    """out (M,) += a (N, M).sum(0): a bias gradient."""
    for n in range(a.shape[0]):
        for j in range(a.shape[1]):
            out[j] += a[n, j]
