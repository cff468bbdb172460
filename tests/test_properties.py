"""Property tests (hypothesis): random shapes, layers, directions and lengths.

fastrnn must match torch.nn (same weights) in outputs, final states and all gradients.
"""

from __future__ import annotations

import warnings

import numba
import pytest
import torch
from conftest import CELL_MODES, MODES, compare_modules, make_mode_pair
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastrnn
import fastrnn.autograd

try:
    import numba.cuda  # noqa: F401  (numba-cuda: the simulator when NUMBA_ENABLE_CUDASIM=1)

    SIMULATED = bool(numba.config.ENABLE_CUDASIM)
except ImportError:
    SIMULATED = False

SETTINGS = settings(
    max_examples=15,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def module_configs(draw, packed: bool):
    mode = draw(st.sampled_from(sorted(MODES)))
    T = draw(st.integers(1, 7))
    # 8-24 rows: row chunks of >= 8 rows, where the CPU forwards compute the input projection
    # in their per-step products on AVX-512 CPUs (`kernels.cpu.common.fuses_input_projection`)
    B = draw(st.integers(1, 4) | st.integers(8, 24))
    I = draw(st.integers(1, 5))
    H = draw(st.integers(1, 6))
    layers = draw(st.integers(1, 3))
    bidirectional = draw(st.booleans())
    batch_first = draw(st.booleans())
    bias = draw(st.booleans())
    proj = draw(st.integers(0, H - 1)) if mode == "LSTM" and H > 1 else 0
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    unbatched = (not packed) and draw(st.booleans())
    hx = draw(st.booleans())
    lengths = None
    enforce_sorted = True
    if packed:
        lengths = draw(st.lists(st.integers(1, T), min_size=B, max_size=B))
        enforce_sorted = draw(st.booleans())
        if enforce_sorted:
            lengths = sorted(lengths, reverse=True)
    seed = draw(st.integers(0, 2**16))
    return dict(
        mode=mode, T=T, B=B, I=I, H=H, layers=layers, bidirectional=bidirectional,
        batch_first=batch_first, bias=bias, proj=proj, dtype=dtype, unbatched=unbatched,
        hx=hx, lengths=lengths, enforce_sorted=enforce_sorted, seed=seed,
    )  # fmt: skip


def _run(c):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # e.g. torch's oneDNN notes
        ref, fast = make_mode_pair(
            c["mode"],
            c["I"],
            c["H"],
            num_layers=c["layers"],
            bias=c["bias"],
            batch_first=c["batch_first"],
            bidirectional=c["bidirectional"],
            dtype=c["dtype"],
            seed=c["seed"],
            **({"proj_size": c["proj"]} if c["proj"] else {}),
        )
        gen = torch.Generator().manual_seed(c["seed"])
        T, B, I, H = c["T"], c["B"], c["I"], c["H"]
        if c["unbatched"]:
            shape = (T, I)
        else:
            shape = (B, T, I) if c["batch_first"] else (T, B, I)
        x = torch.randn(shape, generator=gen, dtype=torch.float64).to(c["dtype"])
        hx = None
        if c["hx"]:
            D = 2 if c["bidirectional"] else 1
            batch = () if c["unbatched"] else (B,)
            h0 = torch.randn((c["layers"] * D, *batch, c["proj"] or H), generator=gen)
            hx = h0.to(c["dtype"])
            if c["mode"] == "LSTM":
                c0 = torch.randn((c["layers"] * D, *batch, H), generator=gen)
                hx = (hx, c0.to(c["dtype"]))
        kw = {}
        if c["lengths"] is not None:
            kw = dict(lengths=c["lengths"], enforce_sorted=c["enforce_sorted"])
        compare_modules(ref, fast, x, hx, **kw)


@SETTINGS
@given(module_configs(packed=False))
def test_random_module_matches_torch(c):
    _run(c)


@SETTINGS
@given(module_configs(packed=True))
def test_random_packed_matches_torch(c):
    _run(c)


@SETTINGS
@given(
    mode=st.sampled_from(sorted(CELL_MODES)),
    B=st.integers(0, 7),  # both product paths (kernels.cpu.cells.SMALL_BATCH = 4)
    I=st.integers(1, 5),
    H=st.integers(1, 6),
    bias=st.booleans(),
    hx=st.booleans(),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_random_cell_matches_torch(mode, B, I, H, bias, hx, dtype, seed):
    ref, fast = make_mode_pair(mode, I, H, bias=bias, dtype=dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    batch = () if B == 0 else (B,)  # B == 0 stands for unbatched 1-D input here
    x = torch.randn((*batch, I), generator=gen, dtype=torch.float64).to(dtype)
    state = None
    if hx:
        state = torch.randn((*batch, H), generator=gen, dtype=torch.float64).to(dtype)
        if mode == "LSTMCell":
            state = (state, torch.randn((*batch, H), generator=gen).to(dtype))
    compare_modules(ref, fast, x, state)


@pytest.mark.cudasim
@pytest.mark.skipif(not SIMULATED, reason="needs numba-cuda's simulator (no GPU here)")
@settings(max_examples=30, deadline=None, database=None)
@given(module_configs(packed=True), st.sampled_from(["auto", "stepwise"]))
def test_random_packed_on_cuda_kernels_matches_torch(c, strategy):
    """The CUDA launcher and kernels (simulated, on CPU tensors) on random packed batches:
    "auto" takes the persistent kernel for float32 without a projection."""
    from fastrnn import recurrence_cuda

    before = recurrence_cuda.get_cuda_strategy()
    fastrnn.autograd.CUDA_KERNELS_ON_CPU = True
    recurrence_cuda.set_cuda_strategy(strategy)
    try:
        _run(c)
    finally:
        fastrnn.autograd.CUDA_KERNELS_ON_CPU = False
        recurrence_cuda.set_cuda_strategy(before)
