"""The layer-norm LSTM (`fastrnn.LayerNormLSTM`, cell kind layernorm_lstm): the layer Function
against the plain-torch reference (`fastrnn.reference`), the module against its plain-torch
formulas over the parity grid (layers, directions, batch_first, bias, unbatched, hx given or
not, packed with unsorted lengths, float32 and float64), against what users write today
(nn.LSTMCell's weights with nn.LayerNorm in a loop, `bench.layernorm_lstm`), gradcheck and
gradgradcheck, thread counts, parameters and state_dict, the fallback and the cell."""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from conftest import (
    assert_results_close,
    assert_same_bits_for_thread_counts,
    capture_exception,
    run_fwd_bwd,
)
from torch import nn

import fastrnn
from bench.layernorm_lstm import UsersLayerNormLSTM
from fastrnn import autograd, reference
from fastrnn import layernorm_lstm as layernorm_module
from fastrnn.cells import layernorm_widths

F32, F64 = torch.float32, torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randomise_norms(module: nn.Module, seed: int = 7) -> None:
    """Gains around 1 and biases around 0, not exactly 1 and 0: a mixed-up gain or bias then
    shows in the results."""
    gen = _gen(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("layernorm_"):
                noise = torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype)
                p.copy_((1.0 if "_weight" in name else 0.0) + 0.3 * noise)


def _module_pair(dtype, seed=0, **kwargs):
    """(plain-torch twin, kernel module) with the same parameters: the twin runs the formulas in
    plain torch (`fastrnn.reference`), as every call without a kernel does."""
    torch.manual_seed(seed)
    fast = fastrnn.LayerNormLSTM(4, 5, **kwargs).to(dtype)
    _randomise_norms(fast)
    plain = _PlainLayerNormLSTM(4, 5, **kwargs).to(dtype)
    plain.load_state_dict(fast.state_dict())
    return plain, fast


class _PlainLayerNormLSTM(fastrnn.LayerNormLSTM):
    """LayerNormLSTM that always takes the plain-torch path."""

    def _layers(self, x, batch_sizes, hx):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(layernorm_module, "kernel_reason", lambda *a: "plain")
            patch.setattr(layernorm_module, "warn_fallback", lambda *a: None)
            return super()._layers(x, batch_sizes, hx)


def _layer_arguments(dtype, *, directions=2, bias=True, lengths=(4, 4, 4), I=3, H=4, seed=0):
    """LayerFunction's arguments (cell kind first) as fresh leaves, packed time-major rows."""
    gen = _gen(seed)
    steps = max(lengths)
    batch_sizes = np.array([sum(1 for n in lengths if n > t) for t in range(steps)], np.int64)
    B, N = int(batch_sizes[0]), int(batch_sizes.sum())

    def leaf(*shape, scale=0.5, shift=0.0):
        t = shift + scale * torch.randn(shape, generator=gen, dtype=F64)
        return t.to(dtype).requires_grad_()

    norms = torch.cat(
        [
            leaf(directions, width, scale=0.3, shift=1.0 if k % 2 == 0 else 0.0)
            for k, width in enumerate(layernorm_widths(H))
        ],
        1,
    ).detach()
    return [
        "layernorm_lstm",
        leaf(N, I, scale=1.0),
        batch_sizes,
        leaf(directions, B, H),
        leaf(directions, B, H),
        leaf(directions, 4 * H, I),
        leaf(directions, 4 * H, H),
        leaf(directions, 4 * H) if bias else None,
        leaf(directions, 4 * H) if bias else None,
        None,
        norms.requires_grad_(),
    ]


def _outputs_and_grads(run, arguments):
    outputs = run(*arguments)
    leaves = [a for a in arguments if isinstance(a, torch.Tensor) and a.requires_grad]
    gen = _gen(99)
    weights = [torch.randn(o.shape, generator=gen, dtype=F64).to(o.dtype) for o in outputs]
    grads = torch.autograd.grad(outputs, leaves, weights)
    return [*outputs, *grads]


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize(
    "directions, bias, lengths",
    [
        (1, True, (5, 5, 5)),
        (2, True, (5, 5)),
        (2, False, (5, 5, 5)),
        (1, True, (5, 3, 3, 1)),
        (2, True, (6, 4, 1)),
    ],
    ids=["uni", "bi", "bi-nobias", "packed-uni", "packed-bi"],
)
def test_layer_matches_reference(directions, bias, lengths, dtype):
    """LayerFunction (the CPU kernels) against `reference.layer`: output, h_n, c_n and the
    gradients of x, h0, c0, every weight and every gain and bias."""
    arguments = _layer_arguments(dtype, directions=directions, bias=bias, lengths=lengths)
    fast = _outputs_and_grads(autograd.LayerFunction.apply, arguments)
    expected = _outputs_and_grads(reference.layer, arguments)
    tol = 1e-5 if dtype == F32 else 1e-10
    for k, (a, e) in enumerate(zip(fast, expected, strict=True)):
        scale = max(1.0, e.abs().max().item())
        assert (a - e).abs().max().item() <= tol * scale, f"result {k}"


# The module grid: layers, directions, batch_first, bias, unbatched input, hx, dtype.
_GRID = [
    dict(),
    dict(hx=True),
    dict(num_layers=2, bidirectional=True, hx=True),
    dict(num_layers=2, batch_first=True),
    dict(bidirectional=True, bias=False, dtype=F64),
    dict(unbatched=True, hx=True),
    dict(unbatched=True, bidirectional=True, batch_first=True),
    dict(num_layers=2, bidirectional=True, dtype=F64, hx=True),
]


def _grid_id(c: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in c.items()).replace("torch.", "") or "defaults"


def _inputs(c: dict, dtype, batch_first=False, T=5, B=3, layers=1, D=1):
    gen = _gen(3)
    shape = (T, 4) if c.get("unbatched") else ((B, T, 4) if batch_first else (T, B, 4))
    x = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    if not c.get("hx"):
        return x, None
    batch = () if c.get("unbatched") else (B,)
    states = [0.5 * torch.randn((layers * D, *batch, 5), generator=gen, dtype=F64) for _ in "hc"]
    return x, tuple(s.to(dtype) for s in states)


def _assert_float32_as_close_as_torch(fast_res: dict, plain_res: dict, truth: dict) -> None:
    """float32 results against the float64 formulas: the kernel's error may be up to 4x plain
    torch's float32 error, plus 1e-5 of the values' magnitude (gradients through a norm carry
    1/σ factors, and plain torch's own float32 error reaches ~1e-5 of the magnitude there)."""
    assert list(fast_res) == list(truth)
    for key, expected in truth.items():
        if expected is None:
            assert fast_res[key] is None, key
            continue
        assert fast_res[key].dtype == F32, key
        error = (fast_res[key].double() - expected).abs().max().item()
        plain_error = (plain_res[key].double() - expected).abs().max().item()
        scale = max(1.0, expected.abs().max().item())
        assert error <= 4 * plain_error + 1e-5 * scale, f"{key}: {error:.2e} ({plain_error:.2e})"


@pytest.mark.parametrize("c", _GRID, ids=_grid_id)
def test_module_matches_plain_formulas(c):
    """The module's outputs, final states and the gradients of input, h0, c0 and every
    parameter against the same module running the formulas in plain torch: to 1e-10 in
    float64; in float32, as close to the float64 formulas as plain torch's float32 is."""
    dtype = c.get("dtype", F32)
    kwargs = {k: c[k] for k in ("num_layers", "bidirectional", "batch_first", "bias") if k in c}
    shapes = dict(
        batch_first=c.get("batch_first", False),
        layers=c.get("num_layers", 1),
        D=2 if c.get("bidirectional") else 1,
    )
    plain, fast = _module_pair(dtype, **kwargs)
    x, hx = _inputs(c, dtype, **shapes)
    fast_res, plain_res = run_fwd_bwd(fast, x, hx), run_fwd_bwd(plain, x, hx)
    if dtype == F64:
        assert_results_close(fast_res, plain_res)
        return
    plain64, _ = _module_pair(F64, **kwargs)
    truth = run_fwd_bwd(plain64, *_inputs(c, F64, **shapes))
    _assert_float32_as_close_as_torch(fast_res, plain_res, truth)


@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_inference_gives_the_training_forward(dtype):
    """Under no_grad the kernels keep no caches (another compiled path): the same bits as the
    forward that keeps them, dense and packed."""
    _, fast = _module_pair(dtype, num_layers=2, bidirectional=True)
    x, hx = _inputs(dict(hx=True), dtype, layers=2, D=2)
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([5, 2, 4]), enforce_sorted=False)
    for inputs in (x, packed):
        out, (h, c) = fast(inputs, hx)
        with torch.no_grad():
            out_ng, (h_ng, c_ng) = fast(inputs, hx)
        data = (lambda o: o.data) if inputs is packed else (lambda o: o)
        assert torch.equal(data(out), data(out_ng))
        assert torch.equal(h, h_ng) and torch.equal(c, c_ng)


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_packed_matches_each_sequence_alone(bidirectional):
    """Packed input of unsorted lengths, with hx: output rows and final states equal those of
    each sequence run alone (dense, its own length), and the kernel matches the plain twin on
    everything, gradients included."""
    plain, fast = _module_pair(F64, num_layers=2, bidirectional=bidirectional)
    D = 2 if bidirectional else 1
    lengths = [3, 6, 1, 4]
    x, hx = _inputs(dict(hx=True), F64, T=6, B=4, layers=2, D=D)
    fast_res = run_fwd_bwd(fast, x, hx, lengths=lengths, enforce_sorted=False)
    assert_results_close(fast_res, run_fwd_bwd(plain, x, hx, lengths=lengths, enforce_sorted=False))
    packed = nn.utils.rnn.pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
    with torch.no_grad():
        out, (h_n, c_n) = fast(packed, hx)
        padded, _ = nn.utils.rnn.pad_packed_sequence(out)
        for b, n in enumerate(lengths):
            alone, (h_b, c_b) = fast(x[:n, b : b + 1], (hx[0][:, b : b + 1], hx[1][:, b : b + 1]))
            torch.testing.assert_close(padded[:n, b], alone[:, 0], rtol=0, atol=1e-12)
            torch.testing.assert_close(h_n[:, b], h_b[:, 0], rtol=0, atol=1e-12)
            torch.testing.assert_close(c_n[:, b], c_b[:, 0], rtol=0, atol=1e-12)


def test_matches_lstm_cell_with_layer_norms():
    """The formulas are those of nn.LSTMCell's weights with nn.LayerNorm (eps 1e-5) on each
    side's gate pre-activations and on the cell: outputs, states and the input's gradient."""
    _, fast = _module_pair(F64)
    twin = UsersLayerNormLSTM(4, 5).double().copy_from(fast)
    x, hx = _inputs(dict(hx=True), F64)
    x.requires_grad_()
    out, (h, c) = fast(x, hx)
    x_twin = x.detach().clone().requires_grad_()
    out_t, (h_t, c_t) = twin(x_twin, (hx[0][0], hx[1][0]))
    torch.testing.assert_close(out, out_t, rtol=0, atol=1e-12)
    torch.testing.assert_close(c[0], c_t, rtol=0, atol=1e-12)
    (out.square().sum() + c.sum()).backward()
    (out_t.square().sum() + c_t.sum()).backward()
    torch.testing.assert_close(x.grad, x_twin.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        fast.layernorm_c_weight_l0.grad, twin.norm_c.weight.grad, rtol=0, atol=1e-12
    )


def test_benchmark_runs(capsys):
    """`python -m bench.layernorm_lstm` at a tiny size: parity passes, both timed."""
    from bench import layernorm_lstm

    assert layernorm_lstm.main(["--sizes", "3,2,3,4", "--calls", "1", "--reps", "1"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.split()[:4] == ["3", "2", "3", "4"] and "FAILED" not in line


@pytest.mark.parametrize("lengths", [(3, 3), (3, 2, 1)], ids=["dense", "packed"])
def test_gradcheck_and_gradgradcheck(lengths):
    """float64 gradcheck and gradgradcheck (fast mode) of the layer Function (bidirectional),
    every input."""
    arguments = _layer_arguments(F64, directions=2, lengths=lengths, I=2, H=2)

    def run(*tensors):
        full = list(arguments)
        for k, t in zip((1, 3, 4, 5, 6, 7, 8, 10), tensors, strict=True):
            full[k] = t
        return autograd.LayerFunction.apply(*full)

    tensors = [arguments[k] for k in (1, 3, 4, 5, 6, 7, 8, 10)]
    assert torch.autograd.gradcheck(run, tensors)
    # the second order runs through the plain-torch formulas; fast_mode (random projections of
    # the Jacobians) keeps it to seconds
    assert torch.autograd.gradgradcheck(run, tensors, fast_mode=True)


@pytest.mark.parametrize("batch", [1, 9])
def test_thread_counts_give_bitwise_equal_results(batch, monkeypatch):
    """1, 2 and 4 kernel threads (row chunks; at batch 1 an owner and a helper sharing each
    step's product) give the same bits: output, states and every gradient."""

    torch.manual_seed(0)
    model = fastrnn.LayerNormLSTM(5, 190, num_layers=2, bidirectional=True)
    _randomise_norms(model)
    lengths = torch.tensor([6, 4, 5, 1, 3, 6, 2, 5, 4][:batch])
    x = torch.randn(6, batch, 5)
    assert_same_bits_for_thread_counts(model, x, lengths, monkeypatch)


def test_parameters_state_dict_and_initialisation():
    """torch.nn.LSTM's parameter names, shapes and draws for the same seed, then the norms'
    gains (1) and biases (0) per layer and direction; state_dict round trip; whole-model
    torch.save / torch.load; reset_parameters keeps the norms' initial values."""
    torch.manual_seed(5)
    lstm = nn.LSTM(3, 4, num_layers=2, bidirectional=True)
    torch.manual_seed(5)
    model = fastrnn.LayerNormLSTM(3, 4, num_layers=2, bidirectional=True)
    params = dict(model.named_parameters())
    for name, p in lstm.named_parameters():
        assert torch.equal(params.pop(name), p), name
    expected = {
        f"layernorm_{side}_{kind}_l{layer}{suffix}": 4 if side == "c" else 16
        for layer in (0, 1)
        for suffix in ("", "_reverse")
        for side in ("ih", "hh", "c")
        for kind in ("weight", "bias")
    }
    assert {n: p.shape[0] for n, p in params.items()} == expected
    for name, p in params.items():
        assert torch.equal(p, torch.full_like(p, 1.0 if "_weight" in name else 0.0)), name
    assert list(model.state_dict()) == [n for n, _ in model.named_parameters()]
    _randomise_norms(model)
    other = fastrnn.LayerNormLSTM(3, 4, num_layers=2, bidirectional=True)
    other.load_state_dict(model.state_dict())
    x = torch.randn(4, 2, 3)
    torch.testing.assert_close(other(x)[0], model(x)[0], rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)
    model.reset_parameters()
    assert torch.equal(model.layernorm_c_weight_l1, torch.ones(4))
    assert model.weight_hh_l0.abs().max() <= 0.5


def test_errors_match_torch_lstm():
    """Bad input gets torch.nn.LSTM's exception type and message."""
    torch.manual_seed(0)
    lstm, model = nn.LSTM(3, 4), fastrnn.LayerNormLSTM(3, 4)
    cases = [
        (torch.randn(5, 2, 7), None),
        (torch.randn(5, 2, 3), (torch.zeros(1, 3, 4), torch.zeros(1, 3, 4))),
        (torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(2, 2, 4))),
        (torch.randn(5, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4))),
    ]
    for x, hx in cases:
        expected = capture_exception(lambda x=x, hx=hx: lstm(x, hx))
        assert expected is not None
        assert capture_exception(lambda x=x, hx=hx: model(x, hx)) == expected
    error = capture_exception(lambda: model(torch.randn(2, 2, 2, 3)))
    assert error is not None and error[0] is ValueError


def test_without_a_kernel_runs_the_formulas_and_warns_once(monkeypatch):
    """bfloat16 has no CPU kernel: the plain-torch formulas run, with one warning (the record
    of warnings issued starts empty), and give the float32 kernel's results to bfloat16's
    precision."""
    monkeypatch.setattr(fastrnn.functional, "_warned", set())
    _, fast = _module_pair(F32)
    x = torch.randn(4, 2, 4)
    expected, _ = fast(x)
    low = fastrnn.LayerNormLSTM(4, 5)
    low.load_state_dict(fast.state_dict())
    low = low.to(torch.bfloat16)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got, _ = low(x.to(torch.bfloat16))
        low(x.to(torch.bfloat16))
    messages = [str(w.message) for w in caught if "LayerNormLSTM" in str(w.message)]
    assert len(messages) == 1 and "bfloat16" in messages[0]
    torch.testing.assert_close(got.float(), expected, rtol=0, atol=0.05)


def test_cell_matches_the_layer_and_the_formulas():
    """LayerNormLSTMCell: nn.LSTMCell's parameter names and draws plus the norms; a step
    equals one step of the one-layer LayerNormLSTM (kernel) and the formulas, batched and
    unbatched, gradients included."""
    torch.manual_seed(2)
    reference_cell = nn.LSTMCell(4, 5)
    torch.manual_seed(2)
    cell = fastrnn.LayerNormLSTMCell(4, 5).double()
    for name, p in reference_cell.named_parameters():
        assert torch.equal(getattr(cell, name).float(), p), name
    _randomise_norms(cell)
    layer = fastrnn.LayerNormLSTM(4, 5).double()
    with torch.no_grad():
        for name, p in cell.named_parameters():
            getattr(layer, f"{name}_l0").copy_(p)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    hx = tuple(torch.randn(3, 5, dtype=F64) for _ in "hc")
    h, c = cell(x, hx)
    out, (h_n, c_n) = layer(x.unsqueeze(0), (hx[0][None], hx[1][None]))
    torch.testing.assert_close(h, out[0], rtol=0, atol=0)
    torch.testing.assert_close(c, c_n[0], rtol=0, atol=0)
    (h.sum() + c.square().sum()).backward()
    grads = [x.grad.clone(), *(p.grad.clone() for p in cell.parameters())]
    x.grad = None
    cell.zero_grad()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(layernorm_module, "kernel_reason", lambda *a: "plain")
        patch.setattr(layernorm_module, "warn_fallback", lambda *a: None)
        h_p, c_p = cell(x, hx)
    torch.testing.assert_close(h, h_p, rtol=0, atol=1e-12)
    (h_p.sum() + c_p.square().sum()).backward()
    for a, b in zip(grads, [x.grad, *(p.grad for p in cell.parameters())], strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    h1, c1 = cell(x[0].detach(), (hx[0][0], hx[1][0]))
    torch.testing.assert_close(h1, h[0].detach(), rtol=0, atol=1e-12)
    assert c1.shape == (5,)


_SIMULATED = bool(numba.config.ENABLE_CUDASIM)
_HAS_GPU = torch.cuda.is_available() and not _SIMULATED


@pytest.fixture
def cuda_path(monkeypatch):
    """CPU tensors through the CUDA launcher, the simulator standing in for the GPU (as
    test_cuda_kernels.py does)."""
    pytest.importorskip("numba.cuda")
    if not _SIMULATED:
        pytest.skip("needs NUMBA_ENABLE_CUDASIM=1 (set by conftest without a GPU)")
    from fastrnn import recurrence_cuda

    monkeypatch.setattr(autograd, "CUDA_KERNELS_ON_CPU", True)
    return recurrence_cuda


@pytest.mark.cudasim
@pytest.mark.parametrize(
    "dtype, lengths",
    [(F64, (3, 3)), (F64, (3, 1, 2)), (F32, (2, 2, 2))],
    ids=["f64-dense", "f64-packed", "f32-dense"],
)
def test_cuda_layer_matches_reference(dtype, lengths, cuda_path):
    """The CUDA kernels (stepwise, a thread per row) under the simulator, bidirectional:
    output, states and every gradient against `reference.layer`."""
    arguments = _layer_arguments(dtype, directions=2, lengths=lengths, I=2, H=3)
    fast = _outputs_and_grads(autograd.LayerFunction.apply, arguments)
    assert cuda_path.last_cuda_strategy() == "stepwise"
    expected = _outputs_and_grads(reference.layer, arguments)
    tol = 1e-5 if dtype == F32 else 1e-10
    for k, (a, e) in enumerate(zip(fast, expected, strict=True)):
        scale = max(1.0, e.abs().max().item())
        assert (a - e).abs().max().item() <= tol * scale, f"result {k}"


@pytest.mark.cudasim
def test_cuda_module_matches_plain_formulas(cuda_path):
    """The module through the CUDA kernels (simulator): two layers, packed unsorted, hx."""
    plain, fast = _module_pair(F64, num_layers=2)
    x, hx = _inputs(dict(hx=True), F64, T=3, B=2, layers=2)
    kwargs = dict(lengths=[2, 3], enforce_sorted=False)
    assert_results_close(run_fwd_bwd(fast, x, hx, **kwargs), run_fwd_bwd(plain, x, hx, **kwargs))


@pytest.mark.cuda
@pytest.mark.skipif(not _HAS_GPU, reason="needs an NVIDIA GPU and numba-cuda")
def test_gpu_matches_cpu():
    """On a GPU: float32 CUDA tensors against the CPU kernels, the same module."""
    _, fast = _module_pair(F32, num_layers=2, bidirectional=True)
    x, hx = _inputs(dict(hx=True), F32, T=7, B=5, layers=2, D=2)
    cpu = run_fwd_bwd(fast, x, hx)
    gpu = run_fwd_bwd(fast.cuda(), x.cuda(), tuple(h.cuda() for h in hx))
    assert_results_close({k: v.cpu() for k, v in gpu.items()}, cpu, tol=1e-4)


def test_readme_example_runs():
    """The README's layer-norm LSTM example, as users copy it."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, flags=re.S) if "LayerNorm" in b]
    assert len(blocks) == 1
    exec(compile(blocks[0], "README.md", "exec"), {})
