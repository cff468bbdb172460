"""fastrnn across processes and with standard PyTorch tooling.

- DDP: `torch.distributed` on gloo, CPU, with processes this test starts; gradients equal those
  of one process over the same global batch, and fastrnn's kernels run (no fallback warning,
  fastrnn's autograd Functions in the graph).
- Cold start: processes starting at once on an empty Numba cache directory all compile and get
  torch's results, and the cache they wrote together loads cleanly in a further process.
- A read-only install (site-packages not writable, as in a Docker image built by root and run by
  a user): Numba ignores the `__pycache__` beside the source and caches under `~/.cache/numba`.
- `quantize_dynamic` and ONNX export of models holding fastrnn modules.

The heavy cold-start variants (four processes, LSTM + GRU) compile for minutes: they are marked
`slow` and run only with FASTRNN_SLOW_TESTS=1 (nothing deselects the marker by default).

This file is also the worker the tests start: `python tests/test_processes.py worker ...`.
"""

from __future__ import annotations

import copy
import importlib
import os
import re
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import fastrnn

slow = pytest.mark.skipif(
    os.environ.get("FASTRNN_SLOW_TESTS") != "1",
    reason="compiles for minutes: set FASTRNN_SLOW_TESTS=1",
)

# --------------------------------------------------------------------------------------------
# models and data shared by the workers and the single-process references
# --------------------------------------------------------------------------------------------
GLOBAL_BATCH, STEPS, FEATURES = 8, 5, 3


class CellModel(nn.Module):
    """An RNNCell stepped over time, then a linear head: the cheapest kernels to compile."""

    def __init__(self, ns) -> None:
        super().__init__()
        self.cell = ns.RNNCell(FEATURES, 6)
        self.head = nn.Linear(6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, F)
        h = None
        for t in range(x.shape[1]):
            h = self.cell(x[:, t], h)
        return self.head(h)


class SequenceModel(nn.Module):
    """LSTM -> bidirectional GRU -> linear head on the last step (batch_first)."""

    def __init__(self, ns) -> None:
        super().__init__()
        self.lstm = ns.LSTM(FEATURES, 6, batch_first=True)
        self.gru = ns.GRU(6, 5, batch_first=True, bidirectional=True)
        self.head = nn.Linear(10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y[:, -1])


MODELS = {"cell": CellModel, "sequence": SequenceModel}


def build(kind: str, ns) -> nn.Module:
    torch.manual_seed(0)
    return MODELS[kind](ns)


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(GLOBAL_BATCH, STEPS, FEATURES, generator=g), torch.randn(
        GLOBAL_BATCH, 1, generator=g
    )


def backward_nodes(output: torch.Tensor) -> list[torch.autograd.graph.Node]:
    nodes, stack = [], [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in nodes:
            continue
        nodes.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return nodes


# --------------------------------------------------------------------------------------------
# the worker: one rank of a run (world size 1: a plain process)
# --------------------------------------------------------------------------------------------
def worker(rank: int, world: int, init_file: str, out_dir: str, kind: str) -> None:
    """Train step on this rank's shard (fastrnn model, DDP when world > 1); writes
    `rank<r>.pt`: gradients, fastrnn's warnings, whether fastrnn's Functions are in the graph,
    seconds for the first step."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    start = time.perf_counter()
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = build(kind, fastrnn)
        wrapped = DistributedDataParallel(model) if world > 1 else model
        x, y = global_batch()
        rows = slice(rank * GLOBAL_BATCH // world, (rank + 1) * GLOBAL_BATCH // world)
        output = wrapped(x[rows])
        loss = nn.functional.mse_loss(output, y[rows])
        loss.backward()
    fastrnn_functions = any(
        isinstance(node, torch.autograd.function.BackwardCFunction)
        for node in backward_nodes(output)
    )
    result = {
        "grads": {name: p.grad.clone() for name, p in model.named_parameters()},
        "output": output.detach(),
        "warnings": [str(w.message) for w in caught if "fastrnn" in str(w.message)],
        "fastrnn_functions": fastrnn_functions,
        "seconds": time.perf_counter() - start,
        "fastrnn_file": fastrnn.__file__,
    }
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    if world > 1:
        # every rank done before teardown: gloo aborts a rank whose peer left first
        # ("terminate called without an active exception", seen on a loaded machine)
        dist.barrier()
        dist.destroy_process_group()


ROOT = Path(fastrnn.__file__).resolve().parents[1]  # where `import fastrnn` finds it


def _env(**extra: str | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def launch(
    world: int, kind: str, out_dir: Path, env: dict[str, str], prefix: tuple[str, ...] = ()
) -> tuple[list[dict], list[str], float]:
    """Start `world` worker processes at once; returns their results, their output, and the
    wall time until the last one finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    init_file = out_dir / "init"
    start = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*prefix, sys.executable, __file__, "worker", str(rank), str(world), str(init_file)]
            + [str(out_dir), kind],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    outputs = [proc.communicate(timeout=900)[0] for proc in procs]
    seconds = time.perf_counter() - start
    for rank, (proc, text) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, f"rank {rank} failed:\n{text}"
    results = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(world)]
    return results, outputs, seconds


def reference_grads(kind: str) -> dict[str, torch.Tensor]:
    """torch.nn's gradients of the mean loss over the whole global batch, in one process."""
    model = build(kind, nn)
    x, y = global_batch()
    nn.functional.mse_loss(model(x), y).backward()
    return {name: p.grad for name, p in model.named_parameters()}


def assert_same_grads(results: list[dict], kind: str) -> None:
    expected = reference_grads(kind)
    for rank, result in enumerate(results):
        assert result["grads"].keys() == expected.keys()
        for name, grad in expected.items():
            got = result["grads"][name]
            scale = max(1.0, grad.abs().max().item())
            err = (got - grad).abs().max().item()
            assert err <= 1e-5 * scale, f"rank {rank}: grad of {name} off by {err:.2e}"
        assert result["warnings"] == [], f"rank {rank} warned: {result['warnings']}"
        assert result["fastrnn_functions"], f"rank {rank}: no fastrnn Function in the graph"


# --------------------------------------------------------------------------------------------
# DDP and cold start
# --------------------------------------------------------------------------------------------
def test_ddp_two_processes_same_grads_as_one(tmp_path):
    # (the cold-start test below runs the cell model under DDP)
    results, _, _ = launch(2, "sequence", tmp_path, _env())
    assert_same_grads(results, "sequence")
    # DDP averaged the two shards' gradients: both ranks hold the same values
    for name, grad in results[0]["grads"].items():
        assert torch.equal(grad, results[1]["grads"][name]), name


def _readme_block(marker: str) -> str:
    """The README's ```python block that contains `marker` (what users copy)."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"one README python block with {marker!r}, found {len(found)}"
    return found[0]


def test_readme_ddp_example_under_torchrun(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(_readme_block("DistributedDataParallel"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*cmd, str(script)], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "fastrnn" not in done.stdout + done.stderr  # no fallback warning


def _cache_log(text: str) -> tuple[int, int]:
    """(data loaded, data saved) lines of Numba's NUMBA_DEBUG_CACHE output."""
    return text.count("[cache] data loaded from"), text.count("[cache] data saved to")


def cold_start(tmp_path: Path, world: int, kind: str) -> tuple[float, float]:
    """`world` DDP processes at once on an empty NUMBA_CACHE_DIR, then one more process on
    it; returns (wall seconds of the concurrent run, of the later one)."""
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    env = _env(NUMBA_CACHE_DIR=str(cache), NUMBA_DEBUG_CACHE="1")
    results, outputs, cold = launch(world, kind, tmp_path / "cold", env)
    assert_same_grads(results, kind)
    assert sum(_cache_log(text)[1] for text in outputs) > 0, "nothing was written to the cache"
    later, outputs, warm = launch(1, kind, tmp_path / "warm", env)
    assert_same_grads(later, kind)
    loaded, saved = _cache_log(outputs[0])
    assert loaded > 0 and saved == 0, f"the later process recompiled:\n{outputs[0]}"
    print(f"\n{world} processes cold ({kind}): {cold:.1f} s; one process after: {warm:.1f} s")
    return cold, warm


def test_cold_start_two_processes_share_an_empty_cache(tmp_path):
    cold_start(tmp_path, 2, "cell")


@pytest.mark.slow
@slow
@pytest.mark.parametrize("world", [2, 4])
def test_cold_start_sequence_kernels(tmp_path, world):
    cold_start(tmp_path, world, "sequence")


# --------------------------------------------------------------------------------------------
# read-only install
# --------------------------------------------------------------------------------------------
def _read_only_copy(dest: Path) -> Path:
    """fastrnn (and its kernels, wherever they live) copied without any `__pycache__`, then
    made read-only; returns the folder to put on PYTHONPATH."""
    site = dest / "site"
    ignore = shutil.ignore_patterns("__pycache__")
    package = Path(fastrnn.__file__).resolve().parent
    shutil.copytree(package, site / "fastrnn", ignore=ignore)
    kernels = Path(importlib.import_module("fastrnn.kernels").__file__).resolve().parent
    if not kernels.is_relative_to(package):  # a source checkout: kernels/ beside fastrnn/
        shutil.copytree(kernels, site / "kernels", ignore=ignore)
    for path in [site, *site.rglob("*")]:
        path.chmod(path.stat().st_mode & ~0o222)
    return site


def _unprivileged() -> tuple[str, ...]:
    """A command prefix under which file permissions hold: none for a normal user; for root
    (which ignores write bits), setpriv dropping the capabilities that override them."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: write bits can't be enforced")
    return ("setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner")


@pytest.fixture
def read_only_site(tmp_path):
    site = _read_only_copy(tmp_path)
    yield site
    for path in [site, *site.rglob("*")]:  # so that pytest can clean tmp_path up
        path.chmod(path.stat().st_mode | 0o200)


def test_read_only_install_caches_in_the_user_cache(tmp_path, read_only_site):
    prefix = _unprivileged()
    home = tmp_path / "home"
    home.mkdir()
    env = _env(NUMBA_CACHE_DIR=None, XDG_CACHE_HOME=None, NUMBA_DEBUG_CACHE="1", HOME=str(home))
    env["PYTHONPATH"] = str(read_only_site)
    first, outputs, _ = launch(1, "cell", tmp_path / "first", env, prefix)
    assert_same_grads(first, "cell")
    assert Path(first[0]["fastrnn_file"]).is_relative_to(read_only_site)
    _, saved = _cache_log(outputs[0])
    assert saved > 0 and f"{home}/.cache/numba/" in outputs[0], outputs[0]
    assert not list(read_only_site.rglob("__pycache__")), "wrote beside a read-only source"
    second, outputs, _ = launch(1, "cell", tmp_path / "second", env, prefix)
    assert_same_grads(second, "cell")
    loaded, saved = _cache_log(outputs[0])
    assert loaded > 0 and saved == 0, f"the second process recompiled:\n{outputs[0]}"


def test_read_only_install_with_a_cache_compiled_at_build_time(tmp_path, read_only_site):
    """A Docker image: root compiles into NUMBA_CACHE_DIR while building, the directory is made
    writable for all (Numba needs write access to a cache directory even to read it), and a
    user then loads every kernel from it."""
    cache = tmp_path / "numba-cache"
    cache.mkdir()
    env = _env(NUMBA_CACHE_DIR=str(cache), NUMBA_DEBUG_CACHE="1", XDG_CACHE_HOME=None)
    env["PYTHONPATH"] = str(read_only_site)
    env["HOME"] = str(tmp_path)  # no ~/.cache/numba there: what loads, loads from `cache`
    launch(1, "cell", tmp_path / "build", env)  # as the image's builder
    for path in [cache, *cache.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o777 if path.is_dir() else 0o666)
    results, outputs, _ = launch(1, "cell", tmp_path / "run", env, _unprivileged())
    assert_same_grads(results, "cell")
    loaded, saved = _cache_log(outputs[0])
    assert loaded > 0 and saved == 0, f"the user's process recompiled:\n{outputs[0]}"
    assert not (tmp_path / ".cache").exists()


def test_read_only_install_without_any_writable_cache_still_runs(tmp_path, read_only_site):
    """No writable cache location at all (a user whose home is read-only, no NUMBA_CACHE_DIR):
    fastrnn still imports and runs, compiling into a temporary folder, and says so."""
    prefix = _unprivileged()
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o555)
    env = _env(NUMBA_CACHE_DIR=None, XDG_CACHE_HOME=None, HOME=str(home))
    env["PYTHONPATH"] = str(read_only_site)
    try:
        results, outputs, _ = launch(1, "cell", tmp_path / "run", env, prefix)
    finally:
        home.chmod(0o755)
    assert_same_grads(results, "cell")
    assert "no writable folder for Numba's kernel cache" in outputs[0], outputs[0]


# --------------------------------------------------------------------------------------------
# quantize_dynamic
# --------------------------------------------------------------------------------------------
class Tagger(nn.Module):
    """Embedding -> 2-layer LSTM -> bidirectional GRU -> linear, plus a GRUCell on the side."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.lstm = nn.LSTM(8, 16, num_layers=2)
        self.gru = nn.GRU(16, 12, bidirectional=True)
        self.cell = nn.GRUCell(8, 12)
        self.head = nn.Linear(24, 5)

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.embed(tokens)
        y, _ = self.lstm(x)
        y, _ = self.gru(y)
        return self.head(y), self.cell(x[0])


@pytest.fixture
def quiet_quantization():
    with warnings.catch_warnings():  # torch.ao.quantization's deprecation notices
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize_per_tensor.*")
        yield


def test_quantize_dynamic_matches_torch(quiet_quantization):
    import fastrnn.quantization

    torch.manual_seed(0)
    model = Tagger().eval()
    converted = fastrnn.convert(copy.deepcopy(model))
    spec = {nn.LSTM, nn.GRU, nn.GRUCell, nn.Linear}
    expected = torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8)
    qmodel = fastrnn.quantization.quantize_dynamic(converted, spec, dtype=torch.qint8)
    for name, module in expected.named_modules():
        got = qmodel.get_submodule(name)
        assert type(got) is type(module), f"{name}: {type(got)} instead of {type(module)}"
    tokens = torch.randint(0, 20, (7, 3))
    for got, want in zip(qmodel(tokens), expected(tokens), strict=True):
        assert torch.equal(got, want)
    assert type(converted.lstm) is fastrnn.LSTM  # not in place: the float model is unchanged


def test_quantize_dynamic_leaves_unnamed_fastrnn_modules_float(quiet_quantization):
    import fastrnn.quantization

    torch.manual_seed(0)
    converted = fastrnn.convert(Tagger().eval())
    # fastrnn classes in the spec count as their torch classes
    qmodel = fastrnn.quantization.quantize_dynamic(converted, {fastrnn.GRU, nn.Linear})
    assert type(qmodel.gru) is torch.ao.nn.quantized.dynamic.GRU
    assert type(qmodel.lstm) is fastrnn.LSTM and type(qmodel.cell) is fastrnn.GRUCell
    assert qmodel.lstm.weight_ih_l0 is not converted.lstm.weight_ih_l0  # a copy
    # torch's own function matches exact types and leaves fastrnn modules float
    plain = torch.ao.quantization.quantize_dynamic(converted, {nn.LSTM, nn.GRU})
    assert type(plain.lstm) is fastrnn.LSTM and type(plain.gru) is fastrnn.GRU


# --------------------------------------------------------------------------------------------
# ONNX
# --------------------------------------------------------------------------------------------
def _graph_without_metadata(path: Path):
    """The ONNX graph with each node's metadata (source stack, module class names) removed:
    what remains is the computation (ops, attributes, wiring, initializers)."""
    import onnx

    graph = onnx.load(str(path)).graph
    for node in graph.node:
        del node.metadata_props[:]
    return graph


def test_onnx_export_equals_torch_export(tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxscript")  # torch.onnx.export's default (torch.export) exporter

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(8, 16, num_layers=2, batch_first=True)
            self.gru = nn.GRU(16, 16, batch_first=True, bidirectional=True)
            self.head = nn.Linear(32, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.lstm(x)
            y, _ = self.gru(y)
            return self.head(y)

    torch.manual_seed(0)
    model = Model().eval()
    x = torch.randn(3, 5, 8)
    paths = {"torch": tmp_path / "torch.onnx", "fastrnn": tmp_path / "fastrnn.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(paths["torch"]), verbose=False)
        converted = fastrnn.convert(copy.deepcopy(model))
        torch.onnx.export(converted, (x,), str(paths["fastrnn"]), verbose=False)
    graphs = {name: _graph_without_metadata(path) for name, path in paths.items()}
    assert graphs["fastrnn"] == graphs["torch"]
    gru = [node for node in graphs["fastrnn"].node if node.op_type == "GRU"]
    assert len(gru) == 1
    attributes = {a.name: a for a in gru[0].attribute}
    assert attributes["linear_before_reset"].i == 1  # torch's "reset after" GRU
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(paths["fastrnn"]), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        expected = model(x)
    assert (torch.from_numpy(output) - expected).abs().max().item() < 1e-5


@pytest.mark.xfail(
    strict=True,
    reason="torch.onnx.export(dynamo=False), the TorchScript-based exporter, traces fastrnn's "
    "forward with torch.jit and the trace fails (a reshape of the wrong size)",
)
def test_onnx_legacy_exporter(tmp_path):
    pytest.importorskip("onnx")
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            fastrnn.GRU(3, 4), (torch.randn(5, 2, 3),), str(tmp_path / "m.onnx"), dynamo=False
        )


def test_onnx_legacy_exporter_on_torch_modules(tmp_path):
    """The way around the legacy exporter: export the model with torch's modules back in."""
    onnx = pytest.importorskip("onnx")
    import fastrnn.quantization

    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("gru", fastrnn.GRU(3, 4))
    torch_model = fastrnn.quantization.as_torch_modules(copy.deepcopy(model))
    assert type(torch_model.gru) is torch.nn.modules.rnn.GRU
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            torch_model.gru, (torch.randn(5, 2, 3),), str(tmp_path / "m.onnx"), dynamo=False
        )
    ops = [node.op_type for node in onnx.load(str(tmp_path / "m.onnx")).graph.node]
    assert "GRU" in ops


if __name__ == "__main__":
    if sys.argv[1:2] == ["worker"]:
        rank, world, init_file, out_dir, kind = sys.argv[2:7]
        worker(int(rank), int(world), init_file, out_dir, kind)
    else:
        raise SystemExit(f"usage: {sys.argv[0]} worker RANK WORLD INIT_FILE OUT_DIR KIND")


def test_distributed_process_runs_the_workqueue_layer(tmp_path):
    """With a process group up before fastrnn's first kernel, Numba's pool starts on its
    `workqueue` layer: on `omp`, a rank aborted at interpreter exit after its work was done in
    2-3 of 8 torchrun runs of the README's DDP example."""
    script = tmp_path / "one_rank.py"
    script.write_text(
        "import numba, torch, torch.distributed as dist, fastrnn\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'init'}', "
        "rank=0, world_size=1)\n"
        "fastrnn.LSTM(3, 4)(torch.randn(5, 2, 3))[0].sum().backward()\n"
        "print('layer', numba.threading_layer())\n"
        "dist.destroy_process_group()\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)],
        env=_env(NUMBA_THREADING_LAYER=None, NUMBA_THREADING_LAYER_PRIORITY=None),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "layer workqueue" in done.stdout, done.stdout
