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
