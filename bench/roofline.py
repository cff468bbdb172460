"""The machine's measured GEMM throughput: the roofline that GEMM-bound cases are judged by.

Measured with numpy's matmul (OpenBLAS) on square matrices of the benchmark's dtype (sgemm for
float32, dgemm for float64), with the same number of threads as the benchmark, best of a few
runs after a warm-up: an upper bound for what any RNN implementation's GEMMs can reach on this
machine. (The JSON keys say `sgemm` for both, as they did before float64 runs had their own.)
"""

from __future__ import annotations

import time

import numpy as np


def gemm_name(dtype: str) -> str:
    """The BLAS routine the roofline of a run in `dtype` measures: dgemm for float64, else
    sgemm (16-bit runs are CUDA runs, which have no roofline)."""
    return "dgemm" if dtype == "float64" else "sgemm"


def sgemm_peak_gflops(
    threads: int, n: int = 2048, repeats: int = 5, dtype: str = "float32"
) -> float:
    """Best GFLOP/s of an (n x n) @ (n x n) product with `threads` BLAS threads, in float32
    (sgemm) or float64 (dgemm, `gemm_name`)."""
    rng = np.random.default_rng(0)
    kind = np.float64 if gemm_name(dtype) == "dgemm" else np.float32
    a = rng.standard_normal((n, n)).astype(kind)
    b = rng.standard_normal((n, n)).astype(kind)
    out = np.empty((n, n), dtype=kind)
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
