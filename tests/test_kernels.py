"""Kernels (through their autograd Functions) against the plain-torch reference, layer by layer,
in the packed layout with awkward batch sizes, both directions, float32 and float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fastrnn import reference
from fastrnn.autograd import GRULayerFunction, LSTMLayerFunction, RNNLayerFunction

BATCH_SIZES = {
    "dense": [3, 3, 3, 3, 3],
    "packed": [5, 4, 4, 2, 1, 1, 1],
    "single-step": [2],
    "one-row": [1, 1, 1],
}
TOL = {torch.float32: 2e-6, torch.float64: 1e-12}


def _inputs(kind, sizes, input_size, state_sizes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(sizes), input_size, generator=g, dtype=dtype, requires_grad=True)
    states = [
        (0.5 * torch.randn(sizes[0], s, generator=g, dtype=dtype)).requires_grad_()
        for s in state_sizes
    ]
    return x, states, g


def _weights(g, shapes, dtype):
    return [(0.4 * torch.randn(*s, generator=g, dtype=dtype)).requires_grad_() for s in shapes]


def _compare(fast_out, ref_out, leaves, dtype):
    g = torch.Generator().manual_seed(1)
    cotangents = [torch.randn(o.shape, generator=g, dtype=dtype) for o in ref_out]
    results = []
    for outs in (fast_out, ref_out):
        loss = sum((o * c).sum() for o, c in zip(outs, cotangents, strict=True))
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append([*outs, *grads])
    for fast, ref in zip(*results, strict=True):
        if ref is None:
            assert fast is None or not fast.abs().max() > 0
            continue
        err = (fast - ref).abs().max().item() / max(1.0, ref.abs().max().item())
        assert err <= TOL[dtype], err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", list(BATCH_SIZES))
@pytest.mark.parametrize("proj", [0, 2], ids=["noproj", "proj"])
def test_lstm_layer(layout, reverse, dtype, proj):
    sizes = BATCH_SIZES[layout]
    hidden, inp = 5, 3
    P = proj or hidden
    x, (h0, c0), g = _inputs(layout, sizes, inp, (P, hidden), dtype)
    W_ih, W_hh, b_ih, b_hh = _weights(
        g, [(4 * hidden, inp), (4 * hidden, P), (4 * hidden,), (4 * hidden,)], dtype
    )
    W_hr = _weights(g, [(P, hidden)], dtype)[0] if proj else None
    bs = np.array(sizes, dtype=np.int64)
    args = (W_ih, W_hh, b_ih, b_hh, W_hr)
    fast = LSTMLayerFunction.apply(x, bs, reverse, h0, c0, *args)
    ref = reference.lstm_layer(x, torch.tensor(sizes), reverse, *args, h0, c0)
    leaves = [x, h0, c0, W_ih, W_hh, b_ih, b_hh] + ([W_hr] if proj else [])
    _compare(fast, ref, leaves, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", list(BATCH_SIZES))
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gru_layer(layout, reverse, dtype, bias):
    sizes = BATCH_SIZES[layout]
    hidden, inp = 4, 3
    x, (h0,), g = _inputs(layout, sizes, inp, (hidden,), dtype)
    W_ih, W_hh, b_ih, b_hh = _weights(
        g, [(3 * hidden, inp), (3 * hidden, hidden), (3 * hidden,), (3 * hidden,)], dtype
    )
    if not bias:
        b_ih = b_hh = None
    bs = np.array(sizes, dtype=np.int64)
    fast = GRULayerFunction.apply(x, bs, reverse, h0, W_ih, W_hh, b_ih, b_hh)
    ref = reference.gru_layer(x, torch.tensor(sizes), reverse, W_ih, W_hh, b_ih, b_hh, h0)
    leaves = [x, h0, W_ih, W_hh] + ([b_ih, b_hh] if bias else [])
    _compare(fast, ref, leaves, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("layout", list(BATCH_SIZES))
@pytest.mark.parametrize("relu", [False, True], ids=["tanh", "relu"])
def test_rnn_layer(layout, reverse, dtype, relu):
    sizes = BATCH_SIZES[layout]
    hidden, inp = 4, 3
    x, (h0,), g = _inputs(layout, sizes, inp, (hidden,), dtype)
    W_ih, W_hh, b_ih, b_hh = _weights(
        g, [(hidden, inp), (hidden, hidden), (hidden,), (hidden,)], dtype
    )
    bs = np.array(sizes, dtype=np.int64)
    fast = RNNLayerFunction.apply(x, bs, reverse, relu, h0, W_ih, W_hh, b_ih, b_hh)
    ref = reference.rnn_layer(x, torch.tensor(sizes), reverse, relu, W_ih, W_hh, b_ih, b_hh, h0)
    _compare(fast, ref, [x, h0, W_ih, W_hh, b_ih, b_hh], dtype)


def test_rows_split_across_threads_match_one_thread():
    """A batch big enough to be split into row chunks gives the same result on 1 thread."""
    import numba

    torch.manual_seed(0)
    sizes = [16, 16, 12, 9, 9, 3]
    x = torch.randn(sum(sizes), 6)
    h0, c0 = torch.randn(16, 8), torch.randn(16, 8)
    W = [torch.randn(32, 6) * 0.3, torch.randn(32, 8) * 0.3, torch.randn(32), torch.randn(32)]
    bs = np.array(sizes, dtype=np.int64)
    before = numba.get_num_threads()
    try:
        outs = []
        for threads in (1, before):
            numba.set_num_threads(threads)
            outs.append(LSTMLayerFunction.apply(x, bs, False, h0, c0, *W, None))
    finally:
        numba.set_num_threads(before)
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
