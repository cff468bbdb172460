"""pytest-benchmark regression suite: fastrnn LSTM/GRU/RNN forward+backward.

Not part of the CI test run (CI runs ``pytest tests/``). Run it explicitly, e.g.::

    pytest bench/test_bench_regression.py --benchmark-autosave
    pytest bench/test_bench_regression.py --benchmark-compare --benchmark-compare-fail=median:10%

Each benchmark is one forward+backward (loss = output.sum() + h_n.sum(), gradients of the input
and all parameters; ``.grad`` is reset to None untimed before every round). torch.nn's module of
the same configuration is benchmarked next to it in the same group, so that the report shows the
ratio on the same machine and in the same process.
"""

from __future__ import annotations

import pytest

pytest.importorskip("pytest_benchmark")
torch = pytest.importorskip("torch")

from bench import cases as C  # noqa: E402

SIZES = [C.Size(100, 1, 64, 128), C.Size(100, 16, 128, 256)]
IMPLS = ["fastrnn", "torch"]


@pytest.fixture(scope="module")
def classes():
    try:
        fast, _ = C.fastrnn_classes()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"fastrnn is not usable: {exc}")
    return {"fastrnn": fast, "torch": C.torch_classes()}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"T{s.T}-B{s.B}-I{s.I}-H{s.H}")
@pytest.mark.parametrize("cell", C.CELLS)
def test_fwdbwd(benchmark, classes, cell, size, impl):
    cfg = C.CaseConfig(cell=cell, size=size)
    ref, fast = C.build_modules(cfg, classes["torch"][cell], classes["fastrnn"][cell])
    module = fast if impl == "fastrnn" else ref
    inp, leaf = C.InputSource(cfg).make(requires_grad=True)
    params = list(module.parameters())

    def reset():
        leaf.grad = None
        for p in params:
            p.grad = None

    def fwdbwd():
        out, hidden = module(inp)
        named = C.split_output(out, hidden)
        (named["output"].sum() + named["h_n"].sum()).backward()

    benchmark.group = f"{cell} fwd+bwd T{size.T} B{size.B} I{size.I} H{size.H}"
    benchmark.extra_info.update(
        impl=impl,
        gflop=C.forward_flops(cfg) * 3 / 1e9,
        torch_threads=torch.get_num_threads(),
    )
    benchmark.pedantic(fwdbwd, setup=reset, rounds=20, warmup_rounds=2, iterations=1)
    assert leaf.grad is not None and leaf.grad.shape == leaf.shape


# The per-step product alone, single-threaded: rows @ W^T on packed panels, the shapes of one
# thread's share at batch 16 and 1 (LSTM H256 and H128). ~110 GFLOP/s a core on a Zen 4
# (AVX-512); a drop here shows before any end-to-end number moves.
PRODUCTS = [(8, 256, 1024), (1, 128, 512), (32, 512, 2048)]


@pytest.mark.parametrize("shape", PRODUCTS, ids=lambda s: f"M{s[0]}-K{s[1]}-N{s[2]}")
def test_panel_product(benchmark, shape):
    import numpy as np

    from fastrnn.kernels.cpu.panel_matmul import matmul_panels, packed_panels

    rows, depth, columns = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((rows, depth), dtype=np.float32)
    W = rng.standard_normal((1, columns, depth), dtype=np.float32)
    panels = packed_panels(W, False, 1)[0]  # packed on one thread
    out = np.empty((rows, columns), dtype=np.float32)
    matmul_panels(a, panels, out, 0, panels.shape[0])
    np.testing.assert_allclose(out, a @ W[0].T, rtol=1e-4, atol=1e-3)
    benchmark.group = "per-step panel product"
    benchmark.extra_info.update(gflop=2 * rows * depth * columns / 1e9)
    benchmark.pedantic(
        matmul_panels, args=(a, panels, out, 0, panels.shape[0]), rounds=200, iterations=5
    )
