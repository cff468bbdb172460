"""Weight reparametrisations that training code puts on RNNs: the weights fastrnn's forward uses
are the ones torch's would use, and gradients reach the underlying parameters."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

import fastrnn


def _pair(cls_name: str):
    torch.manual_seed(0)
    ref = getattr(nn, cls_name)(3, 4, num_layers=2)
    fast = getattr(fastrnn, cls_name)(3, 4, num_layers=2)
    fast.load_state_dict(ref.state_dict())
    return ref, fast


def _run(module, x):
    out, hidden = module(x)
    states = hidden if isinstance(hidden, tuple) else (hidden,)
    loss = (out * out).sum() + sum(s.sum() for s in states)
    loss.backward()
    return out.detach()


class Scale(nn.Module):
    def forward(self, w):
        return 0.5 * w


@pytest.mark.parametrize("cls_name", ["LSTM", "GRU", "RNN"])
def test_parametrized_recurrent_weight(cls_name):
    x = torch.randn(5, 2, 3)
    results = []
    for module in _pair(cls_name):
        parametrize.register_parametrization(module, "weight_hh_l0", Scale())
        out = _run(module, x)
        results.append((out, module.parametrizations.weight_hh_l0.original.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls_name", ["LSTM", "GRU"])
def test_weight_dropped_recurrent_weight(cls_name):
    """AWD-LSTM's WeightDrop: the raw weight is a Parameter under another name and the module's
    weight is set to a dropped-out tensor before each forward."""
    x = torch.randn(5, 2, 3)
    results = []
    for module in _pair(cls_name):
        raw = nn.Parameter(module.weight_hh_l0.detach().clone())
        del module._parameters["weight_hh_l0"]
        module.register_parameter("weight_hh_l0_raw", raw)
        torch.manual_seed(1)
        mask = torch.bernoulli(torch.full_like(raw, 0.7)) / 0.7
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module.weight_hh_l0 = raw * mask
        out = _run(module, x)
        results.append((out, raw.grad.clone()))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls_name", ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"])
def test_replaced_weights_are_the_ones_used(cls_name):
    """fastrnn reads the weights on each call without Module.__getattr__ where it can
    (`_update_flat_weights`, `_CellForward._weights`): every way training code replaces a
    weight between calls must still reach the kernels, as it reaches torch's implementation."""
    torch.manual_seed(0)
    cell = cls_name.endswith("Cell")
    name = "weight_hh" if cell else "weight_hh_l0"
    ref = getattr(nn, cls_name)(3, 4)
    fast = getattr(fastrnn, cls_name)(3, 4)
    fast.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3) if cell else torch.randn(5, 2, 3)

    def replaced(value):
        return value, value.clone()

    def check():
        expected, got = ref(x), fast(x)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)

    check()
    shape = getattr(ref, name).shape
    for step in ("setattr", "dict", "weight drop", "weight drop again", "parameter back"):
        new, new_copy = replaced(torch.randn(shape))
        for module, value in ((ref, new), (fast, new_copy)):
            if step == "setattr":
                setattr(module, name, nn.Parameter(value))
            elif step == "dict":  # bypassing Module.__setattr__ (and RNNBase's bookkeeping)
                module._parameters[name] = nn.Parameter(value)
            elif step.startswith("weight drop"):
                module._parameters.pop(name, None)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    setattr(module, name, value)
            else:
                del module.__dict__[name]
                module.register_parameter(name, nn.Parameter(value))
        check()
