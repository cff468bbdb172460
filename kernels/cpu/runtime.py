"""Keep the BLAS that Numba's `np.dot` calls single-threaded while fastrnn's kernels run.

Numba's `np.dot` calls scipy's BLAS (OpenBLAS in scipy's wheels). fastrnn already splits the
batch across threads itself, one BLAS call per thread and step, so a multi-threaded BLAS would
only serialise those calls, and its idle workers would spin against the caller's thread pool
(torch's OpenMP pool spins too; on 2 cores the two pools slowed each other down 12-14x).
The limit is set only for the duration of a kernel call and then restored, so a user's own
numpy/scipy code keeps its settings.
"""

from __future__ import annotations

import os
import threading

import numba
import numpy as np


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


prefer_openmp_threading_layer()

_lock = threading.Lock()
_controllers: list | None = None
_active = 0  # kernel calls in flight (several Python threads may run kernels at once)
_saved: list[int] = []


def _blas_controllers() -> list:
    """threadpoolctl controllers of the loaded BLAS libraries (scipy's, which Numba calls)."""
    global _controllers
    if _controllers is None:
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (load the library Numba uses)
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _controllers = []
        else:
            blas = [c for c in ThreadpoolController().lib_controllers if c.user_api == "blas"]
            # numpy's wheel brings its own OpenBLAS (numpy.libs), which Numba's np.dot never
            # calls: leave it alone (each limit and restore costs ~1 us a library).
            numpy_libs = os.path.join(os.path.dirname(os.path.dirname(np.__file__)), "numpy.libs")
            _controllers = [c for c in blas if not c.filepath.startswith(numpy_libs)] or blas
    return _controllers


class _SingleThreadedBlas:
    """Context manager: BLAS limited to one thread in the body; the first caller in sets the
    limit, the last one out restores what was there. A plain class, not a generator-based
    contextmanager: it runs twice per layer call, and small calls feel every microsecond."""

    __slots__ = ()

    def __enter__(self) -> None:
        global _active, _saved
        controllers = _blas_controllers()
        with _lock:
            if _active == 0:
                _saved = [c.get_num_threads() for c in controllers]
                for c, n in zip(controllers, _saved, strict=True):
                    if n != 1:
                        c.set_num_threads(1)
            _active += 1

    def __exit__(self, *exc_info: object) -> None:
        global _active
        controllers = _blas_controllers()
        with _lock:
            _active -= 1
            if _active == 0:
                for c, n in zip(controllers, _saved, strict=True):
                    if n != 1:
                        c.set_num_threads(n)


_SINGLE_THREADED_BLAS = _SingleThreadedBlas()


def single_threaded_blas() -> _SingleThreadedBlas:
    """`with single_threaded_blas(): ...` runs the body with BLAS limited to one thread."""
    return _SINGLE_THREADED_BLAS
