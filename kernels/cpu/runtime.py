"""Which Numba threading layer the parallel kernels run on.

The kernels need no BLAS (their per-step products are `panel_matmul`'s own), so the only thread
pool they start is Numba's. Which one it is matters next to torch's OpenMP pool, which spins
after each parallel region: see `prefer_openmp_threading_layer`.
"""

from __future__ import annotations

import os

import numba


def prefer_openmp_threading_layer() -> None:
    """Ask Numba for its OpenMP threading layer first (unless the user chose one).

    Numba's own default order tries TBB first when it is installed. The `omp` layer measured
    better next to torch here, but it is still a separate pool: torch's wheel bundles its own
    libgomp, and Numba's `omppool` links the system one (two libgomp copies in the process).
    Has no effect once Numba has started a threading layer.
    """
    if "NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ:
        return
    priority = list(numba.config.THREADING_LAYER_PRIORITY)
    if "omp" in priority:
        priority.remove("omp")
        numba.config.THREADING_LAYER_PRIORITY = ["omp", *priority]
