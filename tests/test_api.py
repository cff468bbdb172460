"""Drop-in API: classes, repr, state_dict, convert(), pickling, training, fallback."""

from __future__ import annotations

import copy
import io
import re
import warnings

import pytest
import torch
from conftest import (
    assert_close,
    assert_results_close,
    assert_same_parameters,
    compare_modules,
    make_mode_pair,
    make_pair,
    run_fwd_bwd,
)
from torch import nn

import fastrnn

F64 = torch.float64
CLASSES = ["LSTM", "GRU", "RNN", "LSTMCell", "GRUCell", "RNNCell"]


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("name", CLASSES)
def test_subclass_of_torch(name):
    cls = getattr(fastrnn, name)
    assert issubclass(cls, getattr(nn, name))
    args = (3, 4)
    assert isinstance(cls(*args), getattr(nn, name))
    assert isinstance(cls(*args), nn.Module)


def test_version():
    assert isinstance(fastrnn.__version__, str)
    assert fastrnn.__version__


REPR_CASES = [
    pytest.param("LSTM", (4, 5), {}, id="LSTM-default"),
    pytest.param(
        "LSTM",
        (4, 5, 2),
        dict(bias=False, batch_first=True, dropout=0.1, bidirectional=True, proj_size=3),
        id="LSTM-all",
    ),
    pytest.param("GRU", (4, 5), dict(num_layers=3, dropout=0.5), id="GRU"),
    pytest.param("RNN", (4, 5), dict(nonlinearity="relu", bidirectional=True), id="RNN-relu"),
    pytest.param("LSTMCell", (4, 5), dict(bias=False), id="LSTMCell"),
    pytest.param("GRUCell", (4, 5), {}, id="GRUCell"),
    pytest.param("RNNCell", (4, 5), dict(nonlinearity="relu"), id="RNNCell-relu"),
]


@pytest.mark.parametrize("name,args,kwargs", REPR_CASES)
def test_repr_and_state_dict(name, args, kwargs):
    ref, fast = make_pair(name, *args, **kwargs)
    assert repr(fast) == repr(ref)
    sd_ref, sd_fast = ref.state_dict(), fast.state_dict()
    assert list(sd_fast.keys()) == list(sd_ref.keys())
    for k in sd_ref:
        assert torch.equal(sd_fast[k], sd_ref[k]), k
    for attr in (
        "input_size",
        "hidden_size",
        "bias",
        "num_layers",
        "batch_first",
        "dropout",
        "bidirectional",
        "proj_size",
        "nonlinearity",
        "mode",
    ):
        assert getattr(fast, attr, None) == getattr(ref, attr, None), attr


@pytest.mark.parametrize(
    "mode,kwargs",
    [
        pytest.param("LSTM", dict(num_layers=2, bidirectional=True, proj_size=2), id="LSTM"),
        pytest.param("GRU", dict(num_layers=2), id="GRU"),
        pytest.param("RNN_RELU", dict(bidirectional=True), id="RNN_RELU"),
        pytest.param("GRUCell", {}, id="GRUCell"),
    ],
)
def test_load_state_dict_both_ways(mode, kwargs):
    ref, _ = make_mode_pair(mode, 3, 4, seed=1, **kwargs)
    _, fast = make_mode_pair(mode, 3, 4, seed=2, **kwargs)
    x = _x(2, 3) if "Cell" in mode else _x(5, 2, 3)
    fast.load_state_dict(ref.state_dict())
    assert_same_parameters(ref, fast)
    compare_modules(ref, fast, x)
    # and torch.nn loads a fastrnn state_dict
    ref2, _ = make_mode_pair(mode, 3, 4, seed=3, **kwargs)
    ref2.load_state_dict(fast.state_dict())
    compare_modules(ref2, fast, x)


# ---------------------------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lstm = nn.LSTM(4, 5, num_layers=2, batch_first=True, bidirectional=True)
        self.block = nn.Sequential(nn.Linear(10, 4), nn.GRU(4, 3))
        self.cell = nn.LSTMCell(3, 3)
        self.rnns = nn.ModuleList([nn.RNN(3, 2, nonlinearity="relu"), nn.RNNCell(2, 2)])
        self.gcell = nn.GRUCell(2, 2)
        self.head = nn.Linear(2, 7)

    def forward(self, tokens):
        e = self.emb(tokens)  # (B, T, 4)
        y, _ = self.lstm(e)  # (B, T, 10)
        z = self.block[0](y).transpose(0, 1)  # (T, B, 4)
        g, _ = self.block[1](z)  # (T, B, 3)
        h, c = self.cell(g[-1])
        r, _ = self.rnns[0](g)  # (T, B, 2)
        s = self.rnns[1](r[-1])
        s = self.gcell(s, s)
        return self.head(s + h[:, :2] + c[:, :2])


EXPECTED_TYPES = {
    "lstm": fastrnn.LSTM,
    "block.1": fastrnn.GRU,
    "cell": fastrnn.LSTMCell,
    "rnns.0": fastrnn.RNN,
    "rnns.1": fastrnn.RNNCell,
    "gcell": fastrnn.GRUCell,
    "emb": nn.Embedding,
    "block.0": nn.Linear,
    "head": nn.Linear,
}


def test_convert_nested_model():
    torch.manual_seed(0)
    model = Net()
    tokens = torch.randint(0, 10, (3, 6), generator=torch.Generator().manual_seed(1))
    expected = model(tokens)
    params_before = dict(model.named_parameters())
    model.eval()

    out = fastrnn.convert(model)
    assert out is not None
    for name, cls in EXPECTED_TYPES.items():
        mod = dict(out.named_modules())[name]
        assert type(mod) is cls, f"{name}: {type(mod)}"
    # same Parameter objects, same names
    params_after = dict(out.named_parameters())
    assert params_after.keys() == params_before.keys()
    for n, p in params_before.items():
        assert params_after[n] is p, f"{n} is a new Parameter"
    assert not out.training
    assert all(not m.training for m in out.modules())
    assert out.lstm.batch_first and out.lstm.bidirectional and out.lstm.num_layers == 2
    assert out.rnns[0].nonlinearity == "relu"
    assert_close(out(tokens), expected.detach(), "converted model output")

    # converting twice is harmless
    again = fastrnn.convert(out)
    assert type(dict(again.named_modules())["lstm"]) is fastrnn.LSTM
    assert dict(again.named_parameters())["lstm.weight_ih_l0"] is params_before["lstm.weight_ih_l0"]


@pytest.mark.parametrize(
    "name,args,kwargs",
    [
        pytest.param("LSTM", (3, 4), dict(num_layers=2, proj_size=2, dropout=0.2), id="LSTM"),
        pytest.param("GRU", (3, 4), dict(bidirectional=True, bias=False), id="GRU"),
        pytest.param("RNN", (3, 4), dict(nonlinearity="relu", batch_first=True), id="RNN"),
        pytest.param("RNNCell", (3, 4), dict(nonlinearity="relu"), id="RNNCell"),
        pytest.param("LSTMCell", (3, 4), {}, id="LSTMCell"),
    ],
)
def test_convert_top_level(name, args, kwargs):
    torch.manual_seed(0)
    mod = getattr(nn, name)(*args, **kwargs)
    torch.manual_seed(0)
    ref = getattr(nn, name)(*args, **kwargs)
    params = list(mod.parameters())
    out = fastrnn.convert(mod)
    assert type(out) is getattr(fastrnn, name)
    assert all(a is b for a, b in zip(out.parameters(), params, strict=True))
    assert len(list(out.parameters())) == len(params)
    assert repr(out) == repr(ref)
    x = _x(2, 3) if "Cell" in name else _x(5, 2, 3)
    compare_modules(ref, out, x, dropout_seed=3)


def test_convert_keeps_optimizer_working():
    """An optimizer made before convert() still trains the converted model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.GRU(3, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model = fastrnn.convert(model)
    assert type(model[0]) is fastrnn.GRU
    before = model[0].weight_hh_l0.detach().clone()
    y, _ = model(_x(4, 2, 3))
    y.pow(2).sum().backward()
    assert model[0].weight_hh_l0.grad is not None
    opt.step()
    assert not torch.equal(model[0].weight_hh_l0.detach(), before)


# ---------------------------------------------------------------------------------------------
# pickling, copying, loading
# ---------------------------------------------------------------------------------------------
class LM(nn.Module):
    def __init__(self, rnn="LSTM", vocab=11, emb=4, hidden=6, layers=2, dropout=0.0):
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.rnn = getattr(nn, rnn)(emb, hidden, num_layers=layers, dropout=dropout)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, tokens):  # tokens: (T, B)
        y, _ = self.rnn(self.emb(tokens))
        return self.out(y)


def _tokens(T=6, B=3, vocab=11, seed=0):
    return torch.randint(0, vocab, (T + 1, B), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rnn", ["LSTM", "GRU"])
def test_torch_save_load_whole_model(rnn):
    torch.manual_seed(0)
    model = fastrnn.convert(LM(rnn))
    tokens = _tokens()[:-1]
    expected = model(tokens).detach()
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded.rnn) is getattr(fastrnn, rnn)
    assert_close(loaded(tokens), expected, "reloaded model output")
    # the reloaded model still trains (gradients land on its own parameters)
    loaded(tokens).sum().backward()
    assert loaded.rnn.weight_ih_l0.grad is not None


@pytest.mark.parametrize("name", CLASSES)
def test_save_load_module_and_deepcopy(name):
    ref, fast = make_pair(name, 3, 4)
    x = _x(2, 3) if "Cell" in name else _x(5, 2, 3)
    buf = io.BytesIO()
    torch.save(fast, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is type(fast)
    compare_modules(ref, loaded, x)
    dup = copy.deepcopy(fast)
    assert type(dup) is type(fast)
    compare_modules(ref, dup, x)


def test_to_dtype_after_construction_and_back():
    ref, fast = make_pair("LSTM", 3, 4, num_layers=2)
    x = _x(5, 2, 3)
    for dtype in (F64, torch.float32, F64):
        ref.to(dtype)
        fast.to(dtype)
        assert all(p.dtype == dtype for p in fast.parameters())
        compare_modules(ref, fast, x.to(dtype))


def test_constructed_with_dtype_kwarg():
    torch.manual_seed(5)
    ref = nn.GRU(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    torch.manual_seed(5)
    fast = fastrnn.GRU(3, 4, num_layers=2, bidirectional=True, dtype=F64)
    assert_same_parameters(ref, fast)
    assert all(p.dtype == F64 for p in fast.parameters())
    compare_modules(ref, fast, _x(5, 2, 3, dtype=F64))


# ---------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------
def _train(model, steps=5, seed=0):
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    losses = []
    model.train()
    for step in range(steps):
        tokens = _tokens(seed=seed)
        torch.manual_seed(1000 + step)  # dropout masks
        logits = model(tokens[:-1])
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tokens[1:].reshape(-1)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize(
    "rnn,dropout",
    [
        pytest.param("LSTM", 0.0, id="LSTM"),
        pytest.param("GRU", 0.0, id="GRU"),
        pytest.param("LSTM", 0.3, id="LSTM-dropout"),
        pytest.param("RNN", 0.25, id="RNN-dropout"),
    ],
)
def test_training_loop_matches_torch(rnn, dropout):
    torch.manual_seed(0)
    ref = LM(rnn, dropout=dropout)
    torch.manual_seed(0)
    fast = LM(rnn, dropout=dropout)
    # optimizer made inside _train from the converted model's parameters
    fast = fastrnn.convert(fast)
    assert type(fast.rnn) is getattr(fastrnn, rnn)
    ref_losses = _train(ref)
    fast_losses = _train(fast)
    assert ref_losses[-1] < ref_losses[0]
    for i, (a, b) in enumerate(zip(fast_losses, ref_losses, strict=True)):
        assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), f"step {i}: {fast_losses} vs {ref_losses}"
    for (n, p_ref), (_, p_fast) in zip(
        ref.named_parameters(), fast.named_parameters(), strict=True
    ):
        assert_close(p_fast.detach(), p_ref.detach(), f"trained {n}")


def test_inplace_data_update_is_picked_up():
    """p.data.add_ does not bump the version counter: no stale weight cache allowed."""
    for mode in ("LSTM", "GRU", "RNN_TANH", "LSTMCell", "GRUCell", "RNNCell_RELU"):
        kw = {} if "Cell" in mode else dict(num_layers=2, bidirectional=True)
        ref, fast = make_mode_pair(mode, 3, 4, **kw)
        x = _x(2, 3) if "Cell" in mode else _x(5, 2, 3)
        compare_modules(ref, fast, x)
        with torch.no_grad():
            first = run_fwd_bwd(fast, x, backward=False)
        for step in range(2):
            for i, (p_ref, p_fast) in enumerate(
                zip(ref.parameters(), fast.parameters(), strict=True)
            ):
                delta = _x(*p_ref.shape, seed=100 * step + i) * 0.3
                p_ref.data.add_(delta)
                p_fast.data.add_(delta)
            # forward-only (the common eval path) and forward+backward
            with torch.no_grad():
                nograd = run_fwd_bwd(fast, x, backward=False)
                assert_results_close(nograd, run_fwd_bwd(ref, x, backward=False))
            assert not torch.allclose(nograd["h"], first["h"]), mode
            compare_modules(ref, fast, x)
        # optimizer-style in-place update (bumps the version counter)
        with torch.no_grad():
            for p_ref, p_fast in zip(ref.parameters(), fast.parameters(), strict=True):
                p_ref.mul_(0.9)
                p_fast.mul_(0.9)
        compare_modules(ref, fast, x)


def test_parameter_reassignment_is_picked_up():
    ref, fast = make_pair("LSTM", 3, 4)
    x = _x(5, 2, 3)
    new = nn.Parameter(_x(16, 4, seed=7) * 0.2)
    ref.weight_hh_l0 = nn.Parameter(new.detach().clone())
    fast.weight_hh_l0 = nn.Parameter(new.detach().clone())
    compare_modules(ref, fast, x)


@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_RELU"])
def test_flatten_parameters(mode):
    ref, fast = make_mode_pair(mode, 3, 4, num_layers=2, bidirectional=True)
    params = list(fast.parameters())
    fast.flatten_parameters()
    ref.flatten_parameters()
    assert all(a is b for a, b in zip(fast.parameters(), params, strict=True))
    compare_modules(ref, fast, _x(5, 2, 3))
    fast.flatten_parameters()
    compare_modules(ref, fast, _x(4, 3, 3, seed=1))


def test_functional_call_uses_given_weights():
    ref, fast = make_mode_pair("GRU", 3, 4, num_layers=2)
    new = {n: _x(*p.shape, seed=i) * 0.3 for i, (n, p) in enumerate(fast.named_parameters())}
    x = _x(5, 2, 3)
    y_ref, h_ref = torch.func.functional_call(ref, new, (x,))
    y_fast, h_fast = torch.func.functional_call(fast, new, (x,))
    assert_close(y_fast, y_ref, "y")
    assert_close(h_fast, h_ref, "h")
    # and the module's own weights are back afterwards
    compare_modules(ref, fast, x)


def test_hooks_and_module_utilities():
    ref, fast = make_pair("LSTM", 3, 4)
    seen = []
    fast.register_forward_hook(lambda m, i, o: seen.append(type(o[0])))
    fast(_x(5, 2, 3))
    assert seen == [torch.Tensor]
    fast.zero_grad()
    fast.requires_grad_(False)
    with torch.no_grad():
        y, _ = fast(_x(5, 2, 3))
    assert not y.requires_grad


# ---------------------------------------------------------------------------------------------
# fast path really is fastrnn's; fallback for dtypes without a kernel
# ---------------------------------------------------------------------------------------------
_TORCH_RNN_OPS = (
    "lstm",
    "gru",
    "rnn_tanh",
    "rnn_relu",
    "lstm_cell",
    "gru_cell",
    "rnn_tanh_cell",
    "rnn_relu_cell",
)


class _NoRNNVF:
    """Stands in for torch's _VF inside torch.nn.modules.rnn: RNN kernels are off limits."""

    def __init__(self, vf):
        self._vf = vf

    def __getattr__(self, name):
        if name in _TORCH_RNN_OPS:

            def boom(*args, **kwargs):
                raise AssertionError(f"fastrnn called torch's own _VF.{name} on a float32/64 input")

            return boom
        return getattr(self._vf, name)


@pytest.mark.parametrize(
    "mode,kwargs,packed",
    [
        pytest.param("LSTM", dict(num_layers=2, bidirectional=True), False, id="LSTM"),
        pytest.param("LSTM", dict(proj_size=2), True, id="LSTM-proj-packed"),
        pytest.param("GRU", dict(num_layers=2), True, id="GRU-packed"),
        pytest.param("RNN_TANH", {}, False, id="RNN_TANH"),
        pytest.param("RNN_RELU", dict(bidirectional=True), False, id="RNN_RELU"),
        pytest.param("LSTMCell", {}, False, id="LSTMCell"),
        pytest.param("GRUCell", {}, False, id="GRUCell"),
        pytest.param("RNNCell_TANH", {}, False, id="RNNCell_TANH"),
        pytest.param("RNNCell_RELU", {}, False, id="RNNCell_RELU"),
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["f32", "f64"])
def test_float_inputs_use_fastrnn_kernels(monkeypatch, mode, kwargs, packed, dtype):
    ref, fast = make_mode_pair(mode, 3, 4, dtype=dtype, **kwargs)
    x = _x(2, 3, dtype=dtype) if "Cell" in mode else _x(5, 3, 3, dtype=dtype)
    run_kw = dict(lengths=[5, 2, 4], enforce_sorted=False) if packed else {}
    expected = run_fwd_bwd(ref, x, **run_kw)
    import torch.nn.modules.rnn as rnn_mod

    monkeypatch.setattr(rnn_mod, "_VF", _NoRNNVF(rnn_mod._VF))
    for op in _TORCH_RNN_OPS:
        monkeypatch.setattr(torch, op, getattr(rnn_mod._VF, op))
    with pytest.raises(AssertionError, match="own _VF"):  # the patch is effective
        ref(x)
    got = run_fwd_bwd(fast, x, **run_kw)
    assert_results_close(got, expected)


def test_patched_torch_names_do_not_matter(monkeypatch):
    """fastrnn must not look torch.nn.LSTM & co. up at call time."""
    ref, fast = make_pair("LSTM", 3, 4, num_layers=2)
    cref, cfast = make_pair("GRUCell", 3, 4)

    class Dummy(nn.Module):
        def forward(self, *args, **kwargs):
            raise AssertionError("patched class was used")

    for name in CLASSES:
        monkeypatch.setattr(nn, name, Dummy)
        monkeypatch.setattr(torch.nn.modules.rnn, name, Dummy)
    compare_modules(ref, fast, _x(5, 2, 3))
    compare_modules(cref, cfast, _x(2, 3))


def test_fallback_for_half_precision_warns_and_matches_torch(monkeypatch):
    """float16/bfloat16 have no kernel: torch's implementation runs, with one UserWarning
    (once per process: the record of warnings issued starts empty here)."""
    from fastrnn import functional

    monkeypatch.setattr(functional, "_warned", set())
    ref, fast = make_pair("LSTM", 3, 4, num_layers=2, bidirectional=True, dtype=torch.float16)
    x = _x(5, 2, 3).to(torch.float16)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("default")
        results = [run_fwd_bwd(fast, x) for _ in range(3)]
    user = [m for m in w if issubclass(m.category, UserWarning) and "oneDNN" not in str(m.message)]
    assert len(user) == 1, [str(m.message) for m in w]
    expected = run_fwd_bwd(ref, x)
    for res in results:
        assert res.keys() == expected.keys()
        for k in expected:
            assert torch.equal(res[k], expected[k]), k  # the very same implementation

    # bfloat16 and a cell: results identical to torch (warnings allowed, at most once each)
    for name, shape in (("GRU", (5, 2, 3)), ("LSTMCell", (2, 3)), ("RNN", (5, 2, 3))):
        ref, fast = make_pair(name, 3, 4, dtype=torch.bfloat16)
        xb = _x(*shape).to(torch.bfloat16)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("default")
            got = [run_fwd_bwd(fast, xb) for _ in range(2)]
        assert len([m for m in w if issubclass(m.category, UserWarning)]) <= 1
        expected = run_fwd_bwd(ref, xb)
        for res in got:
            for k in expected:
                assert torch.equal(res[k], expected[k]), (name, k)

    # CPU autocast: whatever fastrnn does, the result is torch's (dtype and values)
    ref, fast = make_pair("GRU", 3, 4, num_layers=2)
    x = _x(5, 2, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_ref, h_ref = ref(x)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            y_fast, h_fast = fast(x)
    assert y_fast.dtype == y_ref.dtype and h_fast.dtype == h_ref.dtype
    assert torch.equal(y_fast, y_ref) and torch.equal(h_fast, h_ref)


# --------------------------------------------------------------------------------------------
# torch.jit.trace around fastrnn modules (torch.compile: test_compile.py)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["LSTM", "GRU", "RNN"])
@pytest.mark.parametrize("steps", [1, 5])
def test_torch_jit_trace_records_the_layer(name, steps):
    """torch.jit.trace with its default check (it traces again under no_grad and compares the
    graphs): the traced model gives torch.nn's outputs and gradients on new inputs of the
    example's shape."""
    torch.manual_seed(0)
    fast = getattr(fastrnn, name)(8, 16)
    ref = getattr(torch.nn, name)(8, 16)
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(steps, 3, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(fast, (x,))
    x2 = torch.randn(steps, 3, 8, requires_grad=True)
    y = traced(x2)[0]
    y.sum().backward()
    grad = x2.grad
    x2.grad = None
    y_ref = ref(x2)[0]
    y_ref.sum().backward()
    assert (y - y_ref).abs().max().item() < 1e-5
    assert (grad - x2.grad).abs().max().item() < 1e-5


class _ExportedModel(nn.Module):
    def __init__(self, rnn: nn.Module):
        super().__init__()
        self.rnn = rnn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.rnn(x)
        return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize(
    "name,kwargs,shape",
    [
        ("LSTM", {"num_layers": 2, "batch_first": True}, (3, 5, 4)),
        ("LSTM", {"proj_size": 3, "bidirectional": True}, (5, 3, 4)),
        ("GRU", {}, (5, 3, 4)),
        ("RNN", {"nonlinearity": "relu"}, (5, 4)),
        ("LSTMCell", {}, (3, 4)),
        ("GRUCell", {}, (3, 4)),
        ("RNNCell", {}, (4,)),
    ],
)
def test_torch_export_records_torchs_implementation(name, kwargs, shape, monkeypatch):
    """torch.export traces a model into a program of torch ops, which Numba kernels can't be
    part of (torch.nn's modules export; fastrnn's crashed in the tracer): under export fastrnn
    runs torch's own implementation, warning once, so the exported program computes torch.nn's
    results on new inputs."""
    monkeypatch.setattr(fastrnn.functional, "_warned", set())
    ref, fast = make_pair(name, 4, 6, **kwargs)
    x = torch.randn(shape)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        program = torch.export.export(_ExportedModel(fast).eval(), (x,))
    assert any("torch.export" in str(w.message) for w in caught)
    assert not any("fastrnn" in str(node.target) for node in program.graph.nodes)
    x2 = torch.randn(shape)
    with torch.no_grad():
        assert (program.module()(x2) - _ExportedModel(ref)(x2)).abs().max().item() < 1e-5
    # and outside export, fastrnn's own kernels again
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast(x2)


class _ScriptedModel(nn.Module):
    """A model with a sequence module and a cell, for torch.jit.script (which reads its source)."""

    def __init__(self, rnn: nn.Module, cell: nn.Module):
        super().__init__()
        self.rnn = rnn
        self.cell = cell

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(x)
        return y.sum() + self.cell(x[0]).sum()


def test_torch_jit_script_gets_torch_modules(monkeypatch):
    """TorchScript can't compile Numba: a scripted model gets torch's modules in place of
    fastrnn's (`__prepare_scriptable__`), sharing their parameters, with one warning each. The
    scripted model computes torch's results and gradients, and saves and loads."""
    monkeypatch.setattr(fastrnn.functional, "_warned", set())
    ref_rnn, fast_rnn = make_pair("LSTM", 3, 4, num_layers=2)
    ref_cell, fast_cell = make_pair("GRUCell", 3, 4)
    ref, fast = _ScriptedModel(ref_rnn, ref_cell), _ScriptedModel(fast_rnn, fast_cell)
    parameters = list(fast.parameters())
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        scripted = torch.jit.script(fast)
    messages = [str(m.message) for m in w if "fastrnn's Numba kernels" in str(m.message)]
    assert len(messages) == 2 and any(m.startswith("LSTM:") for m in messages), messages
    assert isinstance(scripted.rnn, torch.jit.ScriptModule)
    assert type(fast.rnn) is nn.LSTM  # torch.jit.script swaps prepared submodules in place
    assert all(a is b for a, b in zip(parameters, scripted.parameters(), strict=True))
    x = _x(5, 2, 3)
    loss, expected = scripted(x), ref(x)
    assert_close(loss, expected)
    loss.backward()
    expected.backward()
    for (name, a), b in zip(ref.named_parameters(), parameters, strict=True):
        assert_close(b.grad, a.grad, name)
    buffer = io.BytesIO()
    torch.jit.save(scripted, buffer)
    buffer.seek(0)
    assert_close(torch.jit.load(buffer)(x), expected)


def _parameter_grads(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """torch.func.grad of sum(output) over the module's parameters, by functional_call."""

    def loss(params):
        out = torch.func.functional_call(module, params, (x,))
        return (out[0] if isinstance(out, tuple) else out).sum()

    return torch.func.grad(loss)(dict(module.named_parameters()))


@pytest.mark.parametrize("name", CLASSES)
def test_torch_func_transforms_run_torch_implementation(monkeypatch, name):
    """Under torch.func's transforms (grad here; vmap and jvp alike) and forward-mode AD,
    fastrnn's autograd.Functions can't run: torch's implementation does, with one warning, and
    the results are torch's. Outside them the kernels run again."""
    monkeypatch.setattr(fastrnn.functional, "_warned", set())
    ref, fast = make_pair(name, 3, 4)
    x = _x(2, 3) if "Cell" in name else _x(5, 2, 3)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = _parameter_grads(fast, x)
    assert any("torch.func" in str(m.message) for m in w), [str(m.message) for m in w]
    expected = _parameter_grads(ref, x)
    for key in expected:
        assert_close(got[key], expected[key], key)

    import torch.autograd.forward_ad as forward_ad

    state = torch.randn(1, 2, 4) if "Cell" not in name else torch.randn(2, 4)
    hx = (state, state) if name.startswith("LSTM") else state
    for dual_input in (True, False):  # a dual input, or only a dual state
        results = []
        for module in (ref, fast):
            with forward_ad.dual_level():
                if dual_input:
                    args = (forward_ad.make_dual(x, torch.ones_like(x)), hx)
                else:
                    dual = forward_ad.make_dual(state, torch.ones_like(state))
                    args = (x, (dual, state) if name.startswith("LSTM") else dual)
                try:
                    out = module(*args)
                except NotImplementedError as error:  # torch's LSTM: oneDNN has no forward AD
                    results.append(type(error))
                    continue
                out = out[0] if isinstance(out, tuple) else out
                results.append(forward_ad.unpack_dual(out))
        if results[0] is NotImplementedError:
            assert name == "LSTM" and results[1] is NotImplementedError
            continue
        assert_close(results[1].primal, results[0].primal)
        assert_close(results[1].tangent, results[0].tangent)
    compare_modules(ref, fast, x)


def _functional_call(name: str, x, state, weights):
    """fastrnn.functional's `name` and torch._VF's, as (fastrnn's, torch's) closures over x."""
    relu = "relu" in name
    if name.endswith("_cell"):
        base = name.removesuffix("_cell")
        kind = base.split("_")[0]
        fast = getattr(fastrnn.functional, f"{kind}_cell")
        kwargs = {"nonlinearity": "relu" if relu else "tanh"} if kind == "rnn" else {}
        return (
            lambda x: fast(x, state, *weights, **kwargs),
            lambda x: getattr(torch._VF, name)(x, state, *weights),
        )
    flags = (True, 1, 0.0, True, False)
    if name.startswith("rnn"):
        nonlinearity = "relu" if relu else "tanh"
        return (
            lambda x: fastrnn.functional.rnn(x, state, weights, *flags, False, None, nonlinearity),
            lambda x: getattr(torch._VF, name)(x, state, weights, *flags, False),
        )
    return (
        lambda x: getattr(fastrnn.functional, name)(x, state, weights, *flags),
        lambda x: getattr(torch._VF, name)(x, state, weights, *flags, False),
    )


@pytest.mark.parametrize("name", _TORCH_RNN_OPS)
def test_functional_api_under_transforms_runs_torch(monkeypatch, name):
    """fastrnn.functional called directly under torch.func (grad over the input, vmap over a
    batch of inputs) and with a dual input hands the call to torch._VF's function, warning
    once; the results are torch's. (Before, its autograd.Functions raised there.)"""
    monkeypatch.setattr(fastrnn.functional, "_warned", set())
    torch.manual_seed(0)
    cell = name.endswith("_cell")
    gates = {"lstm": 4, "gru": 3}.get(name.split("_")[0], 1)
    weights = [torch.randn(gates * 4, 3), torch.randn(gates * 4, 4)]
    weights += [torch.randn(gates * 4), torch.randn(gates * 4)]
    h = torch.randn(2, 4) if cell else torch.randn(1, 2, 4)
    state = (h, torch.randn_like(h)) if name.startswith("lstm") else h
    x = torch.randn(2, 3) if cell else torch.randn(5, 2, 3)
    fast, ref = _functional_call(name, x, state, weights)

    def first(out):
        return out[0] if isinstance(out, (tuple, list)) else out

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = torch.func.grad(lambda x: first(fast(x)).sin().sum())(x)
    assert any("torch._VF" in str(m.message) for m in w), [str(m.message) for m in w]
    assert_close(got, torch.func.grad(lambda x: first(ref(x)).sin().sum())(x))

    import torch.autograd.forward_ad as forward_ad

    tangent = torch.randn_like(x)
    if name == "lstm":  # torch's (oneDNN) LSTM has no forward AD: the same error
        for function in (fast, ref):
            with forward_ad.dual_level(), pytest.raises(NotImplementedError, match="forward AD"):
                function(forward_ad.make_dual(x, tangent))
        return
    with forward_ad.dual_level():
        dual = forward_ad.make_dual(x, tangent)
        got = forward_ad.unpack_dual(first(fast(dual)))
    with forward_ad.dual_level():
        expected = forward_ad.unpack_dual(first(ref(forward_ad.make_dual(x, tangent))))
    assert_close(got.primal, expected.primal)
    assert_close(got.tangent, expected.tangent)
    assert_close(first(fast(x)), first(ref(x)))  # outside a transform: the kernels


@pytest.mark.parametrize("name", _TORCH_RNN_OPS)
def test_functional_api_runs_torch_for_dtypes_without_kernels(monkeypatch, name):
    """fastrnn.functional called with float16 or bfloat16 CPU tensors (no CPU kernels) hands
    the call to torch._VF's function, warning once, as the modules do; an integer input gets
    torch's own error."""
    monkeypatch.setattr(fastrnn.functional, "_warned", set())
    for dtype in (torch.float16, torch.bfloat16, torch.int64):
        torch.manual_seed(0)
        cell = name.endswith("_cell")
        gates = {"lstm": 4, "gru": 3}.get(name.split("_")[0], 1)
        weight_dtype = torch.float32 if dtype == torch.int64 else dtype
        weights = [torch.randn(gates * 4, n, dtype=weight_dtype) for n in (3, 4)]
        weights += [torch.randn(gates * 4, dtype=weight_dtype) for _ in range(2)]
        h = torch.randn(2, 4) if cell else torch.randn(1, 2, 4)
        h = h.to(weight_dtype)
        state = (h, h.clone()) if name.startswith("lstm") else h
        x = (torch.randn(2, 3) if cell else torch.randn(5, 2, 3)).to(dtype)
        fast, ref = _functional_call(name, x, state, weights)
        if dtype == torch.int64:
            with pytest.raises(RuntimeError) as expected:
                ref(x)
            with pytest.raises(RuntimeError, match=re.escape(str(expected.value))):
                fast(x)
            continue
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            got = fast(x)
        assert any(f"no CPU kernel for {dtype}" in str(m.message) for m in w)
        expected = ref(x)
        for a, b in zip(
            got if isinstance(got, tuple) else (got,),
            expected if isinstance(expected, tuple) else (expected,),
            strict=True,
        ):
            assert a.dtype == dtype and torch.equal(a, b)
