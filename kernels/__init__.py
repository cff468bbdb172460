"""fastrnn's kernels: pure Numba, no torch. Installed as ``fastrnn.kernels``."""

from __future__ import annotations

import tempfile
import warnings

import numba


def _cache_probe() -> int:
    return 0


def _ensure_a_cache_location() -> None:
    """Every kernel is compiled with `cache=True`, and Numba refuses to even define such a
    function when it finds no writable place for its cache (the package's `__pycache__`,
    NUMBA_CACHE_DIR, the user's cache folder): `import fastrnn` would fail in a read-only
    install run by a user without a home. Then the kernels cache into a temporary folder for
    this process, with a warning that says how to keep them."""
    try:
        numba.njit(cache=True)(_cache_probe)  # defines only: nothing compiles here
    except RuntimeError:
        folder = tempfile.mkdtemp(prefix="fastrnn-numba-cache-")
        numba.config.CACHE_DIR = folder
        warnings.warn(
            "fastrnn: no writable folder for Numba's kernel cache (fastrnn's __pycache__, "
            f"NUMBA_CACHE_DIR, the user's cache folder); kernels compile into {folder} for this "
            "process only. Set NUMBA_CACHE_DIR to a writable folder to keep them.",
            RuntimeWarning,
            stacklevel=2,
        )


_ensure_a_cache_location()
