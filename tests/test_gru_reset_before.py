"""The "reset before" GRU (`fastrnn.GRU(..., reset="before")`, `GRUCell` too): the kernels
against the plain-torch reference (`cells.gru_reset_before_step`) over the GRU parity grid,
gradcheck and gradgradcheck in float64, bitwise equal results for any thread count, and the
option itself (constructor, repr, state_dict, convert, bad values, the README example)."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_bits_for_thread_counts, compare_modules
from parity_grid import F64, make_inputs, module_grid, packed_grid

import fastrnn
from fastrnn.autograd import LayerFunction, apply_layer
from fastrnn.cells import gru_reset_before_step


class ReferenceGRU(fastrnn.GRU):
    """fastrnn.GRU's argument handling with every layer on the plain-torch reference."""

    def _fallback_reason(self, input, weights, hx):
        return "reference"


class ReferenceGRUCell(fastrnn.GRUCell):
    """fastrnn.GRUCell's argument handling with the plain-torch reference step."""

    def _fallback_reason(self, input, weights, hx):
        return "reference"


def _pair(cls, *args, dtype=None, **kwargs):
    torch.manual_seed(0)
    ref = ReferenceGRU(*args, reset="before", **kwargs)
    torch.manual_seed(0)
    fast = fastrnn.GRU(*args, reset="before", **kwargs)
    if dtype is not None:
        ref.to(dtype)
        fast.to(dtype)
    return ref, fast


@pytest.mark.parametrize("c", module_grid("GRU"))
def test_matches_the_reference(c):
    ref, fast = _pair(
        fastrnn.GRU, c["I"], c["H"], num_layers=c["layers"], bias=c["bias"],
        batch_first=c["batch_first"], bidirectional=c["bidirectional"], dtype=c["dtype"],
    )  # fmt: skip
    x, hx = make_inputs(
        "GRU", T=c["T"], B=c["B"], I=c["I"], H=c["H"], layers=c["layers"],
        bidirectional=c["bidirectional"], batch_first=c["batch_first"],
        unbatched=c["inp"] == "unbatched", hx=c["hx"], dtype=c["dtype"],
    )  # fmt: skip
    compare_modules(ref, fast, x, hx)


@pytest.mark.parametrize("c", packed_grid("GRU"))
def test_packed_matches_the_reference(c):
    ref, fast = _pair(
        fastrnn.GRU, 4, 5, num_layers=c["layers"], bias=c["bias"],
        batch_first=c["batch_first"], bidirectional=c["bidirectional"], dtype=c["dtype"],
    )  # fmt: skip
    x, hx = make_inputs(
        "GRU", T=c["T"], B=len(c["lengths"]), I=4, H=5, layers=c["layers"],
        bidirectional=c["bidirectional"], batch_first=c["batch_first"], hx=c["hx"],
        dtype=c["dtype"],
    )  # fmt: skip
    compare_modules(ref, fast, x, hx, lengths=c["lengths"], enforce_sorted=c["enforce_sorted"])


@pytest.mark.parametrize("batch, hx", [(1, True), (3, False), (6, True)])
def test_cell_matches_the_reference(batch, hx):
    """GRUCell(reset="before"), batched and unbatched, hx given or not."""
    torch.manual_seed(0)
    ref = ReferenceGRUCell(4, 5, reset="before")
    torch.manual_seed(0)
    fast = fastrnn.GRUCell(4, 5, reset="before")
    x = torch.randn(batch, 4)
    state = 0.5 * torch.randn(batch, 5) if hx else None
    compare_modules(ref, fast, x, state)
    compare_modules(ref, fast, x[0], None if state is None else state[0])


def _layer_args(T, B, I, H, D, bias, packed, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = np.array([B] * T, dtype=np.int64)
    if packed:
        sizes = np.array(sorted([B] + [1 + (3 * t) % B for t in range(T - 1)], reverse=True))
    n = int(sizes.sum())

    def leaf(*shape):
        return (0.5 * torch.randn(shape, generator=g, dtype=F64)).requires_grad_()

    b_ih, b_hh = (leaf(D, 3 * H), leaf(D, 3 * H)) if bias else (None, None)
    return leaf(n, I), sizes, leaf(D, B, H), leaf(D, 3 * H, I), leaf(D, 3 * H, H), b_ih, b_hh


@pytest.mark.parametrize(
    "D, bias, packed", [(1, True, False), (2, True, True), (1, False, True)], ids=str
)
def test_gradcheck_and_gradgradcheck(D, bias, packed):
    """The layer Function in float64: first-order gradients from the kernels, second-order
    through the reference's graph (`autograd.double_backward_through`)."""
    x, sizes, h0, W_ih, W_hh, b_ih, b_hh = _layer_args(3, 2, 3, 4, D, bias, packed)

    def layer(x, h0, W_ih, W_hh, *biases):
        b = biases if bias else (None, None)
        args = ("gru_reset_before", x, sizes, h0, None, W_ih, W_hh, *b, None)
        return apply_layer(LayerFunction, *args)

    inputs = [x, h0, W_ih, W_hh, *((b_ih, b_hh) if bias else ())]
    assert torch.autograd.gradcheck(layer, inputs)
    assert torch.autograd.gradgradcheck(layer, inputs)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cell_gradcheck_and_gradgradcheck(bias):
    """The one-step cell Function (torch GEMMs around the fused gate math) in float64."""
    from fastrnn.cell_functions import CellFunction

    x, _, h0, W_ih, W_hh, b_ih, b_hh = _layer_args(1, 3, 3, 4, 1, bias, False, seed=1)
    inputs = [x, h0[0], W_ih[0], W_hh[0], *((b_ih[0], b_hh[0]) if bias else ())]

    def step(x, h, W_ih, W_hh, *biases):
        b = biases if bias else (None, None)
        return apply_layer(CellFunction, "gru_reset_before", x, h, None, W_ih, W_hh, *b)

    assert torch.autograd.gradcheck(step, inputs)
    assert torch.autograd.gradgradcheck(step, inputs)


@pytest.mark.parametrize("batch", [1, 3, 9, 33])
@pytest.mark.parametrize("directions", [1, 2])
def test_thread_counts_give_bitwise_equal_results(batch, directions, monkeypatch, wide_tile_fusing):
    """As the other cells (test_kernels.py): row chunks, at batch 1 an owner and helpers sharing
    both per-step products (hidden 190: enough weights for helpers), the fused input product
    from batch 9 with the wide tiles' rule, more chunks than threads at packed batch 33."""

    torch.manual_seed(0)
    model = fastrnn.GRU(5, 190, num_layers=2, bidirectional=directions == 2, reset="before")
    lengths = torch.tensor([6, 4, 5] + [1 + (5 * i) % 6 for i in range(batch - 3)])[:batch]
    x = torch.randn(6, batch, 5)
    assert_same_bits_for_thread_counts(model, x, lengths, monkeypatch)


def test_the_option():
    """torch's parameters and initialisation, `reset` in the repr (only when not the default,
    so the default's repr is torch's), kept by the module, not by its state_dict (whose keys
    are torch's); a bad value raises; convert gives the default."""
    torch.manual_seed(3)
    before = fastrnn.GRU(4, 6, num_layers=2, bidirectional=True, reset="before")
    torch.manual_seed(3)
    plain = torch.nn.GRU(4, 6, num_layers=2, bidirectional=True)
    assert before.state_dict().keys() == plain.state_dict().keys()
    for (name, a), (_, b) in zip(before.named_parameters(), plain.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert before.reset == "before" and "reset='before'" in repr(before)
    assert repr(fastrnn.GRU(4, 6)) == repr(torch.nn.GRU(4, 6))
    assert repr(fastrnn.GRUCell(4, 6, reset="before")) == "GRUCell(4, 6, reset='before')"
    assert repr(fastrnn.GRUCell(4, 6)) == repr(torch.nn.GRUCell(4, 6))
    # a state_dict round trip into the same class keeps the model's results
    other = fastrnn.GRU(4, 6, num_layers=2, bidirectional=True, reset="before")
    other.load_state_dict(before.state_dict())
    x = torch.randn(5, 2, 4)
    assert torch.equal(before(x)[0], other(x)[0])
    buffer = io.BytesIO()
    torch.save(before, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert loaded.reset == "before" and torch.equal(loaded(x)[0], before(x)[0])
    assert not torch.allclose(plain(x)[0], before(x)[0])  # the forms differ
    for cls in (fastrnn.GRU, fastrnn.GRUCell):
        for bad in ("middle", None, True):
            with pytest.raises(ValueError, match="reset must be 'after' or 'before'"):
                cls(4, 6, reset=bad)
    converted = fastrnn.convert(torch.nn.Sequential(torch.nn.GRU(4, 6), torch.nn.GRUCell(4, 6)))
    assert all(m.reset == "after" for m in converted)
    assert type(converted[0]) is fastrnn.GRU and type(converted[1]) is fastrnn.GRUCell


def test_without_a_kernel_the_reference_runs(monkeypatch):
    """bfloat16 on the CPU has no kernel and torch has no such cell: the reference runs, with
    one warning that says so (once per process: the record of warnings starts empty here)."""
    monkeypatch.setattr(fastrnn.functional, "_warned", set())
    torch.manual_seed(0)
    model = fastrnn.GRU(4, 6, reset="before")
    cell = fastrnn.GRUCell(4, 6, reset="before")
    x = torch.randn(3, 2, 4)
    reference = ReferenceGRU(4, 6, reset="before")
    reference.load_state_dict(model.state_dict())
    expected = reference(x)[0].detach()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, _ = model.to(torch.bfloat16)(x.bfloat16())
        h = cell.to(torch.bfloat16)(x[0].bfloat16())
    assert y.dtype == torch.bfloat16 and h.dtype == torch.bfloat16
    assert (y.float() - expected).abs().max() < 0.05
    messages = [str(w.message) for w in caught]
    assert any("plain-torch reference" in m and "bfloat16" in m for m in messages), messages
    assert not any("torch's own" in m for m in messages), messages
    step = gru_reset_before_step(
        x[0], (torch.zeros(2, 6),), *(p.detach().float() for p in cell.parameters()), None
    )[0]
    assert (h.float() - step).abs().max() < 0.05


def test_readme_example():
    """The README's reset-before example runs as written."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "reset=" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md", "exec"), {})


def test_bench_case_compares_with_a_torch_loop():
    """`python -m bench --cells gru_reset_before`: fastrnn's module against the torch loop a
    user writes today (`bench.cases.TorchLoopResetBeforeGRU`), same weights, same results."""
    from bench import cases

    assert cases.parse_cells("gru_reset_before") == ["gru_reset_before"]
    config = cases.CaseConfig("gru_reset_before", cases.Size(4, 3, 5, 6), bidirectional=True)
    ref_cls, fast_cls = cases.torch_classes()["gru_reset_before"], cases.fastrnn_classes()[0]
    ref, fast = cases.build_modules(config, ref_cls, fast_cls["gru_reset_before"])
    assert fast.reset == "before"
    compare_modules(ref, fast, cases.InputSource(config).x)


def test_compile_and_function_transforms():
    """torch.compile(fullgraph=True) holds the layers as `fastrnn::layer` ops of the reset-before
    kind (the eager results, bitwise); torch.func's grad runs the reference, warning once."""
    torch.manual_seed(0)
    model = fastrnn.GRU(4, 6, num_layers=2, bidirectional=True, reset="before")
    x = torch.randn(5, 3, 4, requires_grad=True)
    y, h_n = model(x)
    (dx,) = torch.autograd.grad(y.sum(), x)
    y_c, h_c = torch.compile(model, fullgraph=True)(x)
    (dx_c,) = torch.autograd.grad(y_c.sum(), x)
    assert torch.equal(y, y_c) and torch.equal(h_n, h_c) and torch.equal(dx, dx_c)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dx_f = torch.func.grad(lambda v: model(v)[0].sum())(x.detach())
    assert any("plain-torch reference" in str(w.message) for w in caught)
    torch.testing.assert_close(dx_f, dx)


def _simulated_cuda() -> bool:
    import numba

    try:
        from fastrnn import recurrence_cuda  # noqa: F401
    except ImportError:
        return False
    return bool(numba.config.ENABLE_CUDASIM)


@pytest.mark.cudasim
@pytest.mark.skipif(not _simulated_cuda(), reason="needs numba-cuda and NUMBA_ENABLE_CUDASIM=1")
@pytest.mark.parametrize(
    "dtype, lengths, bidirectional, cell",
    [(F64, None, True, False), (F64, [3, 1], False, False), (torch.float16, None, False, True)],
    ids=["f64-bi", "f64-packed", "f16-cell"],
)
def test_cuda_path_matches_the_reference(dtype, lengths, bidirectional, cell, monkeypatch):
    """The CUDA path (`recurrence_cuda._gated_forward` / `_gated_backward`, the stepwise gated
    kernels) on CPU tensors under Numba's simulator, as tests/test_cuda_kernels.py runs the
    other cells: float64 against the reference, float16 storage against the float32 reference
    (float32 math, 16-bit storage: float16's tolerance)."""
    import fastrnn.autograd
    from fastrnn import recurrence_cuda

    monkeypatch.setattr(fastrnn.autograd, "CUDA_KERNELS_ON_CPU", True)
    calls = []
    for name in ("_gated_forward", "_gated_backward"):
        original = getattr(recurrence_cuda, name)
        monkeypatch.setattr(
            recurrence_cuda, name, lambda *a, f=original, n=name: calls.append(n) or f(*a)
        )
    kernel_dtypes = fastrnn.functional.KERNEL_DTYPES
    monkeypatch.setitem(kernel_dtypes, "cpu", kernel_dtypes["cuda"])
    torch.manual_seed(0)
    if cell:
        ref, fast = ReferenceGRUCell(2, 3, reset="before"), fastrnn.GRUCell(2, 3, reset="before")
        x = torch.randn(2, 2)
    else:
        ref = ReferenceGRU(2, 3, bidirectional=bidirectional, reset="before")
        fast = fastrnn.GRU(2, 3, bidirectional=bidirectional, reset="before")
        x = torch.randn(3, 2, 2)
    fast.load_state_dict(ref.state_dict())
    fast.to(dtype)
    ref.to(F64 if dtype == F64 else torch.float32)
    extra = {"lengths": lengths, "enforce_sorted": False} if lengths else {}
    from conftest import assert_results_close, run_fwd_bwd

    fast_res = run_fwd_bwd(fast, x.to(dtype), **extra)
    ref_res = run_fwd_bwd(ref, x.to(ref.weight_hh_l0.dtype if not cell else torch.float32), **extra)
    if dtype != F64:
        ref_res = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                   for k, v in ref_res.items()}  # fmt: skip
    assert_results_close(fast_res, ref_res, tol=1e-2 if dtype == torch.float16 else None)
    assert {"_gated_forward", "_gated_backward"} <= set(calls)


def test_precompile_takes_the_variant_when_named():
    """`python -m fastrnn.precompile --parts gru_reset_before`: an opt-in part, never in the
    default set, grouped with the others into at most `--jobs` processes; compiling it runs."""
    from fastrnn import precompile

    assert "gru_reset_before" not in precompile.PARTS
    assert precompile._parts("gru,gru_reset_before") == ("gru", "gru_reset_before")
    assert precompile.part_groups(("gru_reset_before",), 2) == [("gru_reset_before",)]
    groups = precompile.part_groups(precompile.PARTS + ("gru_reset_before",), 2)
    assert len(groups) == 2 and sum(group.count("gru_reset_before") for group in groups) == 1
    assert set(precompile.precompile(parts=("gru_reset_before",))) == {"float32"}


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_fused_input_projection_matches_the_reference(packed, wide_tile_fusing):
    """Batches the fusing rule takes (as on an AVX-512 CPU): the input side's product runs in
    the kernel each step (`recurrence`'s x_side) instead of one GEMM before it."""
    import fastrnn.recurrence_cpu as recurrence_cpu

    ref, fast = _pair(fastrnn.GRU, 8, 16, bidirectional=True)
    x = torch.randn(4, 24, 8)
    assert recurrence_cpu.fuses_input_projection(
        np.array([24]), x, torch.zeros(1, 48, 16), torch.zeros(1, 24, 16)
    )
    lengths = [1 + (3 * i) % 4 for i in range(24)] if packed else None
    extra = {"lengths": lengths, "enforce_sorted": False} if packed else {}
    compare_modules(ref, fast, x, **extra)
