"""Parity of fastrnn.LSTM/GRU/RNN and the cells with torch.nn, with identical weights, across
what every cell shares: dropout, no_grad, frozen parameters, cells, plain paths, fused
projections, shared products (each op's own grid: test_lstm.py, test_gru.py, test_rnn.py).

Every comparison covers the output, the final states, and the gradients of the input,
h0, c0 and every named parameter (see ``conftest.run_fwd_bwd``).
"""

from __future__ import annotations

import pytest
import torch
from conftest import (
    MODES,
    assert_close,
    assert_results_close,
    compare_modules,
    make_mode_pair,
    run_fwd_bwd,
)
from parity_grid import make_case, make_inputs

import fastrnn

F32, F64 = torch.float32, torch.float64
ALL_MODES = list(MODES)


# ---------------------------------------------------------------------------------------------
# dropout, train / eval, no_grad
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "mode,layers,bidirectional,packed,dtype",
    [
        pytest.param("LSTM", 3, True, False, F32, id="LSTM-L3-bi"),
        pytest.param("GRU", 2, False, False, F32, id="GRU-L2-uni"),
        pytest.param("RNN_TANH", 3, False, False, F64, id="RNN_TANH-L3-uni-f64"),
        pytest.param("RNN_RELU", 2, True, False, F32, id="RNN_RELU-L2-bi"),
        pytest.param("LSTM", 2, True, True, F32, id="LSTM-L2-bi-packed"),
        pytest.param("GRU", 3, True, True, F64, id="GRU-L3-bi-packed-f64"),
    ],
)
def test_dropout_training_reproducible(mode, layers, bidirectional, packed, dtype):
    """Same manual_seed right before forward -> bit-for-bit the same dropout masks as torch."""
    ref, fast = make_mode_pair(
        mode, 4, 5, num_layers=layers, bidirectional=bidirectional, dropout=0.5, dtype=dtype
    )
    assert ref.training and fast.training
    x, hx = make_inputs(mode, layers=layers, bidirectional=bidirectional, hx=True, dtype=dtype)
    kw = dict(lengths=[5, 2, 4], enforce_sorted=False) if packed else {}
    fast_res, ref_res = compare_modules(ref, fast, x, hx, dropout_seed=7, **kw)
    # the test is only meaningful if dropout actually changed something
    ref.eval()
    eval_res = run_fwd_bwd(ref, x, hx, backward=False, **kw)
    assert not torch.allclose(eval_res["y"], ref_res["y"]), "dropout had no effect"
    # and a different seed gives a different mask in fastrnn too
    fast_res2 = run_fwd_bwd(fast, x, hx, dropout_seed=8, backward=False, **kw)
    assert not torch.allclose(fast_res2["y"], fast_res["y"]), "fastrnn ignores the RNG state"


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("mode", ALL_MODES)
def test_hidden_size_one_bidirectional_dropout(mode, packed):
    """H = 1, bidirectional: the layer outputs (N, 2) must be laid out as torch's, or the
    dropout masks between layers (drawn in memory order) differ. Found by a random sweep."""
    ref, fast = make_mode_pair(mode, 3, 1, num_layers=3, bidirectional=True, dropout=0.4)
    x, hx = make_inputs(mode, T=4, B=3, I=3, H=1, layers=3, bidirectional=True, hx=True)
    kw = dict(lengths=[4, 2, 3], enforce_sorted=False) if packed else {}
    fast_res, _ = compare_modules(ref, fast, x, hx, dropout_seed=7, **kw)
    assert fast_res["y"].is_contiguous()


@pytest.mark.parametrize("mode", ALL_MODES)
def test_dropout_eval_mode_is_deterministic(mode):
    ref, fast = make_mode_pair(mode, 4, 5, num_layers=3, bidirectional=True, dropout=0.7)
    ref.eval()
    fast.eval()
    x, hx = make_inputs(mode, layers=3, bidirectional=True, hx=True)
    # different RNG states: eval mode must not use them
    fast_a = run_fwd_bwd(fast, x, hx, dropout_seed=1)
    ref_b = run_fwd_bwd(ref, x, hx, dropout_seed=2)
    assert_results_close(fast_a, ref_b)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_train_and_eval_without_dropout(mode):
    ref, fast = make_mode_pair(mode, 4, 5, num_layers=2)
    x, hx = make_inputs(mode, layers=2, hx=True)
    train_res, _ = compare_modules(ref, fast, x, hx)
    ref.eval()
    fast.eval()
    assert not fast.training
    eval_res, _ = compare_modules(ref, fast, x, hx)
    assert_results_close(eval_res, train_res)
    ref.train()
    fast.train()
    compare_modules(ref, fast, x, hx)


@pytest.mark.parametrize(
    "mode,dtype",
    [
        pytest.param("LSTM", F32, id="LSTM-f32"),
        pytest.param("GRU", F64, id="GRU-f64"),
        pytest.param("RNN_TANH", F32, id="RNN_TANH-f32"),
        pytest.param("RNN_RELU", F64, id="RNN_RELU-f64"),
    ],
)
@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference"])
def test_forward_without_grad(mode, dtype, ctx):
    ref, fast = make_mode_pair(mode, 4, 5, num_layers=2, bidirectional=True, dtype=dtype)
    x, hx = make_inputs(mode, layers=2, bidirectional=True, hx=True, dtype=dtype)
    with ctx():
        ref_res = run_fwd_bwd(ref, x, hx, backward=False)
        fast_res = run_fwd_bwd(fast, x, hx, backward=False)
    assert_results_close(fast_res, ref_res)
    assert not fast_res["y"].requires_grad


@pytest.mark.parametrize("mode", ALL_MODES)
def test_input_without_grad_params_with_grad(mode):
    """Typical first layer: the input does not require grad, the weights do."""
    ref, fast = make_mode_pair(mode, 4, 5, num_layers=2, bidirectional=True)
    x, hx = make_inputs(mode, layers=2, bidirectional=True)
    fast_res, _ = compare_modules(ref, fast, x, hx, x_requires_grad=False)
    assert fast_res["grad_x"] is None


@pytest.mark.parametrize("mode", ALL_MODES)
def test_frozen_parameters(mode):
    """Weights with requires_grad=False: only the input / state gradients are produced."""
    ref, fast = make_mode_pair(mode, 4, 5, num_layers=2, bidirectional=True)
    for p in [*ref.parameters(), *fast.parameters()]:
        p.requires_grad_(False)
    x, hx = make_inputs(mode, layers=2, bidirectional=True, hx=True)
    fast_res, _ = compare_modules(ref, fast, x, hx)
    assert fast_res["grad_weight_ih_l0"] is None


@pytest.mark.parametrize("mode", ALL_MODES)
def test_noncontiguous_inputs(mode):
    """Strided (transposed) input and states give the same results as torch."""
    ref, fast = make_mode_pair(mode, 4, 5, num_layers=2, bidirectional=True)
    x, hx = make_inputs(mode, B=3, layers=2, bidirectional=True, hx=True, batch_first=True)
    x_nc = x.transpose(0, 1)  # (T, B, I) view of a (B, T, I) tensor

    def noncontig(t):
        return t.transpose(0, 1).contiguous().transpose(0, 1)

    hx_nc = tuple(noncontig(h) for h in hx) if isinstance(hx, tuple) else noncontig(hx)
    # run_fwd_bwd clones with preserve_format, so the strides survive
    for t in (x_nc, *(hx_nc if isinstance(hx_nc, tuple) else (hx_nc,))):
        assert not t.is_contiguous()
        assert not t.clone().is_contiguous()
    compare_modules(ref, fast, x_nc, hx_nc)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_repeated_calls_accumulate_grads(mode):
    """Two forward/backward passes without zero_grad accumulate into .grad like torch."""
    ref, fast = make_mode_pair(mode, 3, 4, num_layers=2)
    x1, _ = make_inputs(mode, I=3, H=4, layers=2, seed=1)
    x2, _ = make_inputs(mode, I=3, H=4, layers=2, seed=2, T=3)
    for module in (ref, fast):
        module.zero_grad(set_to_none=True)
        for x in (x1, x2):
            y, _ = module(x)
            (y * y).sum().backward()
    for (name, p_ref), (_, p_fast) in zip(
        ref.named_parameters(), fast.named_parameters(), strict=True
    ):
        assert_close(p_fast.grad, p_ref.grad, "grad_" + name)


@pytest.mark.parametrize("mode", ALL_MODES)
def test_empty_batch(mode):
    ref, fast = make_mode_pair(mode, 4, 5, num_layers=2, bidirectional=True)
    x = torch.randn(3, 0, 4)
    y_ref, h_ref = ref(x)
    y_fast, h_fast = fast(x)
    assert_close(y_fast, y_ref, "y")
    for a, b in zip(
        h_fast if isinstance(h_fast, tuple) else (h_fast,),
        h_ref if isinstance(h_ref, tuple) else (h_ref,),
        strict=True,
    ):
        assert_close(a, b, "h")


@pytest.mark.parametrize("mode", ALL_MODES)
def test_large_magnitude_inputs(mode):
    """Saturating gates (|x| ~ 30) must still match torch (no overflow/NaN in fast exp/tanh)."""
    ref, fast = make_mode_pair(mode, 4, 5, num_layers=2, bidirectional=True, dtype=F64)
    x, hx = make_inputs(mode, layers=2, bidirectional=True, hx=True, dtype=F64)
    x = x * 30
    compare_modules(ref, fast, x, hx)
    ref32, fast32 = make_mode_pair(mode, 4, 5, num_layers=2, bidirectional=True)
    compare_modules(
        ref32,
        fast32,
        x.float(),
        tuple(h.float() for h in hx) if isinstance(hx, tuple) else hx.float(),
    )


# ---------------------------------------------------------------------------------------------
# cells
# ---------------------------------------------------------------------------------------------
CELL_CASES = []
for _cell in ("LSTMCell", "GRUCell", "RNNCell_TANH", "RNNCell_RELU"):
    CELL_CASES += [
        pytest.param(_cell, True, False, True, F32, id=f"{_cell}-bias-batched-hx-f32"),
        pytest.param(_cell, False, False, False, F32, id=f"{_cell}-nobias-batched-nohx-f32"),
        pytest.param(_cell, True, True, False, F64, id=f"{_cell}-bias-unbatched-nohx-f64"),
        pytest.param(_cell, False, True, True, F32, id=f"{_cell}-nobias-unbatched-hx-f32"),
        pytest.param(_cell, True, False, True, F64, id=f"{_cell}-bias-batched-hx-f64"),
    ]


@pytest.mark.parametrize("cell,bias,unbatched,hx_given,dtype", CELL_CASES)
def test_cell_parity(cell, bias, unbatched, hx_given, dtype):
    I, H, B = 4, 5, 3
    ref, fast = make_mode_pair(cell, I, H, bias=bias, dtype=dtype)
    gen = torch.Generator().manual_seed(5)
    batch = () if unbatched else (B,)
    x = torch.randn((*batch, I), generator=gen, dtype=F64).to(dtype)
    hx = None
    if hx_given:
        h0 = torch.randn((*batch, H), generator=gen, dtype=F64).to(dtype)
        if cell == "LSTMCell":
            hx = (h0, torch.randn((*batch, H), generator=gen, dtype=F64).to(dtype))
        else:
            hx = h0
    fast_res, _ = compare_modules(ref, fast, x, hx)
    assert fast_res["h"].shape == (*batch, H)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell_TANH", "RNNCell_RELU"])
def test_cell_parity_on_both_product_paths(cell, bias):
    """Up to SMALL_BATCH rows the cell kernels compute the products themselves, from one more
    row torch's addmm does: both match torch, including every gradient, and with strided
    (non-contiguous) input and states."""
    from fastrnn.kernels.cpu.cells import SMALL_BATCH

    for B in (1, SMALL_BATCH, SMALL_BATCH + 1):
        ref, fast = make_mode_pair(cell, 6, 5, bias=bias)
        gen = torch.Generator().manual_seed(B)
        x = torch.randn(B, 12, generator=gen)[:, ::2]  # strided columns
        h = torch.randn(B, 10, generator=gen)[:, 1::2]
        hx = (h, torch.randn(B, 5, generator=gen)) if cell == "LSTMCell" else h
        assert not x.is_contiguous() and not h.is_contiguous()
        with torch.no_grad():
            got, expected = fast(x, hx), ref(x, hx)
        for a, b in zip(
            *(r if isinstance(r, tuple) else (r,) for r in (got, expected)), strict=True
        ):
            assert_close(a, b, f"B{B} strided")
        compare_modules(ref, fast, x, hx)  # (on contiguous copies) outputs and every gradient


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("batch_first", [False, True], ids=["tm", "bf"])
@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_sequence_plain_path_is_the_full_path(
    mode, bias, hx_given, batch_first, steps, monkeypatch
):
    """A one-layer, one-direction call on dense CPU input is normalised in one cheap pass
    (`functional.plain_sequence_call`), skipping the modules' full checks: it must give the
    full path's outputs, states and gradients bitwise (one step through the cell kernels,
    more through the layer kernels), and be what runs."""
    from fastrnn import modules

    _, fast = make_mode_pair(mode, 6, 5, bias=bias, batch_first=batch_first)
    gen = torch.Generator().manual_seed(steps)
    shape = (3, steps, 6) if batch_first else (steps, 3, 6)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    hx = None
    if hx_given:
        h = torch.randn(1, 3, 5, generator=gen, requires_grad=True)
        hx = (h, torch.randn(1, 3, 5, generator=gen)) if mode == "LSTM" else h

    def run():
        fast.zero_grad(set_to_none=True)
        x.grad = None
        y, final = fast(x, hx)
        finals = final if isinstance(final, tuple) else (final,)
        (y.sum() + sum(f.sum() for f in finals)).backward()
        grads = [x.grad] + [p.grad for p in fast.parameters()]
        return [y.detach(), *(f.detach() for f in finals), *grads]

    full_checks = []
    original = modules._fallback_needed
    monkeypatch.setattr(
        modules, "_fallback_needed", lambda *a: full_checks.append(1) or original(*a)
    )
    plain = run()
    assert not full_checks, "the plain call went through the full checks"
    monkeypatch.setattr(modules._SequenceForward, "_plain_call", lambda self, i, h: None)
    full = run()
    assert full_checks, "the full path didn't run"
    for a, b in zip(plain, full, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell_TANH", "RNNCell_RELU"])
def test_cell_plain_path_is_the_full_path(cell, bias, hx_given, monkeypatch):
    """A plain batched call goes straight to the cell kernels (`functional.plain_cell_call`),
    skipping the full checks: it must give the full path's results and gradients bitwise, and
    must be what runs (the full path's checks are not called)."""
    from fastrnn import functional

    _, fast = make_mode_pair(cell, 6, 5, bias=bias)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, 6, generator=gen, requires_grad=True)
    hx = None
    if hx_given:
        h = torch.randn(3, 5, generator=gen, requires_grad=True)
        hx = (h, torch.randn(3, 5, generator=gen)) if cell == "LSTMCell" else h

    def run():
        fast.zero_grad(set_to_none=True)
        x.grad = None
        out = fast(x, hx)
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.sum() for o in outs).backward()
        return [o.detach() for o in outs] + [x.grad] + [p.grad for p in fast.parameters()]

    full_checks = []
    original = functional.checked_cell
    monkeypatch.setattr(
        functional, "checked_cell", lambda *a: full_checks.append(1) or original(*a)
    )
    plain = run()
    assert not full_checks, "the plain call went through the full checks"
    monkeypatch.setattr(functional, "plain_cell_call", lambda *a: False)
    full = run()
    assert full_checks, "the full path didn't run"
    for a, b in zip(plain, full, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell_TANH", "RNNCell_RELU"])
def test_cell_unrolled_sequence(cell):
    """A cell applied step by step (the typical use) matches torch including all grads."""
    ref, fast = make_mode_pair(cell, 3, 4)
    gen = torch.Generator().manual_seed(9)
    xs = torch.randn(6, 2, 3, generator=gen)
    results = []
    for module in (ref, fast):
        module.zero_grad(set_to_none=True)
        x = xs.clone().requires_grad_(True)
        state = None
        outs = []
        for t in range(x.shape[0]):
            state = module(x[t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        loss = (torch.stack(outs) * torch.linspace(-1, 1, 8).reshape(2, 4)).sum()
        loss.backward()
        results.append([torch.stack(outs), x.grad] + [p.grad for p in module.parameters()])
    for i, (a, b) in enumerate(zip(results[1], results[0], strict=True)):
        assert_close(a, b, f"item {i}")


@pytest.mark.parametrize(
    "mode,used",
    [
        pytest.param("LSTM", "y", id="LSTM-only-y"),
        pytest.param("LSTM", "h", id="LSTM-only-h_n"),
        pytest.param("LSTM", "c", id="LSTM-only-c_n"),
        pytest.param("GRU", "h", id="GRU-only-h_n"),
        pytest.param("RNN_TANH", "y_last", id="RNN_TANH-only-y-last-step"),
        pytest.param("RNN_RELU", "h", id="RNN_RELU-only-h_n"),
    ],
)
def test_loss_on_part_of_the_outputs(mode, used):
    """Unused outputs get no (None/zero) incoming gradient: results must still match."""
    ref, fast = make_mode_pair(mode, 4, 5, num_layers=2, bidirectional=True)
    x, hx = make_inputs(mode, layers=2, bidirectional=True, hx=True)
    grads = []
    for module in (ref, fast):
        module.zero_grad(set_to_none=True)
        xl = x.clone().requires_grad_(True)
        hl = tuple(h.clone().requires_grad_(True) for h in (hx if isinstance(hx, tuple) else (hx,)))
        y, states = module(xl, hl if mode == "LSTM" else hl[0])
        states = states if isinstance(states, tuple) else (states,)
        target = {"y": y, "y_last": y[-1], "h": states[0], "c": states[-1]}[used]
        (target * torch.linspace(-2, 2, target.numel()).reshape(target.shape)).sum().backward()
        grads.append([xl.grad, *[h.grad for h in hl], *[p.grad for p in module.parameters()]])
    for i, (a, b) in enumerate(zip(grads[1], grads[0], strict=True)):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, f"grad {i}"
        else:
            assert a is not None, f"grad {i} is None"
            assert_close(a, b, f"grad {i}")


@pytest.mark.parametrize("mode", ALL_MODES)
def test_bitwise_deterministic(mode):
    """The same call twice gives bit-identical outputs and gradients."""
    _, fast = make_mode_pair(mode, 4, 5, num_layers=2, bidirectional=True)
    x, hx = make_inputs(mode, B=4, layers=2, bidirectional=True, hx=True)
    a = run_fwd_bwd(fast, x, hx, lengths=[5, 1, 3, 4], enforce_sorted=False)
    b = run_fwd_bwd(fast, x, hx, lengths=[5, 1, 3, 4], enforce_sorted=False)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_inference_results_survive_later_calls(kind):
    """Inference reuses internal buffers (`fastrnn.scratch`): what a call returned must not
    change when later calls (other sizes, other layers) run, and must match torch.nn."""
    torch.manual_seed(0)
    model = getattr(fastrnn, kind)(4, 6, num_layers=2, bidirectional=True)
    reference = getattr(torch.nn, kind)(4, 6, num_layers=2, bidirectional=True)
    reference.load_state_dict(model.state_dict())
    x1, x2 = torch.randn(5, 3, 4), torch.randn(9, 2, 4)
    with torch.no_grad():
        first = model(x1)
        kept = [t.clone() for t in torch.utils._pytree.tree_leaves(first)]
        model(x2)
        fastrnn.release_scratch_buffers()
        model(x1[:2])
        expected = reference(x1)
    for got, before, want in zip(
        torch.utils._pytree.tree_leaves(first),
        kept,
        torch.utils._pytree.tree_leaves(expected),
        strict=True,
    ):
        assert torch.equal(got, before)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
def test_inference_mode_then_no_grad_then_training(kind):
    """Reused inference buffers made under torch.inference_mode() are inference tensors; a later
    call outside it (no_grad inference, or training) must not write into them."""
    torch.manual_seed(0)
    model = getattr(fastrnn, kind)(4, 6, bidirectional=True)
    reference = getattr(torch.nn, kind)(4, 6, bidirectional=True)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(5, 2, 4)
    with torch.inference_mode():
        first = model(x)[0]
    with torch.no_grad():
        second = model(x)[0]
    trained = torch.randn(5, 2, 4, requires_grad=True)
    out = model(trained)[0]
    out.sum().backward()
    with torch.inference_mode():
        third = model(x)[0]
    expected = reference(x)[0].detach()
    for got in (first, second, third):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert trained.grad is not None


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("batch", [1, 5])
def test_nan_and_inf_in_the_recurrent_weights_spread_as_in_torch(kind, batch):
    """A NaN and an inf in W_hh go through the per-step product (no fast-math assumptions there)
    and reach the same outputs as torch.nn's; the finite ones still match."""
    torch.manual_seed(0)
    model = getattr(fastrnn, kind)(3, 40)
    reference = getattr(torch.nn, kind)(3, 40)
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for m in (model, reference):
            m.weight_hh_l0[2, 5] = float("nan")
            m.weight_hh_l0[7, 1] = float("inf")
        x = torch.randn(4, batch, 3)
        got, want = model(x)[0], reference(x)[0]
    assert got.isnan().any()
    assert torch.equal(got.isnan(), want.isnan())
    torch.testing.assert_close(got.nan_to_num(), want.nan_to_num(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind, kwargs", [("LSTM", {}), ("LSTM", {"proj_size": 3}), ("GRU", {})])
def test_inference_without_caches_packed(kind, kwargs):
    """Without a backward to come, the CPU kernels skip LSTM's cell cache and gate write-back and
    GRU's gate cache. A packed, bidirectional batch of 33 (run-time row chunks) at 1, 2 and 4
    threads must still give torch.nn's outputs and final states, and the training-mode call
    right after, its gradients."""
    import fastrnn.recurrence_cpu as recurrence_cpu

    torch.manual_seed(0)
    ref = getattr(torch.nn, kind)(5, 8, num_layers=2, bidirectional=True, **kwargs)
    fast = getattr(fastrnn, kind)(5, 8, num_layers=2, bidirectional=True, **kwargs)
    fast.load_state_dict(ref.state_dict())
    lengths = torch.tensor([9, 3, 7, 9, 1, 5, 8, 2, 6, 4, 9, 3, 7, 5, 2, 8, 6] * 2)[:33]
    x = torch.randn(9, 33, 5)
    packed = torch.nn.utils.rnn.pack_padded_sequence(x, lengths, enforce_sorted=False)
    with torch.no_grad():
        ref_out, ref_state = ref(packed)
    ref_states = ref_state if isinstance(ref_state, tuple) else (ref_state,)
    for threads in (1, 2, 4):
        saved_threads = recurrence_cpu._threads
        recurrence_cpu._threads = lambda threads=threads: threads
        try:
            with torch.no_grad():
                out, state = fast(packed)
            states = state if isinstance(state, tuple) else (state,)
            assert (out.data - ref_out.data).abs().max().item() < 1e-5
            for a, b in zip(states, ref_states, strict=True):
                assert (a - b).abs().max().item() < 1e-5
            out, _ = fast(packed)
            out.data.sum().backward()
        finally:
            recurrence_cpu._threads = saved_threads
    ref_out, _ = ref(packed)
    ref_out.data.sum().backward()
    for p_fast, p_ref in zip(fast.parameters(), ref.parameters(), strict=True):
        scale = max(1.0, p_ref.grad.abs().max().item())
        assert (p_fast.grad / 3 - p_ref.grad).abs().max().item() <= 1e-5 * scale


# ---------------------------------------------------------------------------------------------
# Forwards with the input projection computed in the kernels' per-step products
# ---------------------------------------------------------------------------------------------
FUSED = [
    ("LSTM", dict()),
    ("LSTM", dict(bidirectional=True, layers=2, hx=True)),
    ("LSTM", dict(proj=3, bias=False, batch_first=True)),
    ("LSTM", dict(proj=4, bidirectional=True, dtype=F64, hx=True)),
    ("LSTM", dict(lengths=[9, 3, 7, 9, 1, 5, 8, 2, 6, 4, 9, 3, 7, 5, 2, 8, 6], bidirectional=True)),
    ("LSTM", dict(lengths=[4, 9, 9, 2, 7, 6, 1, 8, 3, 5, 9, 6, 2, 8, 7, 4, 5], proj=2, layers=2)),
    ("GRU", dict()),
    ("GRU", dict(bidirectional=True, layers=2, hx=True, bias=False)),
    ("GRU", dict(lengths=[9, 3, 7, 9, 1, 5, 8, 2, 6, 4, 9, 3, 7, 5, 2, 8, 6], dtype=F64)),
    ("RNN_TANH", dict()),
    ("RNN_TANH", dict(bidirectional=True, layers=2, hx=True, bias=False)),
    ("RNN_TANH", dict(lengths=[9, 3, 7, 9, 1, 5, 8, 2, 6, 4, 9, 3, 7, 5, 2, 8, 6], dtype=F64)),
    ("RNN_RELU", dict(batch_first=True, hx=True)),
    ("RNN_RELU", dict(lengths=[4, 9, 9, 2, 7, 6, 1, 8, 3, 5, 9, 6, 2, 8, 7, 4, 5], layers=2)),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(
    "mode, c",
    FUSED,
    ids=[mode + "".join(f"-{k}{v}" for k, v in c.items()) for mode, c in FUSED],
)
def test_fused_input_projection(mode, c, threads, monkeypatch, wide_tile_fusing):
    """Batch 17: every row chunk has >= 8 rows, so the CPU forwards compute the input projection
    inside their per-step products (asserted below); outputs, states and every gradient must
    still match torch.nn, training and inference, dense and packed."""
    import numpy as np

    import fastrnn.recurrence_cpu as recurrence_cpu

    monkeypatch.setattr(recurrence_cpu, "_threads", lambda: threads)
    B, T, I, H = 17, 9, 6, 7
    D = 2 if c.get("bidirectional") else 1
    width = c.get("proj") or H
    gates = {"LSTM": 4, "GRU": 3}.get(mode, 1) * H
    assert recurrence_cpu.fuses_input_projection(
        np.array([B]), torch.zeros(1, I), torch.zeros(D, gates, width), torch.zeros(D, B, width)
    )
    ref, fast, x, hx = make_case(mode, c, T=T, B=B, I=I, H=H)
    lengths = c.get("lengths")
    extra = {"lengths": lengths, "enforce_sorted": False} if lengths else {}
    compare_modules(ref, fast, x, hx, **extra)
    with torch.no_grad():  # inference: the kernel writes no caches
        compare_modules(ref, fast, x, hx, backward=False, **extra)


def test_fused_input_projection_rule():
    """The fused forward needs WIDE_ROWS rows in every row chunk and joint weights within
    FUSED_MAX_BYTES (or FUSED_MANY_ROWS rows per chunk)."""
    import functools

    from fastrnn.kernels.cpu import common

    FUSED_MAX_BYTES = common.FUSED_MAX_BYTES
    # Without AVX-512's wide tiles never (the input GEMM measured faster there).
    assert not common.fuses_input_projection(16, 1, 2, 128, 256, 1024, 4, wide_tiles=False)
    assert not common.fuses_input_projection(128, 1, 2, 512, 1024, 4096, 4, wide_tiles=False)
    fuses_input_projection = functools.partial(common.fuses_input_projection, wide_tiles=True)
    assert fuses_input_projection(16, 1, 2, 128, 256, 1024, 4)
    assert not fuses_input_projection(15, 1, 2, 128, 256, 1024, 4)  # a 7-row chunk
    assert fuses_input_projection(16, 2, 2, 128, 256, 1024, 4)  # one thread per direction
    assert not fuses_input_projection(1, 1, 1, 64, 128, 512, 4)
    assert not fuses_input_projection(64, 1, 2, 0, 256, 1024, 4)  # no input features
    assert 4096 * 512 * 4 <= FUSED_MAX_BYTES < 4096 * 512 * 8
    assert fuses_input_projection(32, 1, 2, 256, 256, 4096, 4)  # float32: 8 MiB
    assert not fuses_input_projection(32, 1, 2, 256, 256, 4096, 8)  # float64: 16 MiB
    assert not fuses_input_projection(32, 1, 2, 384, 768, 3072, 4)  # 14 MiB, 16-row chunks
    assert fuses_input_projection(48, 1, 2, 384, 768, 3072, 4)  # 24-row chunks
    # From SHARED_MIN_WEIGHTS weights in W_hh the threads share one chunk of the whole batch.
    assert fuses_input_projection(32, 1, 2, 512, 1024, 4096, 4)  # one 32-row chunk
    assert not fuses_input_projection(16, 1, 2, 512, 1024, 4096, 4)  # 24 MiB, 16 rows
    assert fuses_input_projection(24, 1, 2, 512, 1024, 4096, 4)
    assert fuses_input_projection(32, 2, 2, 512, 1024, 4096, 4)  # a thread per direction
    assert not fuses_input_projection(16, 2, 4, 512, 1024, 4096, 4)  # shared, 16 rows
    assert fuses_input_projection(128, 1, 2, 512, 1024, 4096, 4)  # 64-row chunks, not shared


SHARED = [
    ("LSTM", 1024, 9, False),  # shared chunk, input projection by torch
    ("LSTM", 1024, 24, False),  # shared chunk, input projection fused
    ("LSTM", 1024, 24, True),
    ("GRU", 1184, 24, False),  # fused: the input-side product shared too
    ("GRU", 1184, 11, True),
]


@pytest.mark.parametrize("mode, hidden, batch, packed", SHARED)
def test_shared_products_at_any_batch(mode, hidden, batch, packed, monkeypatch, wide_tile_fusing):
    """With SHARED_MIN_WEIGHTS weights in W_hh, a direction's threads share every per-step
    product over one chunk of the whole batch (owner and helpers, `shared_product`) instead of
    splitting the rows: the results must match torch.nn, and be bitwise those of one thread."""
    import numpy as np

    import fastrnn.recurrence_cpu as recurrence_cpu
    from fastrnn.kernels.cpu.common import SHARED_MIN_WEIGHTS, direction_tasks

    gates = {"LSTM": 4, "GRU": 3}[mode] * hidden
    assert gates * hidden >= SHARED_MIN_WEIGHTS
    assert direction_tasks(1, batch, 2, gates * hidden, packed, 1 << 15, True) == (2, 1, 2)
    T, I = 3, 8
    ref, fast = make_mode_pair(mode, I, hidden)
    x, hx = make_inputs(mode, T=T, B=batch, I=I, H=hidden, hx=True)
    lengths = [1 + (7 * i) % T for i in range(batch)] if packed else None
    extra = {"lengths": lengths, "enforce_sorted": False} if lengths else {}
    assert recurrence_cpu.fuses_input_projection(
        np.array([batch]), x, torch.zeros(1, gates, hidden), torch.zeros(1, batch, hidden)
    ) == (batch >= 24)
    results = []
    for threads in (1, 2):
        monkeypatch.setattr(recurrence_cpu, "_threads", lambda threads=threads: threads)
        fast.zero_grad()
        results.append(compare_modules(ref, fast, x, hx, **extra)[0])
    one, two = results
    assert one.keys() == two.keys()
    for key in one:
        assert torch.equal(one[key], two[key]), key


# ---------------------------------------------------------------------------------------------
# Sequences of one step: each layer and direction runs as a cell (`functional.run_sequence`)
# ---------------------------------------------------------------------------------------------
ONE_STEP = [
    ("LSTM", dict()),
    ("LSTM", dict(bidirectional=True, layers=2, hx=True, dropout=0.3)),
    ("LSTM", dict(bias=False, batch_first=True, dtype=F64)),
    ("LSTM", dict(proj=3, hx=True)),  # a projection keeps the layer kernels
    ("LSTM", dict(lengths=[1, 1, 1])),
    ("LSTM", dict(unbatched=True, hx=True)),
    ("GRU", dict()),
    ("GRU", dict(bidirectional=True, layers=2, hx=True, bias=False)),
    ("GRU", dict(lengths=[1, 1, 1], bidirectional=True)),
    ("RNN_TANH", dict(layers=3, dropout=0.5, hx=True)),
    ("RNN_RELU", dict(bidirectional=True, batch_first=True, dtype=F64)),
]


@pytest.mark.parametrize(
    "mode, c",
    ONE_STEP,
    ids=[mode + "".join(f"-{k}{v}" for k, v in c.items()) for mode, c in ONE_STEP],
)
def test_one_step_sequences(mode, c, monkeypatch):
    """T = 1: outputs, states and every gradient match torch.nn (dropout with the same RNG),
    training and inference, and the cells ran (unless a projection keeps the layer path)."""
    import fastrnn.functional as functional

    steps = []
    one_step = functional._one_step
    monkeypatch.setattr(functional, "_one_step", lambda *a: steps.append(1) or one_step(*a))
    ref, fast, x, hx = make_case(mode, c, T=1, B=3, I=4, H=5)
    lengths = c.get("lengths")
    extra = {"lengths": lengths, "enforce_sorted": False} if lengths else {}
    compare_modules(ref, fast, x, hx, dropout_seed=7, **extra)
    assert len(steps) == (0 if c.get("proj") else c.get("layers", 1))
    ref.eval()
    fast.eval()
    with torch.no_grad():
        compare_modules(ref, fast, x, hx, backward=False, **extra)


def test_one_step_checks_shapes():
    """The functional API's one-step path checks what its cell kernels index by: a wrong
    weight or state shape, or batch sizes that don't match the rows, raise a RuntimeError."""
    import fastrnn.functional as functional

    torch.manual_seed(0)
    ref = torch.nn.GRU(4, 5)
    weights = [p.detach() for p in ref.parameters()]
    W_ih, W_hh, b_ih, b_hh = weights
    x, h = torch.randn(1, 3, 4), torch.zeros(1, 3, 5)
    out, h_n = functional.gru(x, h, weights, True, 1, 0.0, False, False)
    ref_out, ref_h = ref(x, h)
    assert_close(out, ref_out.detach())
    assert_close(h_n, ref_h.detach())
    args = (True, 1, 0.0, False, False)
    with pytest.raises(RuntimeError, match="weight_ih has shape"):
        functional.gru(x, h, [torch.randn(15, 6), W_hh, b_ih, b_hh], *args)
    with pytest.raises(RuntimeError, match="hx\\[0\\] has shape"):
        functional.gru(x, torch.zeros(1, 2, 5), weights, *args)
    with pytest.raises(RuntimeError, match="batch_sizes add up to 2"):
        functional.gru(x[0], h, weights, *args, batch_sizes=torch.tensor([2]))
