"""Recurrent dropout and zoneout (`fastrnn.recurrent_masks`, the masked CPU kernels): the layer
Function against the plain-torch reference given the same masks, the modules over the parity
grid against their reference path under the same seed, against a torch cell loop applying the
same masks, gradcheck and gradgradcheck, reproducibility, eval mode, thread counts, the
constructor's checks, the fallback and the README's example."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from conftest import assert_results_close, assert_same_bits_for_thread_counts, run_fwd_bwd
from parity_grid import LSTM_PROJ_GRID, LSTM_PROJ_PACKED, make_inputs, module_grid, packed_grid

import fastrnn
from fastrnn import recurrent_masks, reference
from fastrnn.autograd import LayerFunction
from fastrnn.cells import SPECS

F32, F64 = torch.float32, torch.float64
TOL = {F32: 2e-6, F64: 1e-12}
BATCH_SIZES = {"dense": [3, 3, 3, 3], "packed": [5, 4, 4, 2, 1, 1]}
# (recurrent dropout p, zoneout of h, zoneout of c), and whether the masks are drawn
MASKS = {
    "dropout": ((0.4, 0.0, 0.0), True),
    "zoneout": ((0.0, 0.3, 0.5), True),
    "both": ((0.3, 0.2, 0.4), True),
    "eval": ((0.0, 0.3, 0.5), False),  # zoneout's expectation: fractional d
}
LAYER_CELLS = [("lstm", 0), ("lstm", 2), ("gru", 0), ("rnn_tanh", 0), ("rnn_relu", 0)]


def _leaf(g, shape, dtype, scale=0.4):
    return (scale * torch.randn(*shape, generator=g, dtype=dtype)).requires_grad_()


def _layer_arguments(
    cell, proj, sizes, directions, dtype, rates, training, bias=True, seed=0, hidden=5, inp=3
):
    """(LayerFunction's arguments with masks, the leaves): a layer of `hidden` units and
    `inp` inputs."""
    spec = SPECS[cell]
    D = directions
    P = proj or hidden
    rows = spec.gates * hidden
    g = torch.Generator().manual_seed(seed)
    x = _leaf(g, (sum(sizes), inp), dtype, 1.0)
    h0 = _leaf(g, (D, sizes[0], P), dtype, 0.5)
    c0 = _leaf(g, (D, sizes[0], hidden), dtype, 0.5) if spec.states == 2 else None
    W_ih, W_hh = _leaf(g, (D, rows, inp), dtype), _leaf(g, (D, rows, P), dtype)
    b_ih = _leaf(g, (D, rows), dtype) if bias else None
    b_hh = _leaf(g, (D, rows), dtype) if bias else None
    W_hr = _leaf(g, (D, P, hidden), dtype) if proj else None
    torch.manual_seed(seed)
    masks = recurrent_masks.layer_masks(
        cell, sum(sizes), sizes[0], D, P, hidden, rates, training, x.detach()
    )
    sizes = np.array(sizes, dtype=np.int64)
    arguments = (cell, x, sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, None, *masks)
    leaves = [t for t in (x, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr) if t is not None]
    return arguments, leaves


def _compare(fast_out, ref_out, leaves, dtype):
    """Outputs and every leaf's gradient, for one random cotangent on every output."""
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g, dtype=dtype) for o in ref_out]
    results = []
    for outs in (fast_out, ref_out):
        loss = sum((o * c).sum() for o, c in zip(outs, cotangents, strict=True))
        results.append([*outs, *torch.autograd.grad(loss, leaves)])
    for fast, ref in zip(*results, strict=True):
        err = (fast - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err <= TOL[dtype], err


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("directions", [1, 2], ids=["uni", "bi"])
@pytest.mark.parametrize("layout", list(BATCH_SIZES))
@pytest.mark.parametrize("masks", list(MASKS))
@pytest.mark.parametrize("cell, proj", LAYER_CELLS, ids=[f"{c}-proj{p}" for c, p in LAYER_CELLS])
def test_layer_function_with_masks_matches_reference(cell, proj, masks, layout, directions, dtype):
    """`LayerFunction` with masks against `reference.layer` with the same masks: outputs,
    final states and every gradient."""
    rates, training = MASKS[masks]
    arguments, leaves = _layer_arguments(
        cell, proj, BATCH_SIZES[layout], directions, dtype, rates, training
    )
    _compare(LayerFunction.apply(*arguments), reference.layer(*arguments), leaves, dtype)


def test_masks_mean_what_they_say():
    """Semantics on the kernels, checked without the reference: a mask of ones changes
    nothing (dropout) and zoneout of ones keeps h0 (and c0) for ever; a unit whose dropout mask
    is 0 never reaches the recurrence, at any step, so its column of W_hh has no effect."""
    sizes = [3, 3, 3, 3]
    for cell in ("lstm", "gru", "rnn_tanh"):
        arguments, _ = _layer_arguments(cell, 0, sizes, 1, F64, (0.0, 0.0, 0.0), True)
        plain = LayerFunction.apply(*arguments[:10])
        h0, c0, W_hh = arguments[3], arguments[4], arguments[6]
        ones = torch.ones_like(h0)
        masked = LayerFunction.apply(*arguments[:10], None, ones, None, None)
        for a, b in zip(masked, plain, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)
        keep = torch.ones(1, sum(sizes), h0.shape[2], dtype=F64)
        keep_c = keep if cell == "lstm" else None
        y, h_n, *c_n = LayerFunction.apply(*arguments[:10], None, None, keep, keep_c)
        assert torch.equal(y, h0[0].repeat(len(sizes), 1)) and torch.equal(h_n, h0)
        if cell == "lstm":
            assert torch.equal(c_n[0], c0)
        mask = torch.ones_like(h0)
        mask[..., 2] = 0
        before = LayerFunction.apply(*arguments[:10], None, mask, None, None)
        changed = W_hh.detach().clone()
        changed[..., 2] += 1.0
        after = LayerFunction.apply(
            *arguments[:6], changed, *arguments[7:10], None, mask, None, None
        )
        for a, b in zip(after, before, strict=True):
            assert torch.equal(a, b)
        unmasked = LayerFunction.apply(*arguments[:6], changed, *arguments[7:10])
        assert not torch.equal(unmasked[0], plain[0])  # without the mask, the column matters


GRAD_CASES = [
    ("lstm", 0, "packed", 2),
    ("lstm", 2, "dense", 1),
    ("gru", 0, "packed", 2),
    ("rnn_tanh", 0, "dense", 2),
]


@pytest.mark.parametrize("masks", ["both", "eval"])
@pytest.mark.parametrize("cell, proj, layout, directions", GRAD_CASES)
def test_gradcheck_and_gradgradcheck_with_fixed_masks(cell, proj, layout, directions, masks):
    """float64 gradcheck and gradgradcheck of `LayerFunction` with fixed masks (the double
    backward runs the reference with them); tiny, as gradgradcheck perturbs every input."""
    rates, training = MASKS[masks]
    sizes = [3, 2, 1] if layout == "packed" else [2, 2]
    arguments, leaves = _layer_arguments(
        cell, proj, sizes, directions, F64, rates, training, hidden=3, inp=2
    )
    positions = [i for i, a in enumerate(arguments) if any(a is leaf for leaf in leaves)]

    def function(*tensors):
        given = list(arguments)
        for i, t in zip(positions, tensors, strict=True):
            given[i] = t
        return LayerFunction.apply(*given)

    assert torch.autograd.gradcheck(function, leaves)
    assert torch.autograd.gradgradcheck(function, leaves)


def _module(mode: str, c: dict, rates: dict, dtype=None):
    """fastrnn's module of parity-grid configuration c (torch's initialisation, seed 0), with
    dropout between layers and the opt-in masks `rates`."""
    cls = {"LSTM": fastrnn.LSTM, "GRU": fastrnn.GRU}.get(mode, fastrnn.RNN)
    extra = {"nonlinearity": "relu"} if mode == "RNN_RELU" else {}
    if c.get("proj"):
        extra["proj_size"] = c["proj"]
    torch.manual_seed(0)
    return cls(
        c.get("I", 4), c.get("H", 5), num_layers=c["layers"], bias=c["bias"],
        batch_first=c["batch_first"], bidirectional=c["bidirectional"],
        dropout=0.25 if c["layers"] > 1 else 0.0, dtype=dtype or c["dtype"], **extra, **rates,
    )  # fmt: skip


def _rates(mode: str) -> dict:
    return {"recurrent_dropout": 0.3, "zoneout": (0.2, 0.4) if mode == "LSTM" else 0.25}


def _against_reference(module, monkeypatch, x, hx, **kwargs) -> None:
    """The module on the kernels against the module on `reference.layer` (its fallback), the
    same seed before each: outputs, states and every gradient."""
    fast = run_fwd_bwd(module, x, hx, dropout_seed=7, **kwargs)
    with monkeypatch.context() as patch, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch.setattr(recurrent_masks, "_kernel_reason", lambda *args: "the test asks for it")
        ref = run_fwd_bwd(module, x, hx, dropout_seed=7, **kwargs)
    assert_results_close(fast, ref)


GRID = [
    p
    for mode in ("LSTM", "GRU", "RNN_TANH", "RNN_RELU")
    for p in module_grid(mode)[:8] + (LSTM_PROJ_GRID[:4] if mode == "LSTM" else [])
]
PACKED = [
    p
    for mode in ("LSTM", "GRU", "RNN_TANH")
    for p in packed_grid(mode)[:4] + (LSTM_PROJ_PACKED[:2] if mode == "LSTM" else [])
]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("c", GRID)
def test_module_with_masks_matches_reference(c, training, monkeypatch):
    """The parity grid (layers, directions, batch_first, bias, unbatched, hx, projection,
    one-step sequences) with recurrent dropout and zoneout, kernels against reference."""
    mode = c["mode"]
    module = _module(mode, c, _rates(mode)).train(training)
    x, hx = make_inputs(
        mode, T=c["T"], B=c["B"], I=c["I"], H=c["H"], layers=c["layers"],
        bidirectional=c["bidirectional"], proj=c["proj"], batch_first=c["batch_first"],
        unbatched=c["inp"] == "unbatched", hx=c["hx"], dtype=c["dtype"],
    )  # fmt: skip
    _against_reference(module, monkeypatch, x, hx)


@pytest.mark.parametrize("c", PACKED)
def test_packed_module_with_masks_matches_reference(c, monkeypatch):
    mode = c["mode"]
    module = _module(mode, c, _rates(mode))
    x, hx = make_inputs(
        mode, T=c["T"], B=len(c["lengths"]), I=4, H=5, layers=c["layers"],
        bidirectional=c["bidirectional"], proj=c["proj"], batch_first=c["batch_first"],
        hx=c["hx"], dtype=c["dtype"],
    )  # fmt: skip
    _against_reference(
        module, monkeypatch, x, hx, lengths=c["lengths"], enforce_sorted=c["enforce_sorted"]
    )


def _cell_loop(cell, x, h, c, h_mask, zone_h, zone_c):
    """What users write today: an nn.LSTMCell loop applying the masks by hand."""
    outputs = []
    for t in range(x.shape[0]):
        h_new, c_new = cell(x[t], (h * h_mask, c))
        c = zone_c[t] * c + (1 - zone_c[t]) * c_new
        h = zone_h[t] * h + (1 - zone_h[t]) * h_new
        outputs.append(h)
    return torch.stack(outputs), h, c


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_lstm_matches_a_cell_loop_with_the_same_masks(training):
    """fastrnn.LSTM against torch.nn.LSTMCell stepped in Python with the masks drawn as the
    module draws them (`recurrent_masks.layer_masks`, same seed): the definitions, checked
    without fastrnn's reference. In eval: no dropout, zoneout's expectation."""
    T, B, I, H = 6, 3, 4, 5
    torch.manual_seed(0)
    module = fastrnn.LSTM(I, H, recurrent_dropout=0.3, zoneout=(0.2, 0.4)).train(training)
    cell = torch.nn.LSTMCell(I, H)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(cell, name).data.copy_(getattr(module, f"{name}_l0"))
    x = torch.randn(T, B, I)
    torch.manual_seed(3)
    y, (h_n, c_n) = module(x)
    torch.manual_seed(3)
    h_mask, zone_h, zone_c = recurrent_masks.layer_masks(
        "lstm", T * B, B, 1, H, H, module._mask_rates(), training, x
    )
    if h_mask is None:
        h_mask = torch.ones(1, B, H)
    zeros = torch.zeros(B, H)
    ref_y, ref_h, ref_c = _cell_loop(
        cell, x, zeros, zeros, h_mask[0], zone_h[0].view(T, B, H), zone_c[0].view(T, B, H)
    )
    torch.testing.assert_close(y, ref_y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h_n[0], ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(c_n[0], ref_c, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN"])
def test_seed_reproduces_masks_and_eval_is_deterministic(mode):
    """The same seed gives the same result bit for bit, another seed another; in eval
    recurrent dropout is off (the plain module's result exactly) and zoneout deterministic."""
    cls = getattr(fastrnn, mode)
    torch.manual_seed(0)
    module = cls(4, 6, num_layers=2, recurrent_dropout=0.4, zoneout=0.3)
    torch.manual_seed(0)
    dropout_only = cls(4, 6, num_layers=2, recurrent_dropout=0.4)
    torch.manual_seed(0)
    plain = cls(4, 6, num_layers=2)
    x = torch.randn(5, 3, 4)
    runs = []
    for seed in (1, 1, 2):
        torch.manual_seed(seed)
        runs.append(module(x)[0])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    module.eval(), dropout_only.eval(), plain.eval()
    assert torch.equal(module(x)[0], module(x)[0])
    assert not torch.equal(module(x)[0], plain(x)[0])
    assert torch.equal(dropout_only(x)[0], plain(x)[0])
    dropout_only.train(), plain.train()
    assert not torch.equal(dropout_only(x)[0], plain(x)[0])


@pytest.mark.parametrize("cell", ["LSTM", "LSTM-proj", "GRU", "RNN", "RNN-units"])
@pytest.mark.parametrize("batch", [1, 9, 33])
def test_thread_counts_give_bitwise_equal_results_with_masks(
    cell, batch, monkeypatch, wide_tile_fusing
):
    """The masked kernels under every work split of `test_kernels`' thread test (row chunks,
    batch-1 helpers, the RNN's unit split, more chunks than threads, the fused input
    projection at batch 9 and 33): 1, 2 and 4 threads give the same bits."""

    kind, _, variant = cell.partition("-")
    kwargs = {"proj_size": 64} if variant == "proj" else {}
    hidden = 192 if variant == "units" else 190
    torch.manual_seed(0)
    model = getattr(fastrnn, kind)(
        5, hidden, bidirectional=True, recurrent_dropout=0.3, zoneout=0.2, **kwargs
    )
    lengths = torch.tensor([6, 4, 5] + [1 + (5 * i) % 6 for i in range(batch - 3)])[:batch]
    x = torch.randn(6, batch, 5)
    assert_same_bits_for_thread_counts(model, x, lengths, monkeypatch, seed=5)


def test_constructor_checks_rates_and_repr_shows_them():
    for cls in (fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN):
        for bad in (
            {"recurrent_dropout": 1.0},
            {"recurrent_dropout": -0.1},
            {"recurrent_dropout": "0.1"},
            {"zoneout": 1},
            {"zoneout": float("nan")},
            {"zoneout": True},
        ):
            with pytest.raises(ValueError, match="should be a number in"):
                cls(3, 4, **bad)
        torch.manual_seed(0)
        plain = cls(3, 4)
        torch.manual_seed(0)
        zero = cls(3, 4, recurrent_dropout=0.0, zoneout=0.0)
        torch_class = getattr(torch.nn, cls.__name__)
        assert repr(zero) == repr(plain) == repr(torch_class(3, 4))
        x = torch.randn(4, 2, 3)
        assert torch.equal(zero(x)[0], plain(x)[0])
    with pytest.raises(ValueError, match="zoneout"):
        fastrnn.GRU(3, 4, zoneout=(0.1, 0.2))
    with pytest.raises(ValueError, match="pair"):
        fastrnn.LSTM(3, 4, zoneout=(0.1, 0.2, 0.3))
    with pytest.raises(ValueError, match=r"zoneout\[1\]"):
        fastrnn.LSTM(3, 4, zoneout=(0.1, 1.5))
    shown = repr(fastrnn.LSTM(3, 4, recurrent_dropout=0.25, zoneout=(0.1, 0.2)))
    assert shown == "LSTM(3, 4, recurrent_dropout=0.25, zoneout=(0.1, 0.2))"
    assert repr(fastrnn.GRU(3, 4, zoneout=0.1)) == "GRU(3, 4, zoneout=0.1)"


def test_inputs_without_kernels_run_the_reference_with_a_warning(monkeypatch):
    """float16 on the CPU has no masked kernel (nor does torch.nn have masks): the reference
    runs, with one warning, and gives what the reference gives in float64 with the same masks,
    to float16 rounding."""
    from fastrnn import functional

    monkeypatch.setattr(functional, "_warned", set())
    torch.manual_seed(0)
    module = fastrnn.GRU(4, 5, zoneout=0.2, recurrent_dropout=0.3)
    x = torch.randn(5, 2, 4)
    weights = [w.detach().double() for w in module._flat_weights]
    torch.manual_seed(1)
    masks = recurrent_masks.layer_masks("gru", 10, 2, 1, 5, 5, (0.3, 0.2, 0.2), True, x.half())
    sizes = np.full(5, 2, dtype=np.int64)
    h0 = torch.zeros(1, 2, 5, dtype=F64)
    expected = reference.layer(
        "gru", x.double().view(10, 4), sizes, h0, None, *weights, None, None,
        *(None if m is None else m.double() for m in masks),
    )[0].view(5, 2, 5)  # fmt: skip
    module.half()
    with pytest.warns(UserWarning, match="no CPU kernel for torch.float16"):
        torch.manual_seed(1)
        half = module(x.half())[0]
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.double(), expected, rtol=0, atol=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        module(x.half())  # once


def test_torchscript_refuses_masked_modules():
    with pytest.raises(RuntimeError, match="recurrent dropout or zoneout"):
        torch.jit.script(fastrnn.LSTM(3, 4, zoneout=0.1))


def test_readme_example_runs():
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "zoneout" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md", "exec"), {})


SIM_CASES = [
    ("lstm", 0, "packed", 2),
    ("lstm", 2, "dense", 1),
    ("gru", 0, "packed", 2),
    ("rnn_tanh", 0, "dense", 2),
    ("rnn_relu", 0, "packed", 1),
]


@pytest.mark.cudasim
@pytest.mark.skipif(not numba.config.ENABLE_CUDASIM, reason="needs Numba's CUDA simulator")
@pytest.mark.parametrize("masks", ["both", "dropout", "eval"])
@pytest.mark.parametrize("cell, proj, layout, directions", SIM_CASES)
def test_cuda_masked_kernels_match_reference_under_the_simulator(
    cell, proj, layout, directions, masks, monkeypatch
):
    """The CUDA stepwise kernels with masks (`*_masked` in `kernels/cuda/stepwise.py`), run by
    the simulator on CPU tensors (`autograd.CUDA_KERNELS_ON_CPU`), against the reference with
    the same masks: outputs, final states, every gradient. float64, tiny sizes."""
    import fastrnn.autograd

    monkeypatch.setattr(fastrnn.autograd, "CUDA_KERNELS_ON_CPU", True)
    rates, training = MASKS[masks]
    sizes = [3, 2, 2] if layout == "packed" else [2, 2, 2]
    arguments, leaves = _layer_arguments(cell, proj, sizes, directions, F64, rates, training)
    _compare(LayerFunction.apply(*arguments), reference.layer(*arguments), leaves, F64)


@pytest.mark.cudasim
@pytest.mark.skipif(not numba.config.ENABLE_CUDASIM, reason="needs Numba's CUDA simulator")
def test_cuda_path_of_a_module_with_masks_under_the_simulator(monkeypatch):
    """A two-layer bidirectional LSTM with a projection on packed input, through the CUDA
    launcher under the simulator, against its reference path with the same seed."""
    import fastrnn.autograd

    monkeypatch.setattr(fastrnn.autograd, "CUDA_KERNELS_ON_CPU", True)
    c = {"layers": 2, "bias": True, "batch_first": False, "bidirectional": True, "proj": 2}
    module = _module("LSTM", {**c, "I": 2, "H": 3}, _rates("LSTM"), dtype=F64)
    x, hx = make_inputs("LSTM", T=3, B=2, I=2, H=3, layers=2, bidirectional=True, proj=2,
                        hx=True, dtype=F64)  # fmt: skip
    _against_reference(module, monkeypatch, x, hx, lengths=[3, 2], enforce_sorted=False)


def test_masks_benchmark_runs(capsys):
    """`python -m bench.masks` at a tiny size: every cell's loop with the same masks agrees
    with fastrnn (it refuses to time otherwise), and the timings print."""
    from bench import masks

    assert masks.main(["--sizes", "4,2,3,5", "--calls", "1", "--reps", "1"]) == 0
    out = capsys.readouterr().out
    assert "parity failed" not in out
    for kind in ("lstm", "gru", "rnn"):
        assert f"\n{kind} " in out


def test_precompile_compiles_the_masked_kernels_only_when_named(capsys):
    from fastrnn.precompile import PARTS, main, part_groups

    assert "masks" not in PARTS
    assert part_groups((*PARTS, "masks"), 2) == [("lstm", "cells", "masks"), ("gru", "rnn")]
    assert part_groups(("masks",), 2) == [("masks",)]
    assert main(["--jobs", "1", "--parts", "masks", "float64"]) == 0
    assert "float64: ready" in capsys.readouterr().out


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_runs_a_masked_module_eagerly(training):
    """torch.compile has no op with masks: the module runs eagerly behind a graph break, with
    the same draws as outside compile."""
    torch.manual_seed(0)
    module = fastrnn.LSTM(4, 6, recurrent_dropout=0.3, zoneout=0.2).train(training)
    x = torch.randn(5, 2, 4)
    compiled = torch.compile(module)
    torch.manual_seed(1)
    eager = module(x)[0]
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dynamo's note on the cached eager wrapper
        assert torch.equal(compiled(x)[0], eager)
