"""The steps of a GPU validation run (`bench/gpu_validation.sh` calls them one process each).

    python3 -m bench.gpu_check toolchain            # versions, NVVM, libdevice, libcudadevrt,
                                                    # a cooperative grid.sync over every SM, and
                                                    # a launch with > 48 KiB of shared memory
    python3 -m bench.gpu_check precompile --jobs 16 # every kernel signature the launcher uses,
                                                    # compiled into Numba's disk cache at once
    python3 -m bench.gpu_check parity --out DIR     # fastrnn vs cuDNN: float32 strict (no TF32),
                                                    # float16 / bfloat16 at PyTorch's tolerances
    python3 -m bench.gpu_check workload             # fastrnn only, small, every cell/strategy:
                                                    # what compute-sanitizer runs
    python3 -m bench.gpu_check summary DIR          # the tables of a run's results, as markdown

Each exits non-zero when its check fails, so the shell script records a clear status per step.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# ---------------------------------------------------------------------------------------------
# the kernels' signatures, from the launcher itself
# ---------------------------------------------------------------------------------------------
_MODULES = (
    ("LSTM", {}),
    ("LSTM", {"proj_size": 2}),
    ("GRU", {}),
    ("RNN", {"nonlinearity": "tanh"}),
    ("RNN", {"nonlinearity": "relu"}),
)
_DTYPES = ("float32", "float64", "float16", "bfloat16")


@contextlib.contextmanager
def _recorded_launches():
    """While active, the CUDA launcher takes CPU tensors (as under the simulator) and records
    each launch's kernel and argument types instead of running it: numpy arrays of the GPU
    launch's dtypes and ranks, so `numba.typeof` gives the signature a GPU launch compiles."""
    from numba import typeof

    import fastrnn.autograd
    import fastrnn.modules
    from fastrnn import recurrence_cuda

    launches: dict = {}

    def record(self, kernel, blocks, threads, shared, *args):
        launches.setdefault(kernel, set()).add(tuple(typeof(a) for a in args))

    saved = (
        recurrence_cuda._Launch.run,
        recurrence_cuda._simulated_device_array,
        fastrnn.autograd.CUDA_KERNELS_ON_CPU,
        dict(fastrnn.functional.KERNEL_DTYPES),
        recurrence_cuda.get_cuda_strategy(),
    )
    recurrence_cuda._Launch.run = record
    recurrence_cuda._simulated_device_array = lambda values: values
    fastrnn.autograd.CUDA_KERNELS_ON_CPU = True
    fastrnn.functional.KERNEL_DTYPES["cpu"] = fastrnn.functional.KERNEL_DTYPES["cuda"]
    try:
        yield launches
    finally:
        recurrence_cuda._Launch.run, recurrence_cuda._simulated_device_array = saved[:2]
        fastrnn.autograd.CUDA_KERNELS_ON_CPU = saved[2]
        fastrnn.functional.KERNEL_DTYPES.clear()
        fastrnn.functional.KERNEL_DTYPES.update(saved[3])
        recurrence_cuda.set_cuda_strategy(saved[4])


def launcher_signatures(dtypes: tuple[str, ...] = _DTYPES) -> dict:
    """{kernel dispatcher: {argument types}} of every launch the launcher makes for LSTM (with
    and without proj_size), GRU and RNN, bidirectional, forward and backward, both strategies
    (persistent where it applies), for `dtypes`. Needs no GPU."""
    import torch

    import fastrnn
    from fastrnn import recurrence_cuda

    with _recorded_launches() as launches:
        for strategy in ("persistent", "stepwise"):
            recurrence_cuda.set_cuda_strategy(strategy)
            for name in dtypes:
                dtype = getattr(torch, name)
                if strategy == "persistent" and dtype == torch.float64:
                    continue
                for cls, kwargs in _MODULES:
                    if strategy == "persistent" and kwargs.get("proj_size"):
                        continue
                    module = getattr(fastrnn, cls)(2, 3, bidirectional=True, **kwargs).to(dtype)
                    x = torch.randn(4, 2, 2, dtype=dtype, requires_grad=True)
                    module(x)[0].float().sum().backward()
    return launches


def _ordered_signatures(dtypes: tuple[str, ...]) -> list[tuple]:
    launches = launcher_signatures(dtypes)
    pairs = [(kernel, sig) for kernel, sigs in launches.items() for sig in sigs]
    return sorted(pairs, key=lambda pair: (pair[0].py_func.__name__, str(pair[1])))


# ---------------------------------------------------------------------------------------------
# toolchain
# ---------------------------------------------------------------------------------------------
def _check(name: str, fn, failures: list[str]) -> None:
    start = time.perf_counter()
    try:
        detail = fn()
        print(f"ok    {name}: {detail} ({time.perf_counter() - start:.1f} s)", flush=True)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, then the step fails
        print(f"FAIL  {name}: {type(exc).__name__}: {exc}", flush=True)
        failures.append(name)


def toolchain() -> int:
    """Everything the kernels need, each checked on its own; a non-zero exit if any failed."""
    failures: list[str] = []

    def versions():
        import importlib.metadata as metadata

        import numba
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"torch {torch.__version__} sees no CUDA device")
        props = torch.cuda.get_device_properties(0)
        return (
            f"{props.name} sm_{props.major}{props.minor}, {props.multi_processor_count} SMs; "
            f"torch {torch.__version__} CUDA {torch.version.cuda} cuDNN "
            f"{torch.backends.cudnn.version()}; numba {numba.__version__}, numba-cuda "
            f"{metadata.version('numba-cuda')}"
        )

    def nvvm():
        from numba.cuda.cudadrv.nvvm import NVVM

        return f"NVVM {NVVM().get_version()}"

    def libdevice():
        from numba.cuda.cudadrv import libs

        return libs.get_libdevice()

    def cudadevrt():
        from numba.cuda.cudadrv import libs

        path = libs.get_cudalib("cudadevrt", static=True)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} (grid.sync kernels link it)")
        return path

    def fastrnn_available():
        from fastrnn import recurrence_cuda

        reason = recurrence_cuda.unavailable_reason()
        if reason is not None:
            raise RuntimeError(reason)
        return "fastrnn's CUDA kernels can run"

    def grid_sync():
        import numpy as np
        from numba import cuda, int32

        @cuda.jit
        def exchange(out, rounds):
            grid = cuda.cg.this_grid()
            block, blocks = cuda.blockIdx.x, cuda.gridDim.x
            for r in range(rounds):
                if cuda.threadIdx.x == 0:
                    out[r + 1, block] = out[r, (block + 1) % blocks] + int32(1)
                grid.sync()

        blocks = cuda.get_current_device().MULTIPROCESSOR_COUNT
        rounds = 8
        out = np.zeros((rounds + 1, blocks), dtype=np.int32)
        out[0] = np.arange(blocks)
        device_out = cuda.to_device(out)
        from fastrnn.recurrence_cuda import _no_occupancy_warning

        with _no_occupancy_warning():
            configured = exchange[blocks, 256]
        configured(device_out, rounds)
        got = device_out.copy_to_host()
        expected = (np.arange(blocks) + rounds) % blocks + rounds
        if not np.array_equal(got[rounds], expected):
            raise RuntimeError(f"grid.sync exchange wrong: {got[rounds][:8]} ...")
        limit = exchange.overloads[next(iter(exchange.overloads))].max_cooperative_grid_blocks(256)
        return f"{blocks} blocks x 256 threads, {rounds} syncs; cooperative limit {limit}"

    def big_shared():
        import numpy as np
        from numba import cuda, float32

        from fastrnn.recurrence_cuda import _allow_dynamic_shared, _shared_limit

        @cuda.jit
        def fill(out, count):
            shared = cuda.shared.array(0, float32)
            for i in range(cuda.threadIdx.x, count, cuda.blockDim.x):
                shared[i] = float32(i)
            cuda.syncthreads()
            total = float32(0)
            if cuda.threadIdx.x == 0:
                for i in range(count):
                    total += shared[i]
                out[0] = total

        limit = _shared_limit(0)
        count = (limit - 1024) // 4
        out = cuda.device_array(1, dtype=np.float32)
        _allow_dynamic_shared(fill, (out, count), 4 * count)
        fill[1, 256, 0, 4 * count](out, count)
        got = float(out.copy_to_host()[0])
        expected = float(np.float32(np.arange(count, dtype=np.float64).sum()))
        if abs(got - expected) > 1e-3 * expected:
            raise RuntimeError(f"sum {got} != {expected}")
        return f"{4 * count} bytes of dynamic shared memory (limit {limit})"

    for name, fn in [
        ("versions", versions),
        ("NVVM", nvvm),
        ("libdevice", libdevice),
        ("libcudadevrt", cudadevrt),
        ("fastrnn available", fastrnn_available),
        ("cooperative grid.sync", grid_sync),
        ("dynamic shared memory opt-in", big_shared),
    ]:
        _check(name, fn, failures)
    if failures:
        print(f"toolchain: {len(failures)} check(s) failed: {', '.join(failures)}")
        return 1
    print("toolchain: all checks passed")
    return 0


# ---------------------------------------------------------------------------------------------
# precompile
# ---------------------------------------------------------------------------------------------
def precompile(jobs: int, dtypes: tuple[str, ...]) -> int:
    """Compile every (kernel, signature) the launcher uses into Numba's disk cache, up to `jobs`
    processes at once. A process compiles all signatures of its kernels: Numba keeps one cache
    index per kernel, rewritten whole by each save, so two processes saving signatures of the
    same kernel could lose one."""
    pairs = _ordered_signatures(dtypes)
    kernels = sorted({kernel.py_func.__name__ for kernel, _ in pairs})
    jobs = max(1, min(jobs, len(kernels)))
    print(f"precompile: {len(pairs)} kernel signatures in {jobs} processes", flush=True)
    start = time.perf_counter()
    command = [sys.executable, "-m", "bench.gpu_check", "compile-part"]
    procs = [subprocess.Popen([*command, str(i), str(jobs), ",".join(dtypes)]) for i in range(jobs)]
    codes = [p.wait() for p in procs]
    print(f"precompile: {time.perf_counter() - start:.1f} s, exit codes {codes}", flush=True)
    return 0 if not any(codes) else 1


def compile_part(index: int, jobs: int, dtypes: tuple[str, ...]) -> int:
    pairs = _ordered_signatures(dtypes)
    kernels = sorted({kernel.py_func.__name__ for kernel, _ in pairs})[index::jobs]
    for kernel, signature in pairs:
        if kernel.py_func.__name__ not in kernels:
            continue
        start = time.perf_counter()
        kernel.compile(signature)
        print(
            f"  [{index}] {kernel.py_func.__name__} {time.perf_counter() - start:.1f} s",
            flush=True,
        )
    return 0


# ---------------------------------------------------------------------------------------------
# parity against cuDNN
# ---------------------------------------------------------------------------------------------
# float32 is compared with cuDNN in strict float32 (bench.parity turns TF32 off for torch);
# 16-bit at the tolerances `python -m bench` uses (PyTorch's own, loosened for whole sequences).
_RTOL = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 5e-2}


def _parity_cases():
    from bench.cases import CaseConfig, Size

    sizes = [Size(20, 1, 16, 32), Size(30, 5, 24, 64), Size(50, 16, 64, 256)]
    for dtype in _RTOL:
        for cell in ("lstm", "gru", "rnn"):
            for size in sizes if dtype == "float32" else sizes[1:2]:
                for bidirectional, packed in ((False, False), (True, True)):
                    for strategy in ("persistent", "stepwise"):
                        yield (
                            strategy,
                            CaseConfig(
                                cell=cell,
                                size=size,
                                dtype=dtype,
                                device="cuda",
                                bidirectional=bidirectional,
                                packed=packed,
                            ),
                        )
    for strategy in ("auto", "stepwise"):  # projection and two layers: stepwise only
        yield (
            strategy,
            CaseConfig(
                cell="lstm", size=Size(20, 4, 16, 32), device="cuda", layers=2, proj_size=16
            ),
        )


def parity(out: Path | None) -> int:
    import torch

    import fastrnn
    from bench import cases as C
    from bench.parity import check_parity

    fast_classes, _ = C.fastrnn_classes()
    ref_classes = C.torch_classes()
    rows, failed = [], 0
    for strategy, cfg in _parity_cases():
        fastrnn.set_cuda_strategy(strategy)
        fastrnn.last_cuda_strategy(reset=True)
        try:
            ref, fast = C.build_modules(cfg, ref_classes[cfg.cell], fast_classes[cfg.cell])
            result = check_parity(ref, fast, C.InputSource(cfg), _RTOL[cfg.dtype])
            ran = fastrnn.last_cuda_strategy(reset=True)
            ok, worst, diff, error = result.ok, result.worst, result.max_abs_diff, result.error
        except Exception as exc:  # noqa: BLE001 - a crash is a failed case, the run goes on
            ran, ok, worst, diff, error = None, False, "", float("nan"), repr(exc)
        torch.cuda.synchronize()
        # fastrnn's kernels ran (None: it fell back to torch), the forced strategy if any
        ok = ok and ran in (("persistent", "stepwise") if strategy == "auto" else (strategy,))
        failed += not ok
        row = {
            "case": cfg.label,
            "dtype": cfg.dtype,
            "strategy": strategy,
            "ran": ran,
            "ok": ok,
            "max_abs_diff": diff,
            "worst": worst,
            "rtol": _RTOL[cfg.dtype],
            "error": error,
        }
        rows.append(row)
        status = "ok  " if ok else "FAIL"
        print(
            f"{status} {cfg.label:34s} {cfg.dtype:8s} {strategy:10s} ran {ran!s:10s} "
            f"max|diff| {diff:.2e} ({worst}) {error}",
            flush=True,
        )
    fastrnn.set_cuda_strategy("auto")
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "parity.json").write_text(json.dumps(rows, indent=1, default=str) + "\n")
    print(f"parity: {len(rows) - failed} passed, {failed} failed")
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------
# a fastrnn-only workload for compute-sanitizer
# ---------------------------------------------------------------------------------------------
def workload() -> int:
    """Forward + backward of every cell and strategy at small sizes, fastrnn's kernels only
    (torch's own RNN is never called), dense and packed, float32 and float16."""
    import torch

    import fastrnn

    for strategy in ("persistent", "stepwise"):
        fastrnn.set_cuda_strategy(strategy)
        for dtype in (torch.float32, torch.float16):
            for cls, kwargs in _MODULES:
                if strategy == "persistent" and kwargs.get("proj_size"):
                    continue
                module = getattr(fastrnn, cls)(8, 24, bidirectional=True, **kwargs)
                module = module.to("cuda", dtype)
                x = torch.randn(6, 3, 8, device="cuda", dtype=dtype, requires_grad=True)
                packed = torch.nn.utils.rnn.pack_padded_sequence(
                    x, torch.tensor([6, 2, 4]), enforce_sorted=False
                )
                for inp in (x, packed):
                    output = module(inp)[0]
                    data = output.data if hasattr(output, "batch_sizes") else output
                    data.float().sum().backward()
                torch.cuda.synchronize()
                print(f"ok {strategy} {dtype} {cls} {kwargs}", flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# summary
# ---------------------------------------------------------------------------------------------
def summary(results: Path) -> int:
    """Markdown: the steps' status, parity failures, and per benchmark case the torch/fastrnn
    ratios with the strategy fastrnn ran and what cuDNN ran."""
    lines = ["# fastrnn GPU validation", ""]
    steps = results / "steps.tsv"
    if steps.exists():
        lines += ["| step | exit | seconds |", "|---|---|---|"]
        for row in steps.read_text().splitlines():
            name, code, seconds = (row.split("\t") + ["", "", ""])[:3]
            lines.append(f"| {name} | {code} | {seconds} |")
        lines.append("")
    parity_file = results / "parity.json"
    if parity_file.exists():
        rows = json.loads(parity_file.read_text())
        bad = [r for r in rows if not r["ok"]]
        lines.append(f"Parity against cuDNN: {len(rows) - len(bad)} of {len(rows)} passed.")
        for r in bad:
            lines.append(
                f"- FAIL {r['case']} {r['dtype']} {r['strategy']} (ran {r['ran']}): "
                f"{r['max_abs_diff']} in {r['worst']} {r['error']}"
            )
        lines.append("")
    for path in sorted(results.glob("bench-*.json")):
        payload = json.loads(path.read_text())
        lines += [
            f"## {path.stem}",
            "",
            "| case | fastrnn ran | fwd torch/fastrnn | fwd+bwd | cuDNN asked (fwd / bwd) | "
            "torch's kernels (fwd+bwd) |",
            "|---|---|---|---|---|---|",
        ]
        for case in payload.get("cases", []):
            ratios = [case.get("ratio_fwd"), case.get("ratio_fwdbwd")]
            shown = [f"{r:.2f}" if isinstance(r, int | float) else "-" for r in ratios]
            status = "" if case.get("status") == "ok" else f" **{case.get('status')}**"
            lines.append(
                f"| {case['label']}{status} | {case.get('fastrnn_strategy')} | {shown[0]} | "
                f"{shown[1]} | {case.get('cudnn_algo')} / {case.get('cudnn_algo_backward')} | "
                f"{case.get('cudnn_seen_fwdbwd', case.get('cudnn_kernels_error', '-'))} |"
            )
            if case.get("error"):
                lines.append(f"| ↳ {case['error'][:150]} | | | | | |")
        lines.append("")
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench.gpu_check", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("toolchain")
    p = sub.add_parser("precompile")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--dtypes", default=",".join(_DTYPES))
    p = sub.add_parser("compile-part")
    p.add_argument("index", type=int)
    p.add_argument("jobs", type=int)
    p.add_argument("dtypes")
    p = sub.add_parser("parity")
    p.add_argument("--out", type=Path, default=None)
    sub.add_parser("workload")
    p = sub.add_parser("summary")
    p.add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.command == "toolchain":
        return toolchain()
    if args.command == "precompile":
        return precompile(args.jobs, tuple(args.dtypes.split(",")))
    if args.command == "compile-part":
        return compile_part(args.index, args.jobs, tuple(args.dtypes.split(",")))
    if args.command == "parity":
        return parity(args.out)
    if args.command == "workload":
        return workload()
    return summary(args.results)


if __name__ == "__main__":
    sys.exit(main())
