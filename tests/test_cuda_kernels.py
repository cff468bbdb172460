"""fastrnn's CUDA path (kernels/cuda + fastrnn/recurrence_cuda) against torch.nn.

Without a GPU (marker `cudasim`): the whole module path runs on CPU tensors through the CUDA
launcher with Numba's simulator standing in for the GPU and torch's CPU ops for cuBLAS
(`fastrnn.autograd.CUDA_KERNELS_ON_CPU`). Tiny sizes: the simulator runs every GPU thread as a
Python thread. The simulator runs a grid's blocks one after another, so a grid barrier can't
work across real blocks there: the persistent kernel runs with up to 3 virtual blocks per
direction inside one real block (see kernels/cuda/persistent.py), which exercises the unit split,
per-block shared memory and the per-step barrier; one test launches real blocks as a GPU does, on
a single step where no block waits for another. The simulator has no warp shuffles: the
persistent kernels' shuffle sums are checked by compiling to PTX (NVVM needed), the simulator
runs their shared-memory twin. The real cooperative launch is GPU-only.

With a GPU (marker `cuda`): the same comparisons on CUDA tensors against cuDNN; skipped here.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np
import pytest
import torch
from conftest import MODES, assert_results_close, make_mode_pair, run_fwd_bwd

import fastrnn
import fastrnn.autograd
import fastrnn.modules

F32, F64 = torch.float32, torch.float64
SIMULATED = bool(numba.config.ENABLE_CUDASIM)
HAS_GPU = torch.cuda.is_available() and not SIMULATED

try:
    from fastrnn import recurrence_cuda
    from fastrnn.kernels.cuda import common as cuda_common
except ImportError:  # numba-cuda not installed
    recurrence_cuda = None

needs_simulator = pytest.mark.skipif(
    not SIMULATED or recurrence_cuda is None,
    reason="needs numba-cuda and NUMBA_ENABLE_CUDASIM=1 (set by conftest without a GPU)",
)
needs_gpu = pytest.mark.skipif(
    not HAS_GPU or recurrence_cuda is None, reason="needs an NVIDIA GPU and numba-cuda"
)


@pytest.fixture
def cuda_path(monkeypatch):
    """Route CPU tensors through the CUDA launcher; yields a strategy setter. The modules
    check dtypes per device: CPU tensors standing in for CUDA ones get CUDA's dtypes (else
    float16 / bfloat16 would quietly run torch's implementation)."""
    monkeypatch.setattr(fastrnn.autograd, "CUDA_KERNELS_ON_CPU", True)
    kernel_dtypes = fastrnn.functional.KERNEL_DTYPES
    monkeypatch.setitem(kernel_dtypes, "cpu", kernel_dtypes["cuda"])
    before = recurrence_cuda.get_cuda_strategy()
    yield recurrence_cuda.set_cuda_strategy
    recurrence_cuda.set_cuda_strategy(before)


def _case(mode, strategy, *, dtype=F32, layers=1, bidirectional=False, proj=0, lengths=None,
          hx=False, batch_first=False, bias=True, T=3, B=3, I=2, H=3):  # fmt: skip
    case = dict(locals())  # every argument, by name
    return pytest.param(
        case,
        id="-".join(
            [mode, strategy, str(dtype).removeprefix("torch."), f"L{layers}"]
            + (["bi"] if bidirectional else [])
            + ([f"proj{proj}"] if proj else [])
            + (["packed"] if lengths else [])
            + (["hx"] if hx else [])
            + (["bf"] if batch_first else [])
            + ([] if bias else ["nobias"])
        ),
    )


CASES = []
for _mode in MODES:
    CASES += [
        _case(_mode, "persistent"),
        _case(_mode, "persistent", bidirectional=True, lengths=[3, 1, 2], hx=True),
        _case(_mode, "persistent", layers=2, batch_first=True, bias=False, B=2, H=4),
        _case(_mode, "stepwise", dtype=F64),
        _case(_mode, "stepwise", dtype=F64, bidirectional=True, lengths=[2, 3, 1], hx=True),
        _case(_mode, "stepwise", layers=2, bidirectional=True, hx=True),
    ]
CASES += [
    _case("LSTM", "stepwise", dtype=F64, proj=2, H=3),
    _case("LSTM", "stepwise", dtype=F64, proj=2, bidirectional=True, lengths=[1, 3, 2], hx=True),
    _case("LSTM", "auto", proj=1, layers=2),  # auto takes stepwise for a projection
    _case("GRU", "auto", B=5, H=2, T=2),
]


def _compare(c, device="cpu"):
    kwargs = {"proj_size": c["proj"]} if c["proj"] else {}
    ref, fast = make_mode_pair(
        c["mode"], c["I"], c["H"], num_layers=c["layers"], bias=c["bias"],
        batch_first=c["batch_first"], bidirectional=c["bidirectional"], dtype=c["dtype"], **kwargs,
    )  # fmt: skip
    ref.to(device)
    fast.to(device)
    gen = torch.Generator().manual_seed(7)
    shape = (c["B"], c["T"], c["I"]) if c["batch_first"] else (c["T"], c["B"], c["I"])
    x = torch.randn(shape, generator=gen, dtype=F64).to(c["dtype"]).to(device)
    hx = None
    if c["hx"]:
        D = 2 if c["bidirectional"] else 1
        out = c["proj"] or c["H"]
        h0 = torch.randn((c["layers"] * D, c["B"], out), generator=gen, dtype=F64)
        h0 = h0.to(c["dtype"]).to(device)
        if c["mode"] == "LSTM":
            c0 = torch.randn((c["layers"] * D, c["B"], c["H"]), generator=gen, dtype=F64)
            hx = (h0, c0.to(c["dtype"]).to(device))
        else:
            hx = h0
    kw = {"lengths": c["lengths"], "enforce_sorted": False} if c["lengths"] else {}
    fast_res = run_fwd_bwd(fast, x, hx, **kw)
    # cuDNN's float32 RNN may use TF32 by default (~1e-3 off float32): compare with strict fp32.
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        ref_res = run_fwd_bwd(ref, x, hx, **kw)
    return fast_res, ref_res


@pytest.mark.cudasim
@needs_simulator
@pytest.mark.parametrize("c", CASES)
def test_cuda_path_matches_torch(c, cuda_path):
    cuda_path(c["strategy"])
    fast_res, ref_res = _compare(c)
    assert_results_close(fast_res, ref_res)
    expected = "stepwise" if c["proj"] or c["strategy"] == "stepwise" else "persistent"
    assert recurrence_cuda.last_cuda_strategy() == expected


HALF_CASES = [
    _case(m, s, dtype=dtype, bidirectional=True, lengths=[3, 1, 2], hx=True)
    for dtype in (torch.float16, torch.bfloat16)
    for m in MODES
    for s in ("persistent", "stepwise")
] + [
    _case("LSTM", "stepwise", dtype=dtype, proj=2, layers=2)
    for dtype in (torch.float16, torch.bfloat16)
]
# float16 keeps 11 significant bits, bfloat16 8: a few roundings of each, relative to max(1, |x|)
HALF_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 4e-2}


@pytest.mark.cudasim
@needs_simulator
@pytest.mark.parametrize("c", HALF_CASES)
def test_cuda_path_16_bit_storage(c, cuda_path):
    """float16 / bfloat16 storage, float32 math and LSTM cell state: within 16-bit rounding of
    torch.nn run in float32 on the same weights and inputs."""
    cuda_path(c["strategy"])
    recurrence_cuda.last_cuda_strategy(reset=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to torch's implementation warns
        fast_res, _ = _compare(c)
    assert recurrence_cuda.last_cuda_strategy() == ("stepwise" if c["proj"] else c["strategy"])
    ref_res = _compare({**c, "dtype": F32})[1]
    for name, ref_value in ref_res.items():
        fast_value = fast_res[name]
        if isinstance(ref_value, torch.Tensor) and ref_value.is_floating_point():
            assert fast_value.dtype == c["dtype"], name
            scale = max(1.0, ref_value.abs().max().item())
            worst = (fast_value.float() - ref_value).abs().max().item()
            assert worst <= HALF_TOLERANCE[c["dtype"]] * scale, f"{name}: {worst:.3e}"


@pytest.mark.cudasim
@needs_simulator
@pytest.mark.parametrize("strategy", ["persistent", "stepwise"])
@pytest.mark.parametrize("mode", ["LSTMCell", "GRUCell", "RNNCell_RELU"])
def test_cuda_path_cells_match_torch(mode, strategy, cuda_path):
    cuda_path(strategy)
    ref, fast = make_mode_pair(mode, 3, 4)
    x = torch.randn(2, 3)
    fast_res = run_fwd_bwd(fast, x)
    ref_res = run_fwd_bwd(ref, x)
    assert_results_close(fast_res, ref_res)


@pytest.mark.cudasim
@needs_simulator
@pytest.mark.parametrize("strategy", ["persistent", "stepwise"])
def test_cuda_path_empty_batch(strategy, cuda_path):
    cuda_path(strategy)
    ref, fast = make_mode_pair("LSTM", 4, 5, num_layers=2, bidirectional=True)
    x = torch.randn(3, 0, 4, requires_grad=True)
    (y_ref, (h_ref, c_ref)), (y_fast, (h_fast, c_fast)) = ref(x), fast(x)
    assert y_fast.shape == y_ref.shape and h_fast.shape == h_ref.shape
    assert c_fast.shape == c_ref.shape
    y_fast.sum().backward()


def _real_blocks(launch, kernel, plan, threads, backward, W_hh, h0, cell, relu, args):
    """The GPU's launch of the persistent kernels (virtual_blocks = 0, one block's shared
    memory each), one direction at a time: the simulator gives each real block only that."""
    units, blocks = plan
    lanes, rows, shared = recurrence_cuda.persistent_launch(
        launch, plan, threads, W_hh, backward, h0.shape[1]
    )
    for d in range(h0.shape[0]):
        launch.run(
            kernel, (blocks, 1), threads, shared, cell, relu, d, 0, units, lanes, rows, *args
        )
    return True


@pytest.mark.cudasim
@needs_simulator
@pytest.mark.parametrize("mode", ["LSTM", "GRU", "RNN_TANH"])
def test_persistent_real_blocks_stay_in_their_shared_memory(mode, cuda_path, monkeypatch):
    """Several real blocks, launched as on a GPU: each block addresses only its own shared
    memory (an index past it raises under the simulator, and faults on a GPU). One step, so
    that no block needs another's results (the simulator runs blocks one after another, so a
    grid barrier can't order them): every result but dL/dh0 (which sums over all blocks' gate
    gradients) must match torch."""
    monkeypatch.setattr(recurrence_cuda, "_run_persistent", _real_blocks)
    cuda_path("persistent")
    c = {**_case(mode, "persistent", T=1, B=2, I=2, H=5, hx=True).values[0]}
    fast_res, ref_res = _compare(c)
    units, blocks = recurrence_cuda.persistent_plan(5, 5, 1, 1, recurrence_cuda._SIMULATOR_BLOCKS)
    assert blocks >= 2
    del fast_res["grad_h0"], ref_res["grad_h0"]
    assert_results_close(fast_res, ref_res)
    assert recurrence_cuda.last_cuda_strategy() == "persistent"


@pytest.mark.cudasim
@needs_simulator
@pytest.mark.parametrize("mode", list(MODES))
def test_persistent_stages_a_step_in_chunks_of_rows(mode, cuda_path, monkeypatch):
    """Where shared memory holds fewer rows than a step has, a step runs as several chunks
    (staged rows, items, barrier); here 2 rows at a time of 5, packed and bidirectional."""
    monkeypatch.setattr(recurrence_cuda, "_stage_rows", lambda *args: 2)
    cuda_path("persistent")
    c = _case(mode, "persistent", B=5, H=4, bidirectional=True, lengths=[3, 1, 2, 3, 2], hx=True)
    fast_res, ref_res = _compare(c.values[0])
    assert_results_close(fast_res, ref_res)
    assert recurrence_cuda.last_cuda_strategy() == "persistent"


@pytest.mark.cudasim
@needs_simulator
def test_auto_goes_on_stepwise_where_the_persistent_launch_is_refused(cuda_path, monkeypatch):
    """A device that refuses the persistent kernel's shared memory (`_run_persistent` launches
    nothing): "auto" runs the call stepwise, forward and backward, with the same results."""
    monkeypatch.setattr(recurrence_cuda, "_run_persistent", lambda *args: False)
    cuda_path("auto")
    c = _case("LSTM", "auto", bidirectional=True, lengths=[3, 1, 2], hx=True).values[0]
    fast_res, ref_res = _compare(c)
    assert_results_close(fast_res, ref_res)
    assert recurrence_cuda.last_cuda_strategy() == "stepwise"


@pytest.mark.cudasim
@needs_simulator
def test_forced_persistent_refuses_what_it_cannot_run(cuda_path):
    cuda_path("persistent")
    lstm = fastrnn.LSTM(2, 3, proj_size=2)
    with pytest.raises(RuntimeError, match="persistent CUDA kernel can't run"):
        lstm(torch.randn(2, 1, 2))
    with pytest.raises(ValueError, match="cuda strategy must be one of"):
        recurrence_cuda.set_cuda_strategy("fast")


def test_strategy_setting_round_trips():
    before = fastrnn.get_cuda_strategy()
    try:
        for name in ("torch", "stepwise", "persistent", "auto"):
            fastrnn.set_cuda_strategy(name)
            assert fastrnn.get_cuda_strategy() == name
    finally:
        fastrnn.set_cuda_strategy(before)


@pytest.mark.cudasim
@needs_simulator
def test_persistent_plan_respects_shared_memory_and_residency():
    plan = recurrence_cuda.persistent_plan
    # H100: 132 blocks resident; LSTM H=512: 4 units per block, 32 KiB of W_hh + one staged row
    units, blocks = plan(512, 512, 4, 1, 132)
    assert units * blocks >= 512 and 4 * units * 512 * 4 <= 48 * 1024
    assert blocks <= 132
    assert plan(1024, 1024, 4, 1, 132) is None  # 8 units x 4 gates x 1024 x 4 B > 48 KiB
    assert plan(512, 512, 4, 2, 132) is None  # two directions halve the blocks per direction
    assert plan(8, 8, 4, 1, 1) == (8, 1)  # a single block
    assert plan(5, 5, 3, 1, 3) == (2, 3)  # the simulator's 3 virtual blocks: 2 + 2 + 1 units
    # with the H100's opt-in shared memory (227 KiB a block), LSTM and GRU up to H = 1024
    h100 = 227 * 1024
    for gates in (4, 3, 1):
        units, blocks = plan(1024, 1024, gates, 1, 132, h100)
        assert units * blocks >= 1024 and blocks <= 132
        assert (gates * units * 1024 + gates * 1024) * 4 <= h100
    assert plan(512, 512, 4, 2, 132, h100) == (8, 64)  # bidirectional LSTM H512
    assert plan(1024, 1024, 4, 2, 132, h100) is None  # ... but not H1024 (256 KiB a block)


@pytest.mark.cudasim
@needs_simulator
def test_previous_hidden_gathers_the_consumed_state():
    # Packed, lengths 3, 2, 1 -> batch_sizes 3, 2, 1; two directions.
    batch_sizes = np.array([3, 2, 1])
    y = torch.arange(2 * 6, dtype=F64).reshape(2, 6, 1)
    h0 = -torch.arange(1, 7, dtype=F64).reshape(2, 3, 1)
    h_prev = recurrence_cuda.previous_hidden(batch_sizes, y, h0)
    # forward: rows 0-2 of t=0 read h0, t=1 reads t=0's rows 0-1, t=2 reads t=1's row 3
    assert h_prev[0, :, 0].tolist() == [-1, -2, -3, 0, 1, 3]
    # reverse: t=2 (row 5) reads h0[0]; t=1 (rows 3, 4): row 0 from t=2, row 1 from h0
    # t=0 (rows 0-2): rows 0, 1 from t=1, row 2 from h0
    assert h_prev[1, :, 0].tolist() == [9, 10, -6, 11, -5, -4]


@pytest.mark.cudasim
@needs_simulator
@pytest.mark.parametrize("lengths", [[4, 4, 4], [5, 3, 3, 1], [2, 2, 1], [1]])
def test_previous_hidden_equals_a_step_by_step_gather(lengths):
    """The vectorised gather (and its dense shortcut) against the rows read step by step."""
    batch_sizes = np.array([sum(n > t for n in lengths) for t in range(max(lengths))])
    offsets = np.concatenate(([0], np.cumsum(batch_sizes)[:-1]))
    rows, batch = int(batch_sizes.sum()), len(lengths)
    y = torch.randn(2, rows, 3, dtype=F64)
    h0 = torch.randn(2, batch, 3, dtype=F64)
    got = recurrence_cuda.previous_hidden(batch_sizes, y, h0)
    steps = len(batch_sizes)
    for d in (0, 1):
        for t in range(steps):
            before = t - 1 if d == 0 else t + 1  # the step this direction processed before t
            for b in range(batch_sizes[t]):
                if 0 <= before < steps and b < batch_sizes[before]:
                    expected = y[d, offsets[before] + b]
                else:
                    expected = h0[d, b]
                assert torch.equal(got[d, offsets[t] + b], expected), (d, t, b)
    assert torch.equal(recurrence_cuda.previous_hidden(batch_sizes, y[:1], h0[:1]), got[:1])


@pytest.mark.cudasim
@needs_simulator
@pytest.mark.parametrize("strategy", ["persistent", "stepwise"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_recurrent_products_reach_the_gate_math_in_float32(dtype, strategy, cuda_path):
    """ReLU RNN, one unit: x W_ih = -(1 + 2 e) and h0 W_hh = (1 + e)^2 = 1 + 2 e + e^2 with
    e = 2^-10 (float16) / 2^-7 (bfloat16), all exactly representable except the product, whose
    e^2 a 16-bit rounding drops. The output is relu(e^2) = e^2 (representable) when the product
    stays in float32, 0 when it is rounded to 16 bits first."""
    cuda_path(strategy)
    e = 2.0**-10 if dtype == torch.float16 else 2.0**-7
    rnn = fastrnn.RNN(1, 1, nonlinearity="relu", bias=False)
    with torch.no_grad():
        rnn.weight_ih_l0.fill_(-(1 + 2 * e))
        rnn.weight_hh_l0.fill_(1 + e)
    rnn.to(dtype)
    x = torch.ones(1, 1, 1, dtype=dtype)
    h0 = torch.full((1, 1, 1), 1 + e, dtype=dtype)
    recurrence_cuda.last_cuda_strategy(reset=True)
    y, _ = rnn(x, h0)
    assert recurrence_cuda.last_cuda_strategy() == strategy
    assert y.item() == e * e


def test_launch_configuration_silences_only_the_low_occupancy_warning():
    """fastrnn's grids are small by design: numba-cuda's low-occupancy warning is off while a
    launch is configured, and the user's setting is back afterwards."""
    if recurrence_cuda is None:
        pytest.skip("numba-cuda is not installed")
    seen = []

    class Kernel:
        def __getitem__(self, configuration):
            seen.append(numba.config.CUDA_LOW_OCCUPANCY_WARNINGS)
            return lambda *args: seen.append(args)

    before = numba.config.CUDA_LOW_OCCUPANCY_WARNINGS
    numba.config.CUDA_LOW_OCCUPANCY_WARNINGS = 1
    try:
        recurrence_cuda._Launch(torch.zeros(1)).run(Kernel(), 1, 4, 0, "argument")
        assert seen == [0, ("argument",)]
        assert numba.config.CUDA_LOW_OCCUPANCY_WARNINGS == 1
    finally:
        numba.config.CUDA_LOW_OCCUPANCY_WARNINGS = before


@pytest.mark.cudasim
@needs_simulator
def test_bfloat16_codec_matches_torch():
    """The kernels' bfloat16 encode (round to nearest even) and decode agree with torch's own
    conversions bit for bit, including ties, overflow to inf, subnormals, +-0, inf and NaN."""
    values = torch.cat([
        torch.randn(2000) * 10.0 ** torch.randint(-40, 39, (2000,)),
        torch.tensor([0.0, -0.0, 1.0, -1.0, 3.3895e38, -3.3895e38, 3.4e38, 1e-40, -1e-45,
                      1.00390625, 1.01171875, float("inf"), float("-inf"), float("nan")]),
    ]).float()  # fmt: skip
    expected = values.to(torch.bfloat16).view(torch.int16)
    for value, bits in zip(values.numpy(), expected.numpy(), strict=True):
        got = cuda_common._float_to_bfloat16(value)
        if np.isnan(value):
            assert np.isnan(cuda_common._bfloat16_to_float(got))
            continue
        assert got == bits, (value, got, bits)
        back = cuda_common.wide(got, np.float32(1))
        assert back == torch.tensor(int(bits), dtype=torch.int16).view(torch.bfloat16).item()


@pytest.mark.cudasim
@needs_simulator
def test_step_span_matches_the_cpu_layout():
    sizes = np.array([3, 2, 2, 1])
    offsets = np.array([0, 3, 5, 7])
    for d in (0, 1):
        for k in range(-1, 5):
            rows, first = cuda_common.step_span(k, d, sizes, offsets)
            if 0 <= k < 4:
                t = 3 - k if d else k
                assert (rows, first) == (sizes[t], offsets[t])
            else:
                assert (rows, first) == (0, 0)


# ---------------------------------------------------------------------------------------------
# real compilation (the simulator never types the kernels): PTX for sm_90 through NVVM
# ---------------------------------------------------------------------------------------------
_COMPILE_SCRIPT = r"""
import sys, types as pytypes
from numba import cuda, types
from bench.gpu_check import launcher_signatures

import torch
import fastrnn
from bench.gpu_check import _recorded_launches

# Every launch the launcher makes (LSTM with and without proj_size, GRU, RNN tanh/relu; every
# dtype; both strategies; forward and backward), recorded with its argument types.
launches = launcher_signatures()
for kernel, signatures in sorted(launches.items(), key=lambda kv: kv[0].py_func.__name__):
    print("signatures", kernel.py_func.__name__, len(signatures))
# ... and the stepwise-only variants' (recurrent dropout and zoneout, the "reset before" GRU,
# the layer-norm LSTM; float32 and float64), forward and backward.
with _recorded_launches() as variants:
    for dtype in (torch.float32, torch.float64):
        for module in (
            fastrnn.LSTM(2, 3, proj_size=2, recurrent_dropout=0.25, zoneout=(0.1, 0.05)),
            fastrnn.RNN(2, 3, zoneout=0.1),
            fastrnn.GRU(2, 3, reset="before"),
            fastrnn.LayerNormLSTM(2, 3),
        ):
            module.to(dtype).train()(torch.randn(4, 2, 2, dtype=dtype))[0].sum().backward()
for kernel, signatures in variants.items():
    print("variant", kernel.py_func.__name__, len(signatures))
    launches.setdefault(kernel, set()).update(signatures)
try:
    import numba.cuda.dispatcher as dispatcher
    # Device functions ask the current device for its compute capability; there is none here.
    dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))

    def probe(a):
        a[0] = 1.0

    cuda.compile_ptx(probe, (types.Array(types.float32, 1, "C"),), cc=(9, 0))
except Exception as error:  # no NVVM/NVRTC here: the kernels can't be compiled at all
    print("NVVM-UNAVAILABLE", type(error).__name__, error)
    sys.exit(0)
for kernel, signatures in launches.items():
    name = kernel.py_func.__name__
    for signature in signatures:
        ptx, _ = cuda.compile_ptx(kernel.py_func, signature, cc=(9, 0))
        cooperative = "cudaCGGetIntrinsicHandle" in ptx
        assert cooperative == name.startswith("persistent"), name
        if cooperative:  # the warp sums are shuffles, the operands come from shared memory
            assert "shfl.sync.bfly" in ptx, name
            assert "ld.shared.f32" in ptx, name
        assert "ld.local" not in ptx and "st.local" not in ptx, f"{name}: local memory"
        float64 = any(getattr(t, "dtype", None) == types.float64 for t in signature)
        if not float64:
            assert ".f64" not in ptx, f"{name}: float64 arithmetic in a 32/16-bit kernel"
        print("compiled", name, "float64" if float64 else "")
"""


@pytest.mark.cudasim
def test_kernels_compile_to_ptx_with_numba_typing():
    """Every kernel compiles for sm_90 with the argument types the launcher passes (recorded
    from the launcher itself, for every cell, dtype and strategy, and the stepwise-only
    variants: masks, the "reset before" GRU, the layer-norm LSTM); all cells share one
    compiled kernel per dtype; the persistent ones are cooperative launches whose warp sums are
    shuffles; no kernel uses local memory; kernels of 32- and 16-bit data contain no float64
    arithmetic. The signatures are checked everywhere; the compilation needs NVVM/NVRTC
    (pip install "numba-cuda[cu12]") and is skipped without them."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0", "PYTHONPATH": path}
    done = subprocess.run(
        [sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    counts = dict(
        line.split()[1:] for line in done.stdout.splitlines() if line.startswith("signatures")
    )
    # storage dtypes: float32, float64, float16, bfloat16; the persistent kernels all but float64
    # (one signature per dtype: all cells share a compiled kernel)
    assert counts == {
        "step_forward": "4",
        "step_backward": "4",
        "hidden_grad_step": "4",
        "persistent_forward": "3",
        "persistent_backward": "3",
    }, done.stdout
    variants = {line.split()[1] for line in done.stdout.splitlines() if line.startswith("variant")}
    assert variants == {
        f"{prefix}_{name}"
        for prefix, names in [
            ("step", ("forward_masked", "backward_masked")),
            ("gated_step", ("gates", "output", "backward_output", "backward_gates")),
            ("layernorm_lstm_step", ("forward", "backward")),
        ]
        for name in names
    } | {"hidden_grad_step"}, done.stdout
    if "NVVM-UNAVAILABLE" in done.stdout:
        pytest.skip(done.stdout.strip().splitlines()[-1][:300])
    # 18 of the plain modules' signatures, 2 dtypes of each of the variants' 8 other kernels
    assert done.stdout.count("compiled") == 18 + 16, done.stdout


# ---------------------------------------------------------------------------------------------
# real GPU: parity with cuDNN (skipped without one)
# ---------------------------------------------------------------------------------------------
GPU_CASES = [
    _case(m, s, T=20, B=b, I=16, H=h, bidirectional=bi, lengths=ln)
    for m in MODES
    for s in ("persistent", "stepwise")
    for (b, h, bi, ln) in [(4, 32, False, None), (5, 64, True, [20, 3, 11, 7, 1])]
] + [
    _case("LSTM", "auto", proj=16, T=20, B=4, I=16, H=32, layers=2, bidirectional=True),
    # W_hh beyond 48 KiB a block (dynamic shared memory opt-in); backward stages 6 rows of 8
    _case("LSTM", "persistent", T=10, B=8, I=64, H=1024),
    _case("GRU", "persistent", T=10, B=7, I=64, H=1024, lengths=[10, 9, 7, 7, 3, 2, 1]),
    _case("LSTM", "persistent", T=10, B=3, I=32, H=512, bidirectional=True),
]


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("c", GPU_CASES)
def test_gpu_matches_cudnn(c):
    recurrence_cuda.set_cuda_strategy(c["strategy"])
    try:
        recurrence_cuda.last_cuda_strategy(reset=True)
        fast_res, ref_res = _compare(c, device="cuda")
    finally:
        recurrence_cuda.set_cuda_strategy("auto")
    assert_results_close(fast_res, ref_res, tol=1e-3)
    expected = "stepwise" if c["proj"] or c["strategy"] == "stepwise" else "persistent"
    assert recurrence_cuda.last_cuda_strategy() == expected


@pytest.mark.cuda
@needs_gpu
def test_gpu_runs_fastrnn_kernels_not_the_fallback():
    lstm = fastrnn.LSTM(8, 16).cuda()
    recurrence_cuda.last_cuda_strategy(reset=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a fallback to torch would warn
        y, _ = lstm(torch.randn(5, 2, 8, device="cuda"))
    assert recurrence_cuda.last_cuda_strategy() in ("persistent", "stepwise")
    assert y.is_cuda


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", list(MODES))
def test_gpu_autocast_matches_cudnn(mode, dtype):
    ref, fast = make_mode_pair(mode, 16, 32, num_layers=2)
    ref.cuda()
    fast.cuda()
    x = torch.randn(10, 4, 16, device="cuda")
    results = []
    for module in (ref, fast):
        with torch.autocast("cuda", dtype=dtype):
            y = module(x)[0]
        y.float().pow(2).sum().backward()
        results.append((y, [p.grad for p in module.parameters()]))
    (y_ref, grads_ref), (y_fast, grads_fast) = results
    tolerance = HALF_TOLERANCE[dtype]
    assert y_fast.dtype == y_ref.dtype
    assert (y_fast.float() - y_ref.float()).abs().max().item() <= tolerance
    for g_fast, g_ref in zip(grads_fast, grads_ref, strict=True):
        assert g_fast.dtype == g_ref.dtype == torch.float32
        scale = max(1.0, g_ref.abs().max().item())
        assert (g_fast - g_ref).abs().max().item() <= 2 * tolerance * scale


def test_device_views_keep_their_tensors_alive_for_the_call(monkeypatch):
    """A device view owns no memory: the tensor behind it (here a contiguous copy of a strided
    input, which nothing else references) stays referenced by the launch, so torch can't hand
    its memory to another tensor while the call's kernels are still queued."""
    if recurrence_cuda is None:
        pytest.skip("numba-cuda is not installed")
    seen = []
    monkeypatch.setattr(recurrence_cuda, "_device_view", lambda *key: seen.append(key) or key)
    launch = recurrence_cuda._Launch(torch.zeros(1))
    launch.on_gpu = True  # the GPU branch of `array`, without a GPU
    view = launch.array(torch.arange(12.0).reshape(3, 4).t())  # strided: copied
    pointer, shape, strides, typestr, _ = view
    assert shape == (4, 3) and strides == (12, 4) and typestr == "<f4"
    assert any(t.data_ptr() == pointer for t in launch._keep)


# ---------------------------------------------------------------------------------------------
# the GPU run's reporting (no GPU needed)
# ---------------------------------------------------------------------------------------------
def test_bench_names_the_cudnn_algorithm_pytorch_requests():
    """PyTorch's get_algo: PERSIST_STATIC_SMALL_H for unpacked input without proj_size up to
    H 192 / 128 (LSTM, GRU; forward / backward) and 384 / 256 (RNN), else STANDARD (TF32 for
    float32 unless turned off)."""
    from bench.cudnn import expected_algorithm

    small = "PERSIST_STATIC_SMALL_H"
    assert expected_algorithm("lstm", 192, "float32", False, 0, backward=False) == small
    assert expected_algorithm("lstm", 192, "float32", False, 0, backward=True) != small
    assert expected_algorithm("gru", 128, "float16", False, 0, backward=True) == small
    assert expected_algorithm("rnn", 384, "float32", False, 0, backward=False) == small
    assert expected_algorithm("rnn", 257, "bfloat16", False, 0, backward=True) == "STANDARD"
    assert expected_algorithm("lstm", 64, "float32", True, 0, backward=False) != small  # packed
    assert expected_algorithm("lstm", 64, "float32", False, 32, backward=False) != small
    assert expected_algorithm("lstm", 64, "float64", False, 0, backward=False) == "STANDARD"
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        assert expected_algorithm("lstm", 512, "float32", False, 0, False) == "STANDARD (no TF32)"
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=True):
        assert expected_algorithm("lstm", 512, "float32", False, 0, False) == "STANDARD (TF32)"


def test_gpu_run_summary_reads_its_results(tmp_path, capsys):
    """The GPU run's summary: steps, parity failures, and per benchmark case the ratios, the
    strategy fastrnn ran and what cuDNN ran, from the files the run writes."""
    import json

    from bench.gpu_check import summary

    (tmp_path / "steps.tsv").write_text("toolchain\t0\t12\nparity\t1\t40\n")
    parity = [
        {"case": "lstm T20", "dtype": "float32", "strategy": "persistent", "ran": "persistent",
         "ok": True, "max_abs_diff": 1e-6, "worst": "output", "error": ""},
        {"case": "gru T30", "dtype": "float16", "strategy": "stepwise", "ran": "stepwise",
         "ok": False, "max_abs_diff": 0.5, "worst": "grad_input", "error": ""},
    ]  # fmt: skip
    (tmp_path / "parity.json").write_text(json.dumps(parity))
    case = {"label": "lstm T100 B8 I512 H512", "status": "ok", "fastrnn_strategy": "persistent",
            "ratio_fwd": 2.5, "ratio_fwdbwd": 1.25, "cudnn_algo": "STANDARD (TF32)",
            "cudnn_algo_backward": "STANDARD (TF32)", "cudnn_seen_fwdbwd": "TF32 GEMM"}  # fmt: skip
    (tmp_path / "bench-auto.json").write_text(json.dumps({"cases": [case]}))
    assert summary(tmp_path) == 0
    text = capsys.readouterr().out
    assert "| parity | 1 | 40 |" in text
    assert "Parity against cuDNN: 1 of 2 passed." in text and "FAIL gru T30 float16" in text
    assert "| lstm T100 B8 I512 H512 | persistent | 2.50 | 1.25 | STANDARD (TF32)" in text
