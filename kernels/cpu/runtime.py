"""Which Numba threading layer the parallel kernels run on.

The kernels need no BLAS (their per-step products are `panel_matmul`'s own), so the only thread
pool they start is Numba's. Which one it is matters next to torch's OpenMP pool, which spins
after each parallel region: see `prefer_openmp_threading_layer`.
"""

from __future__ import annotations

import os
import types

import numba


def _user_chose_a_layer() -> bool:
    return "NUMBA_THREADING_LAYER" in os.environ or "NUMBA_THREADING_LAYER_PRIORITY" in os.environ


def _put_first(layer: str) -> None:
    priority = [name for name in numba.config.THREADING_LAYER_PRIORITY if name != layer]
    numba.config.THREADING_LAYER_PRIORITY = [layer, *priority]


def prefer_workqueue_threading_layer() -> None:
    """Ask Numba for its `workqueue` layer first (unless the user chose one), for a process
    whose pool hasn't started yet. In a process with a gloo process group (DDP), the `omp`
    layer made a rank abort at interpreter exit ("terminate called without an active
    exception") in 2-3 of 8 torchrun runs of a 2-rank LSTM step, after its work was done;
    with `workqueue`, 0 of 8 (AMD EPYC Zen 5)."""
    if not _user_chose_a_layer():
        _put_first("workqueue")


def prefer_openmp_threading_layer() -> None:
    """Ask Numba for its OpenMP threading layer first (unless the user chose one).

    Numba's own default order tries TBB first when it is installed. The `omp` layer measured
    better next to torch here, but it is still a separate pool: torch's wheel bundles its own
    libgomp, and Numba's `omppool` links the system one (two libgomp copies in the process).
    Has no effect once Numba has started a threading layer.
    """
    if not _user_chose_a_layer() and "omp" in numba.config.THREADING_LAYER_PRIORITY:
        _put_first("omp")


def serial_twin(kernel):
    """The same kernel compiled without `parallel=True` (its `prange` loops run as plain loops
    on the calling thread), for processes where no OpenMP parallel region may run: a child
    forked from a process that had used OpenMP hangs in GNU OpenMP's next parallel region, or
    Numba terminates it ("fork() called from a process already using GNU OpenMP"). Callers
    pass threads = 1, so the kernel also takes the one-thread paths inside (no helpers, the
    packing on the calling thread).

    A copy of the Python function under its own name: Numba's on-disk cache keys a function by
    its module, qualified name and bytecode, not by its compile options, so compiling the same
    function object again without `parallel` would share (and overwrite) the parallel cache
    entries."""
    function = kernel.py_func
    twin = types.FunctionType(
        function.__code__,
        function.__globals__,
        function.__name__ + "_serial",
        function.__defaults__,
        function.__closure__,
    )
    twin.__qualname__ = function.__qualname__ + "_serial"
    twin.__doc__ = function.__doc__
    twin.__module__ = function.__module__
    dropped = ("parallel", "nopython")  # njit sets nopython itself, and warns if given it
    options = {key: value for key, value in kernel.targetoptions.items() if key not in dropped}
    return numba.njit(cache=True, **options)(twin)
