"""torch.compile and the torch.library ops: a compiled model keeps fastrnn's layers in its graph
as `fastrnn::layer` ops, fullgraph too, with eager's outputs and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

import fastrnn
from fastrnn import ops

CELLS = ["LSTM", "GRU", "RNN"]


class _Model(nn.Module):
    """Embedding, a 2-layer recurrent module, Linear: a language model's shape."""

    def __init__(self, kind: str, **kwargs) -> None:
        super().__init__()
        self.embedding = nn.Embedding(40, 12)
        self.rnn = getattr(fastrnn, kind)(12, 16, num_layers=2, batch_first=True, **kwargs)
        width = 16 * (2 if kwargs.get("bidirectional") else 1)
        self.out = nn.Linear(width if not kwargs.get("proj_size") else kwargs["proj_size"], 40)

    def forward(self, tokens):
        y, _ = self.rnn(self.embedding(tokens))
        return self.out(y)


def _graph_recorder(graphs: list):
    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    return backend


def _run(model, *inputs):
    model.zero_grad()
    out = model(*inputs)
    out.float().square().sum().backward()
    return out.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("kind", CELLS)
def test_compile_fullgraph_gives_eager_results(kind):
    """The acceptance case: torch.compile(fullgraph=True) with inductor of embedding + 2-layer
    module + Linear runs and gives eager's outputs and every gradient."""
    torch.manual_seed(0)
    model = _Model(kind)
    tokens = torch.randint(0, 40, (3, 7))
    eager_out, eager_grads = _run(model, tokens)
    compiled = torch.compile(model, fullgraph=True)
    out, grads = _run(compiled, tokens)
    torch.testing.assert_close(out, eager_out, rtol=1e-6, atol=1e-6)
    for g, e in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", CELLS)
def test_compiled_graph_holds_the_fastrnn_op(kind):
    """The recorded graph calls `fastrnn::layer` once per layer and none of torch's RNN ops:
    fastrnn's kernels run inside the compiled model, not torch's implementation."""
    torch.manual_seed(0)
    graphs: list = []
    model = _Model(kind)
    compiled = torch.compile(model, fullgraph=True, backend=_graph_recorder(graphs))
    compiled(torch.randint(0, 40, (2, 5)))
    targets = [str(node.target) for gm in graphs for node in gm.graph.nodes]
    assert sum("fastrnn.layer" in t for t in targets) == 2
    assert not any(name in t for t in targets for name in ("lstm", "gru", "rnn_tanh"))


@pytest.mark.parametrize(
    "kind, kwargs, packed",
    [
        ("LSTM", dict(bidirectional=True), False),
        ("LSTM", dict(proj_size=5), True),
        ("GRU", dict(bidirectional=True, bias=False), True),
        ("RNN", dict(nonlinearity="relu", bidirectional=True), False),
    ],
)
def test_compile_variants_and_packed_input(kind, kwargs, packed):
    """Bidirectional, projected, bias-less, relu and packed (unsorted lengths) inputs with a
    given hx (LSTM: h and c), compiled (aot_eager: the op's fake and autograd registrations),
    against eager: output, final states, gradients of input, states and every parameter."""
    torch.manual_seed(0)
    rnn = getattr(fastrnn, kind)(6, 8, num_layers=2, **kwargs).double()
    directions = 2 if kwargs.get("bidirectional") else 1
    width = kwargs.get("proj_size") or 8
    x = torch.randn(7, 4, 6, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2 * directions, 4, width, dtype=torch.float64, requires_grad=True)
    hx = (h0, torch.randn(2 * directions, 4, 8, dtype=torch.float64)) if kind == "LSTM" else h0
    lengths = torch.tensor([5, 7, 2, 6])

    def step(data, hx):
        out, state = rnn(data, hx)
        out = out.data if packed else out
        states = state if isinstance(state, tuple) else (state,)
        return out, states

    def results(fn):
        rnn.zero_grad()
        x.grad = h0.grad = None
        # packed outside: dynamo doesn't trace torch's pack_padded_sequence
        data = pack_padded_sequence(x, lengths, enforce_sorted=False) if packed else x
        out, states = fn(data, hx)
        (out.square().sum() + sum(s.sum() for s in states)).backward()
        return [out, *states, x.grad, h0.grad, *(p.grad for p in rnn.parameters())]

    eager = results(step)
    # packed input runs eagerly inside the compiled function (a graph break, see modules)
    compiled = results(torch.compile(step, fullgraph=not packed, backend="aot_eager"))
    for c, e in zip(compiled, eager, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-12, atol=1e-12)


def test_compile_without_fullgraph_has_no_graph_break():
    torch.manual_seed(0)
    model = _Model("GRU")
    explanation = torch._dynamo.explain(model)(torch.randint(0, 40, (2, 5)))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


def test_torch_nn_modules_are_still_refused_by_dynamo():
    """fastrnn lets dynamo trace its own modules only: torch.nn's LSTM in a compiled model
    keeps dynamo's behaviour (fullgraph refuses it), so importing fastrnn changes nothing else."""
    torch._dynamo.reset()
    lstm = nn.LSTM(4, 5)
    compiled = torch.compile(lambda x: lstm(x)[0], fullgraph=True, backend="eager")
    with pytest.raises(Exception, match="RNN, GRU, or LSTM"):
        compiled(torch.randn(3, 2, 4))


def _layer_arguments(cell: str, directions: int, bias: bool, proj: int, dtype=torch.float64):
    torch.manual_seed(1)
    gates = {"lstm": 4, "gru": 3}.get(cell, 1)
    steps, batch, inputs, hidden = 4, 3, 5, 6
    width = proj or hidden
    stack = (directions,) if directions == 2 else ()

    def tensor(*shape):
        return torch.randn(*shape, dtype=dtype, requires_grad=True)

    x = tensor(steps * batch, inputs)
    sizes = torch.tensor([3, 3, 2, 1])
    x = torch.randn(int(sizes.sum()), inputs, dtype=dtype, requires_grad=True)
    h0 = tensor(directions, batch, width)
    c0 = tensor(directions, batch, hidden) if cell == "lstm" else None
    W_ih, W_hh = tensor(*stack, gates * hidden, inputs), tensor(*stack, gates * hidden, width)
    b_ih = tensor(*stack, gates * hidden) if bias else None
    b_hh = tensor(*stack, gates * hidden) if bias else None
    W_hr = tensor(*stack, proj, hidden) if proj else None
    return [cell, x, sizes, h0, c0, W_ih, W_hh, b_ih, b_hh, W_hr, True]


OP_CASES = [
    ("lstm", 1, True, 0),
    ("lstm", 2, False, 0),
    ("lstm", 2, True, 3),
    ("gru", 1, True, 0),
    ("gru", 2, False, 0),
    ("rnn_tanh", 2, True, 0),
    ("rnn_relu", 1, False, 0),
]


@pytest.mark.parametrize("cell, directions, bias, proj", OP_CASES)
def test_layer_op_passes_opcheck(cell, directions, bias, proj):
    """torch.library.opcheck: schema, fake tensor (shapes and aliasing), autograd registration,
    and AOT dispatch with dynamic shapes, on packed batch sizes."""
    arguments = _layer_arguments(cell, directions, bias, proj)
    torch.library.opcheck(ops.layer, arguments)


@pytest.mark.parametrize("cell, directions, bias, proj", OP_CASES)
def test_layer_op_gradcheck(cell, directions, bias, proj):
    """float64 gradcheck of the op's registered backward (`fastrnn::layer_backward`)."""
    arguments = _layer_arguments(cell, directions, bias, proj)
    positions = [i for i, a in enumerate(arguments) if isinstance(a, torch.Tensor)]
    positions.remove(2)  # batch_sizes

    def layer(*tensors):
        given = list(arguments)
        for i, t in zip(positions, tensors, strict=True):
            given[i] = t
        y, h_n, c_n, _, _ = ops.layer(*given)
        return (y, h_n, c_n) if cell == "lstm" else (y, h_n)

    assert torch.autograd.gradcheck(layer, [arguments[i] for i in positions])


@pytest.mark.parametrize("backend", ["eager", "inductor"])
def test_compiled_module_matches_torch_nn(backend):
    """A compiled fastrnn module gives torch.nn's results and gradients, training and under
    no_grad (where the op keeps no caches)."""
    torch.manual_seed(0)
    fast = fastrnn.LSTM(8, 16, num_layers=2)
    ref = torch.nn.LSTM(8, 16, num_layers=2)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(5, 3, 8)
    compiled = torch.compile(fast, backend=backend)
    y_fast, y_ref = compiled(x)[0], ref(x)[0]
    assert (y_fast - y_ref).abs().max().item() < 1e-5
    y_fast.sum().backward()
    y_ref.sum().backward()
    assert (fast.weight_hh_l1.grad - ref.weight_hh_l1.grad).abs().max().item() < 1e-5
    with torch.no_grad():
        assert (compiled(x)[0] - ref(x)[0]).abs().max().item() < 1e-5
