"""Shared helpers for the fastrnn test suite.

The helpers live here (and not in a package) so that every test module can do
``from conftest import ...``; pytest puts ``tests/`` on ``sys.path`` (rootdir-relative
"prepend" import mode, no ``__init__.py`` in ``tests/``).

Contract checked by these helpers (the drop-in API and its numerics):

* ``fastrnn.X`` built right after ``torch.manual_seed(s)`` has exactly the parameters that
  ``torch.nn.X`` gets after the same seed (same names, same order, same values).
* fp32 results match torch to max|diff| <= 1e-5 * max(1, max|ref|); fp64 to 1e-10.
"""

from __future__ import annotations

import os

# Without an NVIDIA GPU, the CUDA kernels are tested under Numba's simulator (marker `cudasim`).
# Numba reads this when it is first imported, so it is set before anything imports numba; on a
# GPU machine it stays unset and the `cuda` tests run on the real device instead.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest
import torch  # noqa: E402
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence  # noqa: E402

import fastrnn  # noqa: E402

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}

# mode name -> (class name, extra constructor kwargs)
MODES = {
    "LSTM": ("LSTM", {}),
    "GRU": ("GRU", {}),
    "RNN_TANH": ("RNN", {"nonlinearity": "tanh"}),
    "RNN_RELU": ("RNN", {"nonlinearity": "relu"}),
}
CELL_MODES = {
    "LSTMCell": ("LSTMCell", {}),
    "GRUCell": ("GRUCell", {}),
    "RNNCell_TANH": ("RNNCell", {"nonlinearity": "tanh"}),
    "RNNCell_RELU": ("RNNCell", {"nonlinearity": "relu"}),
}

_INDEX_KEYS = ("batch_sizes", "sorted_indices", "unsorted_indices")


# --------------------------------------------------------------------------------------------
# construction
# --------------------------------------------------------------------------------------------
def assert_same_parameters(ref: torch.nn.Module, fast: torch.nn.Module) -> None:
    """Same parameter names in the same order, bit-identical values, same dtypes/shapes."""
    ref_params = list(ref.named_parameters())
    fast_params = list(fast.named_parameters())
    assert [n for n, _ in fast_params] == [n for n, _ in ref_params], (
        "parameter names/order differ from torch.nn: "
        f"{[n for n, _ in fast_params]} vs {[n for n, _ in ref_params]}"
    )
    for (name, p_ref), (_, p_fast) in zip(ref_params, fast_params, strict=True):
        assert p_fast.shape == p_ref.shape, f"{name}: shape {p_fast.shape} vs {p_ref.shape}"
        assert p_fast.dtype == p_ref.dtype, f"{name}: dtype {p_fast.dtype} vs {p_ref.dtype}"
        assert torch.equal(p_fast, p_ref), (
            f"{name}: initial values differ from torch.nn after the same manual_seed "
            f"(max|diff|={(p_fast.double() - p_ref.double()).abs().max().item():.3e})"
        )
    ref_bufs = dict(ref.named_buffers())
    fast_bufs = dict(fast.named_buffers())
    assert fast_bufs.keys() == ref_bufs.keys()


def make_pair(cls_name: str, *args, dtype=None, seed: int = 0, **kwargs):
    """Build ``torch.nn.<cls_name>`` and ``fastrnn.<cls_name>`` from the same seed.

    Also asserts that the initial weights came out identical (the init contract), and
    moves both to ``dtype`` if given. Returns ``(ref, fast)``.
    """
    ref_cls = getattr(torch.nn, cls_name)
    fast_cls = getattr(fastrnn, cls_name)
    torch.manual_seed(seed)
    ref = ref_cls(*args, **kwargs)
    torch.manual_seed(seed)
    fast = fast_cls(*args, **kwargs)
    assert isinstance(fast, ref_cls), f"fastrnn.{cls_name} is not a torch.nn.{cls_name}"
    assert type(fast) is fast_cls
    assert_same_parameters(ref, fast)
    if dtype is not None:
        ref.to(dtype)
        fast.to(dtype)
    return ref, fast


def make_mode_pair(mode: str, *args, **kwargs):
    """``make_pair`` for a mode name of ``MODES`` / ``CELL_MODES`` (e.g. ``"RNN_RELU"``)."""
    cls_name, extra = {**MODES, **CELL_MODES}[mode]
    return make_pair(cls_name, *args, **extra, **kwargs)


# --------------------------------------------------------------------------------------------
# comparison
# --------------------------------------------------------------------------------------------
def max_abs_diff(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def assert_close(actual, expected, name: str = "", tol: float | None = None) -> None:
    """max|actual - expected| <= tol * max(1, max|expected|); NaNs must be at the same places."""
    assert isinstance(actual, torch.Tensor), f"{name}: got {type(actual).__name__}, not a Tensor"
    assert isinstance(expected, torch.Tensor)
    assert tuple(actual.shape) == tuple(expected.shape), (
        f"{name}: shape {tuple(actual.shape)} != expected {tuple(expected.shape)}"
    )
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.device == expected.device, f"{name}: device {actual.device} != {expected.device}"
    if tol is None:
        tol = TOL.get(expected.dtype, 1e-5)
    if expected.numel() == 0:
        return
    a = actual.detach().double()
    e = expected.detach().double()
    nan_a, nan_e = torch.isnan(a), torch.isnan(e)
    assert torch.equal(nan_a, nan_e), (
        f"{name}: NaN pattern differs ({int(nan_a.sum())} NaNs vs {int(nan_e.sum())} expected)"
    )
    ok = ~nan_e
    if not bool(ok.any()):
        return
    diff = (a[ok] - e[ok]).abs()
    worst = diff.max().item()
    scale = max(1.0, e[ok].abs().max().item())
    assert worst <= tol * scale, (
        f"{name}: max|diff| = {worst:.3e} > tol {tol:.0e} * scale {scale:.3g} "
        f"(dtype {expected.dtype}, shape {tuple(expected.shape)}, "
        f"worst at flat index {int((a - e).abs().nan_to_num(0).flatten().argmax())})"
    )


def assert_results_close(fast_res: dict, ref_res: dict, tol: float | None = None) -> None:
    """Compare two dicts returned by ``run_fwd_bwd`` (fastrnn first, torch second)."""
    assert list(fast_res.keys()) == list(ref_res.keys()), (
        f"result keys differ: {list(fast_res.keys())} vs {list(ref_res.keys())}"
    )
    for key, expected in ref_res.items():
        actual = fast_res[key]
        if expected is None:
            assert actual is None, f"{key}: expected None, got {type(actual).__name__}"
        elif key in _INDEX_KEYS:
            assert actual is not None, f"{key}: got None, expected {expected}"
            assert torch.equal(actual, expected), f"{key}: {actual} != {expected}"
            assert actual.dtype == expected.dtype, f"{key}: dtype {actual.dtype}"
        else:
            assert actual is not None, f"{key}: got None (no gradient?), expected a tensor"
            assert_close(actual, expected, name=key, tol=tol)


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
def _leaf(t: torch.Tensor, requires_grad: bool) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def _snapshot(module: torch.nn.Module) -> dict:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def run_fwd_bwd(
    module: torch.nn.Module,
    x: torch.Tensor,
    hx=None,
    *,
    lengths=None,
    enforce_sorted: bool = True,
    dropout_seed: int | None = None,
    grad_seed: int = 1234,
    backward: bool = True,
    x_requires_grad: bool = True,
) -> dict:
    """Forward + backward through ``module`` and return everything worth comparing.

    ``x`` (and ``hx``: a tensor or an ``(h0, c0)`` tuple) are copied into fresh leaves.
    With ``lengths``, ``x`` is the padded input and is packed here with
    ``pack_padded_sequence`` (so the input gradient is the one of the padded tensor).
    ``dropout_seed``: ``torch.manual_seed`` right before the forward call.
    The loss includes the output and all final states, each weighted by random tensors
    drawn from a private generator seeded with ``grad_seed`` (so torch and fastrnn get
    the same weights). Returns an ordered dict: ``y`` (``.data`` for packed output, plus
    ``batch_sizes``/``sorted_indices``/``unsorted_indices``), ``h``, ``c`` (LSTM), and
    ``grad_x``, ``grad_h0``, ``grad_c0``, ``grad_<param name>`` for every parameter.

    Also checks that the call modified neither the inputs nor the parameters in place.
    """
    params_before = _snapshot(module)
    x_leaf = _leaf(x, backward and x_requires_grad)
    if hx is None:
        hx_leaves = None
    elif isinstance(hx, tuple | list):
        hx_leaves = tuple(_leaf(h, backward) for h in hx)
    else:
        hx_leaves = _leaf(hx, backward)
    hx_inputs = [] if hx_leaves is None else list(_as_tuple(hx_leaves))
    inputs_before = [t.detach().clone() for t in [x_leaf, *hx_inputs]]

    inp = x_leaf
    if lengths is not None:
        inp = pack_padded_sequence(
            x_leaf,
            torch.as_tensor(lengths, dtype=torch.int64),
            batch_first=getattr(module, "batch_first", False),
            enforce_sorted=enforce_sorted,
        )
    if backward:
        module.zero_grad(set_to_none=True)
    if dropout_seed is not None:
        torch.manual_seed(dropout_seed)
    out = module(inp) if hx_leaves is None else module(inp, hx_leaves)

    res: dict = {}
    if isinstance(module, torch.nn.RNNCellBase):
        states = out
    else:
        assert isinstance(out, tuple) and len(out) == 2, f"module returned {type(out)}"
        y, states = out
        if isinstance(y, PackedSequence):
            assert isinstance(inp, PackedSequence), "PackedSequence output for a tensor input"
            res["y"] = y.data
            res["batch_sizes"] = y.batch_sizes
            res["sorted_indices"] = y.sorted_indices
            res["unsorted_indices"] = y.unsorted_indices
        else:
            assert not isinstance(inp, PackedSequence), "tensor output for a PackedSequence input"
            res["y"] = y
    if isinstance(states, tuple):
        assert len(states) == 2, f"expected (h, c), got a tuple of {len(states)}"
        res["h"], res["c"] = states
    else:
        res["h"] = states

    if backward:
        gen = torch.Generator().manual_seed(grad_seed)
        loss = 0
        for key in ("y", "h", "c"):
            if key in res:
                t = res[key]
                w = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
                loss = loss + (t * w).sum()
        loss.backward()
        res["grad_x"] = x_leaf.grad if x_requires_grad else None
        names = ("grad_h0", "grad_c0")
        for name, leaf in zip(names, hx_inputs, strict=False):
            res[name] = leaf.grad
        for name, p in module.named_parameters():
            res["grad_" + name] = p.grad

    for n, p in module.named_parameters():
        assert torch.equal(p.detach(), params_before[n]), f"parameter {n} was modified in place"
    for before, t in zip(inputs_before, [x_leaf, *hx_inputs], strict=True):
        assert torch.equal(before, t.detach()), "an input tensor was modified in place"
    return res


def _as_tuple(hx):
    return tuple(hx) if isinstance(hx, tuple | list) else (hx,)


def compare_modules(ref, fast, x, hx=None, tol=None, **kwargs) -> tuple[dict, dict]:
    """Run ``run_fwd_bwd`` on both modules with the same arguments and compare everything."""
    ref_res = run_fwd_bwd(ref, x, hx, **kwargs)
    fast_res = run_fwd_bwd(fast, x, hx, **kwargs)
    assert_results_close(fast_res, ref_res, tol=tol)
    return fast_res, ref_res


def assert_same_bits_for_thread_counts(model, x, lengths, monkeypatch, seed=None) -> None:
    """1, 2 and 4 kernel threads give the same bits: output, final states and every gradient of
    `model` on x packed to `lengths` (unsorted); `seed` reseeds torch's RNG before each call
    (modules that draw masks)."""
    from fastrnn import recurrence_cpu

    results = []
    for threads in (1, 2, 4):
        monkeypatch.setattr(recurrence_cpu, "_threads", lambda threads=threads: threads)
        model.zero_grad()
        packed = pack_padded_sequence(x, lengths, enforce_sorted=False)
        if seed is not None:
            torch.manual_seed(seed)
        out, state = model(packed)
        states = state if isinstance(state, tuple) else (state,)
        (out.data.sum() + sum(s.square().sum() for s in states)).backward()
        results.append([out.data, *states, *(p.grad.clone() for p in model.parameters())])
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


def capture_exception(fn):
    """Call ``fn`` and return ``(type, message)`` of what it raised, or ``None``."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - we compare whatever was raised
        return type(exc), str(exc)
    return None


@pytest.fixture
def wide_tile_fusing(monkeypatch):
    """The fusing rule as on an AVX-512 CPU: it fuses only with the wide tiles
    (`kernels.cpu.common.fuses_input_projection`), and the fused kernels are tested on every CPU."""
    import functools

    import fastrnn.recurrence_cpu as recurrence_cpu
    from fastrnn.kernels.cpu.common import fuses_input_projection

    monkeypatch.setattr(
        recurrence_cpu,
        "_fuses_input_projection",
        functools.partial(fuses_input_projection, wide_tiles=True),
    )


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    """Every reused buffer fastrnn hands out (`fastrnn.scratch`) starts as NaN, so a kernel
    that reads an element it never wrote fails the test instead of reading stale values."""
    import fastrnn.scratch

    monkeypatch.setattr(fastrnn.scratch, "POISON", True)
