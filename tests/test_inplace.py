"""In-place operations on what the modules return, as training code writes them (`out += skip`,
`F.relu_(out)`, `nn.Dropout(inplace=True)`, `h.mul_(mask)`): wherever torch.nn allows one before
backward, fastrnn allows it too and gets torch's gradients. (torch's dense float32 LSTM, which
runs oneDNN, refuses some of them; there fastrnn may allow more, never less.)"""

from __future__ import annotations

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn

KINDS = ("dense", "batch_first", "packed", "one_step", "bidirectional", "two_layers")


def _module(impl, name: str, kind: str, dtype):
    torch.manual_seed(0)
    options = {
        "batch_first": kind == "batch_first",
        "bidirectional": kind == "bidirectional",
        "num_layers": 2 if kind == "two_layers" else 1,
    }
    return getattr(impl, name)(3, 4, **options).to(dtype)


def _run(impl, name: str, kind: str, target: str, dtype):
    """Forward, modify `target` ("output" or "state") in place, backward: the input's and the
    parameters' gradients, or the exception raised."""
    module = _module(impl, name, kind, dtype)
    torch.manual_seed(1)
    steps = 1 if kind == "one_step" else 5
    x = torch.randn(steps, 2, 3, dtype=dtype, requires_grad=True)
    inp = x.transpose(0, 1) if kind == "batch_first" else x
    if kind == "packed":
        inp = pack_padded_sequence(x, torch.tensor([5, 3]))
    try:
        out, state = module(inp)
        if kind == "packed":
            out = out.data
        h = state[0] if isinstance(state, tuple) else state
        if target == "output":
            out.mul_(2).add_(1)
        else:
            h.mul_(3)
            if isinstance(state, tuple):
                state[1].add_(1)
        loss = out.square().sum() + h.square().sum()
        if isinstance(state, tuple):
            loss = loss + state[1].square().sum()
        loss.backward()
    except RuntimeError as error:
        return error
    return [x.grad, *(p.grad for p in module.parameters())]


@pytest.mark.parametrize("target", ["output", "state"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
def test_sequence_outputs_modified_in_place(name, kind, target):
    for dtype in (torch.float32, torch.float64):
        expected = _run(torch.nn, name, kind, target, dtype)
        got = _run(fastrnn, name, kind, target, dtype)
        if isinstance(expected, Exception):
            continue  # torch refuses (oneDNN saved its output); fastrnn may or may not
        assert not isinstance(got, Exception), f"torch allows it, fastrnn raised: {got}"
        tolerance = 1e-5 if dtype == torch.float32 else 1e-10
        for a, b in zip(expected, got, strict=True):
            torch.testing.assert_close(b, a, rtol=tolerance, atol=tolerance)


def _run_cell(impl, name: str, target: int, batch: int):
    torch.manual_seed(0)
    cell = getattr(impl, name)(3, 4)
    torch.manual_seed(1)
    x = torch.randn(batch, 3, requires_grad=True)
    try:
        result = cell(x)
        outputs = result if isinstance(result, tuple) else (result,)
        outputs[min(target, len(outputs) - 1)].mul_(2)
        sum(o.square().sum() for o in outputs).backward()
    except RuntimeError as error:
        return error
    return [x.grad, *(p.grad for p in cell.parameters())]


@pytest.mark.parametrize("batch", [1, 7])  # both product paths of the cell kernels
@pytest.mark.parametrize("target", [0, 1])  # h' (or the GRU/RNN state), c'
@pytest.mark.parametrize("name", ["LSTMCell", "GRUCell", "RNNCell"])
def test_cell_outputs_modified_in_place(name, target, batch):
    expected = _run_cell(torch.nn, name, target, batch)
    got = _run_cell(fastrnn, name, target, batch)
    if isinstance(expected, Exception):
        assert name == "RNNCell"  # torch's tanh saved h' for its backward
        return
    assert not isinstance(got, Exception), f"torch allows it, fastrnn raised: {got}"
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
