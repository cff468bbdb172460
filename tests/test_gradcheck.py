"""Gradients: torch.autograd.gradcheck in float64 on tiny sizes, and second derivatives
(double backward) against torch.nn.

Gradients are checked w.r.t. the input, h0 (c0) and every weight. The module's own
Parameters are passed to gradcheck as inputs: gradcheck perturbs its inputs *in place*
(through ``.data``, which does not bump the version counter), so the module sees the
perturbed weights on every call. This checks the math of every weight gradient, and also
that fastrnn keeps no stale copy of the weights between calls (weights change in place through
`.data` in many training scripts).
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_close, make_mode_pair, make_pair
from torch.nn.utils.rnn import pack_padded_sequence

F64 = torch.float64


def _rand(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=g, dtype=F64)).requires_grad_(True)


def _module_fn(module, n_state, lengths=None, enforce_sorted=True):
    """f(x, *states, *params) -> flat tuple of outputs, calling ``module`` directly."""

    def fn(x, *rest):
        states = rest[:n_state]
        if lengths is not None:
            x = pack_padded_sequence(
                x, lengths, batch_first=module.batch_first, enforce_sorted=enforce_sorted
            )
        if n_state == 0:
            out = module(x)
        elif n_state == 1:
            out = module(x, states[0])
        else:
            out = module(x, tuple(states))
        if isinstance(module, torch.nn.RNNCellBase):
            return out if isinstance(out, tuple) else (out,)
        y, h = out
        y = y.data if lengths is not None else y
        return (y, *(h if isinstance(h, tuple) else (h,)))

    return fn


def _check(module, x, states, lengths=None, enforce_sorted=True):
    params = list(module.parameters())
    assert all(p.dtype == F64 and p.requires_grad for p in params)
    fn = _module_fn(module, len(states), lengths, enforce_sorted)
    inputs = (x, *states, *params)
    before = [p.detach().clone() for p in params]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-4)
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p.detach(), b)


def _states(mode, layers, D, B, H, proj=0, seed=1, unbatched=False):
    batch = () if unbatched else (B,)
    h0 = _rand(layers * D, *batch, proj or H, seed=seed, scale=0.5)
    if mode == "LSTM":
        return (h0, _rand(layers * D, *batch, H, seed=seed + 1, scale=0.5))
    return (h0,)


@pytest.mark.parametrize(
    "mode,layers,bidirectional,proj,batch_first",
    [
        pytest.param("LSTM", 1, False, 0, False, id="LSTM"),
        pytest.param("LSTM", 1, False, 2, False, id="LSTM-proj"),
        pytest.param("GRU", 1, False, 0, True, id="GRU-bf"),
        pytest.param("RNN_TANH", 1, False, 0, False, id="RNN_TANH"),
        pytest.param("RNN_RELU", 1, False, 0, False, id="RNN_RELU"),
        pytest.param("LSTM", 2, True, 0, False, id="LSTM-L2-bi"),
        pytest.param("LSTM", 2, True, 1, True, id="LSTM-L2-bi-proj-bf"),
        pytest.param("GRU", 2, True, 0, False, id="GRU-L2-bi"),
        pytest.param("RNN_TANH", 2, True, 0, True, id="RNN_TANH-L2-bi-bf"),
        pytest.param("RNN_RELU", 2, True, 0, False, id="RNN_RELU-L2-bi"),
    ],
)
def test_gradcheck_module(mode, layers, bidirectional, proj, batch_first):
    I, H, T, B = 3, 3, 3, 2
    D = 2 if bidirectional else 1
    _, fast = make_mode_pair(
        mode,
        I,
        H,
        num_layers=layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        dtype=F64,
        **({"proj_size": proj} if proj else {}),
    )
    x = _rand(*((B, T, I) if batch_first else (T, B, I)))
    _check(fast, x, _states(mode, layers, D, B, H, proj))


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_gradcheck_unbatched_no_bias(mode):
    _, fast = make_mode_pair(mode, 2, 3, num_layers=2, bias=False, dtype=F64)
    _check(fast, _rand(3, 2), _states(mode, 2, 1, 1, 3, unbatched=True))


@pytest.mark.parametrize(
    "mode,lengths,enforce_sorted,bidirectional,proj",
    [
        pytest.param("LSTM", [3, 1], True, False, 0, id="LSTM-sorted"),
        pytest.param("LSTM", [1, 3, 2], False, True, 2, id="LSTM-unsorted-bi-proj"),
        pytest.param("GRU", [2, 3, 1], False, True, 0, id="GRU-unsorted-bi"),
        pytest.param("RNN_TANH", [3, 2], True, True, 0, id="RNN_TANH-sorted-bi"),
        pytest.param("RNN_RELU", [2, 3], False, False, 0, id="RNN_RELU-unsorted"),
    ],
)
def test_gradcheck_packed(mode, lengths, enforce_sorted, bidirectional, proj):
    I, H, T = 2, 3, 3
    B = len(lengths)
    D = 2 if bidirectional else 1
    _, fast = make_mode_pair(
        mode,
        I,
        H,
        bidirectional=bidirectional,
        dtype=F64,
        **({"proj_size": proj} if proj else {}),
    )
    x = _rand(T, B, I)
    _check(fast, x, _states(mode, 1, D, B, H, proj), lengths=lengths, enforce_sorted=enforce_sorted)


@pytest.mark.parametrize("hx_given", [True, False], ids=["hx", "nohx"])
@pytest.mark.parametrize("cell", ["LSTMCell", "GRUCell", "RNNCell_TANH", "RNNCell_RELU"])
def test_gradcheck_cell(cell, hx_given):
    I, H, B = 3, 4, 2
    _, fast = make_mode_pair(cell, I, H, dtype=F64)
    x = _rand(B, I)
    states = ()
    if hx_given:
        states = (_rand(B, H, seed=1, scale=0.5),)
        if cell == "LSTMCell":
            states = (*states, _rand(B, H, seed=2, scale=0.5))
    _check(fast, x, states)


def test_gradcheck_module_via_functional_call():
    """Weights given through torch.func.functional_call (as in meta-learning code)."""
    ref, fast = make_pair("LSTM", 2, 3, num_layers=2, bidirectional=True, dtype=F64)
    names = [n for n, _ in fast.named_parameters()]
    params = [
        _rand(*p.shape, seed=10 + i, scale=0.5) for i, (_, p) in enumerate(fast.named_parameters())
    ]
    x = _rand(3, 2, 2)

    def fn(module):
        def f(x, *ps):
            y, (h, c) = torch.func.functional_call(module, dict(zip(names, ps, strict=True)), (x,))
            return y, h, c

        return f

    # the swapped-in weights are really used (and give torch's result)
    for a, b in zip(fn(fast)(x, *params), fn(ref)(x, *params), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert torch.autograd.gradcheck(fn(fast), (x, *params), eps=1e-6, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize(
    "mode,layers,bidirectional,proj,lengths",
    [
        pytest.param("LSTM", 1, False, 0, None, id="LSTM"),
        pytest.param("LSTM", 1, True, 1, [3, 1], id="LSTM-bi-proj-packed"),
        pytest.param("GRU", 2, False, 0, None, id="GRU-L2"),
        pytest.param("RNN_TANH", 1, True, 0, [2, 3], id="RNN_TANH-bi-packed"),
        pytest.param("LSTMCell", 1, False, 0, None, id="LSTMCell"),
        pytest.param("GRUCell", 1, False, 0, None, id="GRUCell"),
        pytest.param("RNNCell_TANH", 1, False, 0, None, id="RNNCell_TANH"),
    ],
)
def test_gradgradcheck(mode, layers, bidirectional, proj, lengths):
    """Second derivatives (create_graph=True) against finite differences of the first, with
    respect to the input, the states and every weight."""
    I, H, T, B = 2, 2, 3, 2
    D = 2 if bidirectional else 1
    extra = {"proj_size": proj} if proj else {}
    if "Cell" in mode:
        _, fast = make_mode_pair(mode, I, H, dtype=F64)
        x = _rand(B, I)
        states = (_rand(B, H, seed=1, scale=0.5),)
        if mode == "LSTMCell":
            states = (*states, _rand(B, H, seed=2, scale=0.5))
    else:
        _, fast = make_mode_pair(
            mode, I, H, num_layers=layers, bidirectional=bidirectional, dtype=F64, **extra
        )
        x = _rand(T, B, I)
        states = _states(mode, layers, D, B, H, proj)
    fn = _module_fn(fast, len(states), lengths, enforce_sorted=False)
    inputs = (x, *states, *fast.parameters())
    assert torch.autograd.gradgradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


def _random(*shape, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(3), dtype=dtype)


# ---------------------------------------------------------------------------------------------
# double backward
# ---------------------------------------------------------------------------------------------
# How a second derivative is taken:
#   backward:  ``penalty.backward()`` (accumulates into every leaf, e.g. a WGAN-GP penalty)
#   grad:      ``torch.autograd.grad(penalty, [x, *params])``
#   grad_allow_unused: the same with ``allow_unused=True``: a ``None`` here stands for a zero
#              second derivative, which is a silently wrong value when torch's is non-zero.
HOW = ["backward", "grad", "grad_allow_unused"]


def _double_backward(module, x, how, hx=None, lengths=None):
    """d/d(x, hx, params) of |dL/d(x, hx)|^2 with L = sum(y^2) (+ the final states' squares);
    returns those gradients."""
    x = x.clone().requires_grad_(True)
    states = [] if hx is None else [s.clone().requires_grad_(True) for s in hx]
    params = list(module.parameters())
    module.zero_grad(set_to_none=True)
    given = x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False)
    if hx is None:
        out = module(given)
    else:
        out = module(given, tuple(states) if len(states) == 2 else states[0])
    y = out[0] if isinstance(out, tuple) else out
    y = y.data if lengths is not None else y
    loss = (y * y).sum()
    if isinstance(out, tuple) and not isinstance(module, torch.nn.RNNCellBase):
        final = out[1] if isinstance(out[1], tuple) else (out[1],)
        loss = loss + sum((f * f).sum() for f in final)
    firsts = torch.autograd.grad(loss, [x, *states], create_graph=True)
    penalty = sum((g * g).sum() for g in firsts)
    leaves = [x, *states, *params]
    if how == "backward":
        penalty.backward()
        return [t.grad for t in leaves]
    return list(torch.autograd.grad(penalty, leaves, allow_unused=how == "grad_allow_unused"))


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize(
    "cls_name,kwargs,shape,hx,lengths",
    [
        pytest.param("LSTM", {}, (4, 2, 3), False, None, id="LSTM"),
        pytest.param("LSTM", {"num_layers": 2, "bidirectional": True}, (4, 2, 3), True, None,
                     id="LSTM-L2-bi-hx"),
        pytest.param("LSTM", {"proj_size": 2}, (4, 2, 3), True, None, id="LSTM-proj-hx"),
        pytest.param("LSTM", {"bidirectional": True}, (4, 3, 3), False, [4, 2, 3],
                     id="LSTM-bi-packed"),
        pytest.param("LSTM", {"batch_first": True}, (2, 1, 3), True, None, id="LSTM-bf-one-step"),
        pytest.param("GRU", {}, (4, 2, 3), True, None, id="GRU-hx"),
        pytest.param("GRU", {"bidirectional": True, "bias": False}, (4, 3, 3), False, [1, 4, 2],
                     id="GRU-bi-nobias-packed"),
        pytest.param("GRU", {}, (1, 2, 3), False, None, id="GRU-one-step"),
        pytest.param("RNN", {"nonlinearity": "tanh"}, (4, 2, 3), True, None, id="RNN_TANH-hx"),
        pytest.param("RNN", {"nonlinearity": "relu", "num_layers": 2}, (4, 2, 3), False, None,
                     id="RNN_RELU-L2"),
        pytest.param("LSTMCell", {}, (2, 3), True, None, id="LSTMCell-hx"),
        pytest.param("LSTMCell", {"bias": False}, (3,), False, None, id="LSTMCell-unbatched"),
        pytest.param("GRUCell", {}, (2, 3), True, None, id="GRUCell-hx"),
        pytest.param("RNNCell", {}, (2, 3), False, None, id="RNNCell"),
        pytest.param("RNNCell", {"nonlinearity": "relu"}, (2, 3), True, None, id="RNNCell-relu"),
    ],
)  # fmt: skip
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_double_backward_matches_torch(cls_name, kwargs, shape, hx, lengths, how, dtype):
    """Second derivatives (gradient penalties, Hessian-vector products) through every module
    and cell, with respect to the input, the initial states and every parameter: torch's
    values (fastrnn recomputes the layer with plain torch ops on this path)."""
    ref, fast = make_pair(cls_name, 3, 4, dtype=dtype, **kwargs)
    x = _random(*shape, dtype=dtype)
    states = None
    if hx:
        out = ref(x if lengths is None else pack_padded_sequence(x, lengths, enforce_sorted=False))
        final = (
            out[1] if isinstance(out, tuple) and not isinstance(ref, torch.nn.RNNCellBase) else out
        )
        final = final if isinstance(final, tuple) else (final,)
        states = [0.5 * _random(*f.shape, dtype=dtype) for f in final]
    fast_grads = _double_backward(fast, x, how, states, lengths)
    ref_grads = _double_backward(ref, x, how, states, lengths)
    tol = 1e-9 if dtype == F64 else 2e-5
    for i, (a, b) in enumerate(zip(fast_grads, ref_grads, strict=True)):
        if b is None or a is None:
            assert (a is None or torch.count_nonzero(a) == 0) and (
                b is None or torch.count_nonzero(b) == 0
            ), f"second-order grad {i}: one side None, the other non-zero"
        else:
            assert_close(a, b, f"second-order grad {i}", tol=tol)
