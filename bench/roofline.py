"""The machine's measured sgemm throughput: the roofline that GEMM-bound cases are judged by.

Measured with numpy's float32 matmul (OpenBLAS) on square matrices, with the same number of
threads as the benchmark, best of a few runs after a warm-up: an upper bound for what any RNN
implementation's GEMMs can reach on this machine.
"""

from __future__ import annotations

import time

import numpy as np


def sgemm_peak_gflops(threads: int, n: int = 2048, repeats: int = 5) -> float:
    """Best GFLOP/s of an (n x n) @ (n x n) float32 product with `threads` BLAS threads."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), dtype=np.float32)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # measure with whatever BLAS threads are set
        limits = None
    else:
        limits = threadpool_limits(threads, user_api="blas")
    try:
        np.matmul(a, b, out=out)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            np.matmul(a, b, out=out)
            best = min(best, time.perf_counter() - start)
    finally:
        if limits is not None:
            limits.restore_original_limits()
    return 2.0 * n**3 / best / 1e9
