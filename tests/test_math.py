"""The gate nonlinearities (float32 and float64): accuracy over the whole line, limits, NaN,
vector code."""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from fastrnn.kernels.math import sigmoid, tanh


@njit(cache=True, error_model="numpy")
def _apply(x, sig_out, tanh_out):
    for i in range(x.shape[0]):
        sig_out[i] = sigmoid(x[i])
        tanh_out[i] = tanh(x[i])


def _exact(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    xd = x.astype(np.float64)
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-xd)), np.tanh(xd)


SPECIAL = [np.inf, -np.inf, 0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 3.4e38, -3.4e38, 87.5, -87.5]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_accuracy_over_the_whole_line(dtype):
    x = np.concatenate([np.linspace(-120, 120, 400_001), np.geomspace(1e-8, 20, 20_001), SPECIAL])
    x = np.concatenate([x, -x]).astype(dtype)
    sig, th = np.empty_like(x), np.empty_like(x)
    _apply(x, sig, th)
    ref_sig, ref_tanh = _exact(x)
    tol = 2e-7 if dtype == np.float32 else 1e-15
    print(
        "max |sigmoid err|",
        np.abs(sig - ref_sig).max(),
        "max |tanh err|",
        np.abs(th - ref_tanh).max(),
    )
    assert np.abs(sig - ref_sig).max() <= tol
    assert np.abs(th - ref_tanh).max() <= tol
    # Relative accuracy of tanh near zero, where 1 - 2/(e^2x + 1) would cancel.
    small = (np.abs(x) < 0.5) & (x != 0)
    rel = np.abs(th[small] - ref_tanh[small]) / np.abs(ref_tanh[small])
    assert rel.max() <= (4e-7 if dtype == np.float32 else 1e-15)
    # Ranges and symmetry.
    assert (sig >= 0).all() and (sig <= 1).all() and (np.abs(th) <= 1).all()
    np.testing.assert_array_equal(np.sign(th[x != 0]), np.sign(x[x != 0]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_limits_and_nan(dtype):
    x = np.array([np.inf, -np.inf, np.nan, -np.nan], dtype=dtype)
    sig, th = np.empty_like(x), np.empty_like(x)
    _apply(x, sig, th)
    assert sig[0] == 1.0 and th[0] == 1.0 and th[1] == -1.0
    assert 0.0 <= sig[1] < 1e-37
    assert np.isnan(sig[2:]).all() and np.isnan(th[2:]).all()


@njit(cache=False, error_model="numpy")
def _apply_uncached(x, sig_out, tanh_out):
    for i in range(x.shape[0]):
        sig_out[i] = sigmoid(x[i])
        tanh_out[i] = tanh(x[i])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_gate_math_is_vectorised(dtype):
    """The gate loop must compile to AVX2 (ymm) or AVX-512 code with no call of a scalar exp
    or tanh: a scalar exp costs ~10x more (float64 with math.exp / math.tanh: 51 against 15 ns
    an LSTM unit). (Compiled here, not loaded from the on-disk cache, which keeps no
    assembly.)"""
    import platform
    import re

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("vector width check written for x86-64")
    x = np.linspace(-5, 5, 64).astype(dtype)
    _apply_uncached(x, np.empty_like(x), np.empty_like(x))
    signature = [sig for sig in _apply_uncached.signatures if str(sig[0].dtype) == dtype.__name__]
    asm = _apply_uncached.inspect_asm(signature[0])
    suffix = "ps" if dtype == np.float32 else "pd"
    packed = len(re.findall(rf"\bv\w+{suffix}\s+.*[yz]mm", asm))
    # vectorised: ~100-120 packed instructions here; with scalar exp / tanh calls (the
    # earlier scalar float64 form) 5
    assert packed >= 30, f"{packed} packed vector instructions: the gate loop is scalar"
