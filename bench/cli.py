"""``python -m bench``: parity + timing of fastrnn against torch.nn.

For every case (cell x size): parity first (output, h_n / c_n and the gradients of the input and
every parameter, same input and weights), then forward under ``torch.no_grad()`` and
forward+backward (loss = output.sum() + h_n.sum()) timed separately, torch and fastrnn
interleaved, median of N repetitions. Prints a table, writes JSON + markdown (+ PNG with
matplotlib) to ``bench/results/``. Exit status: 0 when every case passed parity (or parity was
skipped), 1 when a case failed parity or raised, 2 for a usage / environment problem.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import sys
import time
import warnings
from pathlib import Path

import numba
import numpy as np
import torch

from bench import cases as C
from bench import cudnn
from bench import report as R
from bench.cudnn import cudnn_report
from bench.parity import check_parity
from bench.roofline import gemm_name, sgemm_peak_gflops
from bench.timing import OtherLoad, RepPolicy, make_timer, measure

DEFAULT_OUT = Path(__file__).resolve().parent / "results"

# Timing defaults: normal run / --quick.
FULL = dict(target_time=0.3, min_reps=3, max_reps=50, warmup=2)
QUICK = dict(target_time=0.02, min_reps=3, max_reps=5, warmup=2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench",
        description="Parity + timing of fastrnn's LSTM/GRU/RNN against torch.nn on the same "
        "inputs and weights. Speed-up = torch median / fastrnn median (>1: fastrnn is faster).",
        epilog="Exit status: 0 all cases passed parity, 1 a case failed parity or raised, "
        "2 usage or environment error.",
    )
    g = p.add_argument_group("cases")
    g.add_argument(
        "--cells",
        default="lstm,gru,rnn",
        help="comma-separated subset of lstm,gru,rnn (default: all), or gru_reset_before (the "
        "reset-before GRU against a torch loop of that cell; run only when named)",
    )
    g.add_argument(
        "--sizes",
        default="small",
        help="preset 'small' = (100,1,64,128);(100,16,128,256), 'standard' = the four standard "
        "sizes (+ (100,64,512,512) on cuda), or explicit 'T,B,I,H;T,B,I,H' (mixable with "
        "presets); default: small",
    )
    g.add_argument(
        "--dtype",
        choices=("float32", "float64", "float16", "bfloat16"),
        default="float32",
        help="(float32); float16 / bfloat16 only with --device cuda (no CPU kernels)",
    )
    g.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="(cpu); cuda times with CUDA events",
    )
    g.add_argument(
        "--cuda-strategy",
        choices=("auto", "persistent", "stepwise", "torch"),
        default="auto",
        help="fastrnn's GPU kernel strategy (auto); the one that ran is reported per case",
    )
    g.add_argument("--layers", type=int, default=1, help="num_layers (1)")
    g.add_argument("--bidirectional", action="store_true", help="bidirectional modules")
    g.add_argument("--proj-size", type=int, default=0, help="LSTM proj_size (LSTM cases only; 0)")
    g.add_argument(
        "--packed",
        action="store_true",
        help="PackedSequence input: lengths uniform in [T/2, T], unsorted (enforce_sorted=False)",
    )
    g.add_argument("--seed", type=int, default=0, help="weights and inputs (0)")
    g.add_argument(
        "--no-cudnn-profile",
        action="store_true",
        help="cuda: don't record the kernels torch ran per case (torch.profiler, ~0.5 s a case)",
    )

    g = p.add_argument_group("timing")
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads + numba.set_num_threads (default: leave as is)",
    )
    g.add_argument("--reps", type=int, default=None, help="fixed repetitions (default: adaptive)")
    g.add_argument(
        "--target-time",
        type=float,
        default=None,
        help=f"adaptive reps: seconds of timed calls per implementation and measurement "
        f"(default {FULL['target_time']}, --quick {QUICK['target_time']})",
    )
    g.add_argument(
        "--min-reps",
        type=int,
        default=None,
        help=f"adaptive reps: minimum (default {FULL['min_reps']}, --quick {QUICK['min_reps']})",
    )
    g.add_argument(
        "--max-reps",
        type=int,
        default=None,
        help=f"adaptive reps: maximum (default {FULL['max_reps']}, --quick {QUICK['max_reps']})",
    )
    g.add_argument(
        "--warmup", type=int, default=None, help="untimed warm-up calls per implementation (2)"
    )
    g.add_argument(
        "--no-interleave",
        action="store_true",
        help="time all torch calls, then all fastrnn calls (default: alternate ABAB...)",
    )
    g.add_argument("--quick", action="store_true", help="few repetitions, for smoke tests")

    g = p.add_argument_group("parity")
    g.add_argument("--no-parity", action="store_true", help="skip the parity check")
    g.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="parity: max|Δ| <= rtol * max(1, max|ref|) per tensor (default 1e-4 cpu, 1e-3 cuda)",
    )

    g = p.add_argument_group("output")
    g.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="directory for JSON/md/PNG (default: bench/results)",
    )
    g.add_argument(
        "--name", default=None, help="file stem (default: <device>-<date>[-<non-default options>])"
    )
    g.add_argument("--no-save", action="store_true", help="print only, write no files")
    g.add_argument("--no-plot", action="store_true", help="write no PNG")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _fail(msg: str) -> int:
    print(f"python -m bench: error: {msg}", file=sys.stderr)
    return 2


def _file_stem(args, date: str) -> str:
    if args.name:
        return args.name
    tags = []
    if args.sizes != "small":
        tags.append(args.sizes if args.sizes in C.SIZE_PRESETS else "custom")
    if args.cells.replace(" ", "") != "lstm,gru,rnn":
        tags.append(args.cells.replace(",", "+").replace(" ", ""))
    if args.dtype != "float32":
        tags.append(args.dtype)
    if args.layers != 1:
        tags.append(f"L{args.layers}")
    if args.bidirectional:
        tags.append("bi")
    if args.proj_size:
        tags.append(f"P{args.proj_size}")
    if args.packed:
        tags.append("packed")
    if args.threads is not None:
        tags.append(f"t{args.threads}")
    if args.device == "cuda" and args.cuda_strategy != "auto":
        tags.append(args.cuda_strategy)
    if args.quick:
        tags.append("quick")
    return "-".join([args.device, date, *tags])


def _progress(items, enabled: bool):
    """tqdm over ``items`` when available (and enabled), else plain progress lines on stderr."""
    if enabled:
        try:
            from tqdm import tqdm

            bar = tqdm(items, desc="bench", unit="case", file=sys.stderr, dynamic_ncols=True)
            for item in bar:
                bar.set_postfix_str(item.label)
                yield item
            return
        except ImportError:
            pass
    n = len(items)
    for i, item in enumerate(items, 1):
        if enabled:
            print(f"[{i}/{n}] {item.label}", file=sys.stderr, flush=True)
        yield item


def _fwd_runner(module, inp):
    def run():
        with torch.no_grad():
            module(inp)

    return run, None


def _profiled_fwd_runner(module, source: C.InputSource):
    return _fwd_runner(module, source.make(requires_grad=False)[0])


def _fwdbwd_runner(module, source: C.InputSource):
    inp, leaf = source.make(requires_grad=True)  # built outside the timed region
    params = list(module.parameters())

    def reset():
        leaf.grad = None
        for p in params:
            p.grad = None

    def run():
        out, hidden = module(inp)
        named = C.split_output(out, hidden)
        (named["output"].sum() + named["h_n"].sum()).backward()

    return run, reset


def runners(mode: str, ref, fast, source: C.InputSource) -> dict:
    """torch and fastrnn callables for one mode; inputs are built here, outside timing."""
    if mode == "fwd":  # inference: eval mode, no autograd graph
        ref.eval()
        fast.eval()
        return {
            "torch": _fwd_runner(ref, source.make(requires_grad=False)[0]),
            "fastrnn": _fwd_runner(fast, source.make(requires_grad=False)[0]),
        }
    ref.train()  # forward+backward: training mode
    fast.train()
    return {"torch": _fwdbwd_runner(ref, source), "fastrnn": _fwdbwd_runner(fast, source)}


def run_case(cfg, ref_cls, fast_cls, timer, policy, interleave, parity, rtol) -> dict:
    res: dict = {
        "label": cfg.label,
        "config": cfg.to_dict(),
        "status": "ok",
        "error": "",
        "parity": None,
        "fwd": None,
        "fwdbwd": None,
        "speedup_fwd": None,
        "speedup_fwdbwd": None,
        "gflops": {},
        "warnings": [],
    }
    t_start = time.perf_counter()
    load = OtherLoad()
    fastrnn_module = sys.modules["fastrnn"]
    fastrnn_module.last_cuda_strategy(reset=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ref, fast = C.build_modules(cfg, ref_cls, fast_cls)
            source = C.InputSource(cfg)
        except Exception as exc:  # noqa: BLE001 - e.g. proj_size >= hidden_size
            res.update(status="error", error=f"building the case: {type(exc).__name__}: {exc}")
            return res
        res["tokens"] = source.tokens
        if source.lengths is not None:
            res["lengths"] = source.lengths.tolist()
        fwd_flops = C.forward_flops(cfg, source.tokens)
        res["flops"] = {"fwd": fwd_flops, "fwdbwd": 3 * fwd_flops}

        if parity:
            t0 = time.perf_counter()
            pr = check_parity(ref, fast, source, rtol)
            res["parity"] = pr.to_dict()
            res["parity"]["wall_s"] = time.perf_counter() - t0
            if pr.error:
                res.update(status="error", error=f"fastrnn raised: {pr.error}")
            elif not pr.ok:
                res["status"] = "parity_failed"

        if res["status"] != "error":
            for mode in ("fwd", "fwdbwd"):
                try:
                    m = measure(runners(mode, ref, fast, source), timer, policy, interleave)
                except Exception as exc:  # noqa: BLE001
                    res.update(status="error", error=f"timing {mode}: {type(exc).__name__}: {exc}")
                    break
                res[mode] = m.to_dict()
                for impl in ("torch", "fastrnn"):
                    res["gflops"][f"{impl}_{mode}"] = (
                        res["flops"][mode] / m.stats[impl].median / 1e9
                    )
                ratio = m.stats["torch"].median / m.stats["fastrnn"].median
                res[f"ratio_{mode}"] = ratio  # raw ratio, kept even when parity failed
                pairs = m.paired_ratios("torch", "fastrnn")
                if pairs:
                    p25, p50, p75 = (float(v) for v in np.percentile(pairs, [25, 50, 75]))
                    res[f"paired_ratio_{mode}"] = {"median": p50, "p25": p25, "p75": p75}
            if res["status"] == "ok":
                res["speedup_fwd"] = res.get("ratio_fwd")
                res["speedup_fwdbwd"] = res.get("ratio_fwdbwd")
    seen = []
    for w in caught:
        msg = f"{w.category.__name__}: {w.message}"
        if msg not in seen:
            seen.append(msg)
    res["warnings"] = seen
    if cfg.device == "cuda":
        # The kernels fastrnn ran (None: it fell back to torch, see the warnings); the cuDNN
        # algorithm PyTorch asks for and the kernels torch's module ran (bench.cudnn).
        res["fastrnn_strategy"] = fastrnn_module.last_cuda_strategy(reset=True)
        res.update(cudnn_report(cfg, ref, source, _profiled_fwd_runner, _fwdbwd_runner))
    res["torch_threads_after"] = torch.get_num_threads()
    res["numba_threads_after"] = numba.get_num_threads()
    res["wall_s"] = time.perf_counter() - t_start
    res["other_cpu_load"] = load.stop()
    del ref, fast, source
    gc.collect()
    return res


def uncached_kernels(cells: list[str]) -> list[str]:
    """The CPU kernels of `cells` that Numba's on-disk cache has nothing for yet (a fresh
    install): their first call compiles them. Best effort, from Numba's internal cache layout;
    an empty list when it can't tell."""
    try:
        from fastrnn.kernels.cpu import gru, gru_reset_before, lstm, rnn

        modules = {"lstm": lstm, "gru": gru, "rnn": rnn, "gru_reset_before": gru_reset_before}
        names = [f"{cell}_{part}" for cell in cells for part in ("forward", "backward")]
        return [
            name
            for name in names
            if not Path(
                getattr(modules[name.rsplit("_", 1)[0]], name)._cache._cache_file._index_path
            ).exists()
        ]
    except Exception:  # noqa: BLE001 - Numba's cache internals changed: say nothing
        return []


def _case_roofline(args) -> float | None:
    """numpy's GEMM GFLOP/s in the run's dtype right now, with torch's thread count (CPU runs
    only)."""
    if args.device != "cpu":
        return None
    return sgemm_peak_gflops(
        torch.get_num_threads(), n=1024 if args.quick else 2048, repeats=3, dtype=args.dtype
    )


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, val in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, val)
    if args.rtol is None:
        # torch's own tolerances for these dtypes, loosened for whole-sequence gradients
        args.rtol = {"float16": 2e-2, "bfloat16": 5e-2}.get(
            args.dtype, 1e-3 if args.device == "cuda" else 1e-4
        )
    if args.dtype in ("float16", "bfloat16") and args.device != "cuda":
        return _fail(
            f"--dtype {args.dtype} needs --device cuda (fastrnn has no 16-bit CPU kernels)"
        )

    try:
        cells = C.parse_cells(args.cells)
        sizes = C.parse_sizes(args.sizes, args.device)
    except ValueError as exc:
        return _fail(str(exc))
    for name in ("layers", "min_reps", "max_reps", "warmup"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1")
    if args.reps is not None and args.reps < 1:
        return _fail("--reps must be >= 1")
    if args.min_reps > args.max_reps:
        return _fail("--min-reps must be <= --max-reps")
    if args.proj_size < 0:
        return _fail("--proj-size must be >= 0")
    if args.proj_size and "lstm" not in cells:
        print("note: --proj-size only applies to LSTM cases; ignored", file=sys.stderr)

    if args.device == "cuda" and not torch.cuda.is_available():
        return _fail(
            "--device cuda was requested but torch.cuda.is_available() is False "
            f"(torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
            "run on a machine with an NVIDIA GPU and a CUDA build of torch, or use --device cpu"
        )

    if args.device == "cuda":
        import fastrnn

        fastrnn.set_cuda_strategy(args.cuda_strategy)
        cudnn.PROFILE = not args.no_cudnn_profile

    if args.threads is not None:
        if args.threads < 1:
            return _fail("--threads must be >= 1")
        try:
            numba.set_num_threads(args.threads)
        except ValueError as exc:
            return _fail(f"numba.set_num_threads({args.threads}): {exc}")
        torch.set_num_threads(args.threads)

    try:
        fast_classes, fast_version = C.fastrnn_classes()
    except Exception as exc:  # noqa: BLE001
        return _fail(
            f"cannot use fastrnn ({type(exc).__name__}: {exc}); "
            "install it with `pip install -e . --no-deps` from the repository root"
        )
    fast_mod = sys.modules.get("fastrnn")
    fast_file = getattr(fast_mod, "__file__", None)
    ref_classes = C.torch_classes()

    timer = make_timer(args.device)
    policy = RepPolicy(
        target_s=args.target_time,
        min_reps=args.min_reps,
        max_reps=args.max_reps,
        reps=args.reps,
        warmup=args.warmup,
    )
    interleave = not args.no_interleave
    settings = {
        "cells": cells,
        "sizes": [str(s) for s in sizes],
        "dtype": args.dtype,
        "device": args.device,
        "layers": args.layers,
        "bidirectional": args.bidirectional,
        "proj_size": args.proj_size,
        "packed": args.packed,
        "cuda_strategy": args.cuda_strategy if args.device == "cuda" else None,
        "seed": args.seed,
        "parity": not args.no_parity,
        "rtol": args.rtol,
        "loss_fwdbwd": "output.sum() + h_n.sum(); grads of input and parameters (set to None "
        "before each call, untimed)",
        "modes": {"fwd": "eval(), torch.no_grad()", "fwdbwd": "train(), autograd"},
        "timing": {
            "timer": timer.name,
            "reps": args.reps,
            "target_s": args.target_time,
            "min_reps": args.min_reps,
            "max_reps": args.max_reps,
            "warmup": args.warmup,
            "schedule": "interleaved ABAB" if interleave else "blocked",
            "quick": args.quick,
        },
        "flops": "GEMM FLOPs; forward = 2*tokens*G*H*(I+H) per layer-direction "
        "(G = 4 lstm, 3 gru, 1 rnn; + projection), fwd+bwd = 3x forward",
    }

    meta = R.collect_metadata(args.device, fast_version, fast_file)
    threads_start = meta["threads"]
    if args.device == "cpu":
        meta["peak_gemm"] = gemm_name(args.dtype)
        meta["sgemm_peak_gflops"] = sgemm_peak_gflops(
            torch.get_num_threads(), n=1024 if args.quick else 2048, dtype=args.dtype
        )
    print("fastrnn benchmark (torch.nn vs fastrnn)")
    for line in R.header_lines(meta, settings):
        print(line)
    uncached = uncached_kernels(cells) if args.device == "cpu" else []
    if uncached:
        print(
            f"first use: fastrnn compiles {len(uncached)} kernels for this machine first, in a "
            "process per CPU (about a minute on 2 cores; cached on disk afterwards; "
            "`python -m fastrnn.precompile` does it ahead of time)",
            flush=True,
        )
        from fastrnn.precompile import precompile_in_processes

        try:
            took = precompile_in_processes((args.dtype,), tuple(cells))
        except RuntimeError as error:  # each case then compiles what it needs itself
            print(f"  that failed, the cases compile in this process instead: {error}")
        else:
            print(f"  compiled in {took:.0f} s")
    print(flush=True)

    case_cfgs = [
        C.CaseConfig(
            cell=cell,
            size=size,
            dtype=args.dtype,
            device=args.device,
            layers=args.layers,
            bidirectional=args.bidirectional,
            proj_size=args.proj_size,
            packed=args.packed,
            seed=args.seed,
        )
        for cell in cells
        for size in sizes
    ]
    results = []
    run_load = OtherLoad()
    t0 = time.perf_counter()
    for cfg in _progress(case_cfgs, enabled=not args.no_progress):
        before = _case_roofline(args)
        result = run_case(
            cfg,
            ref_classes[cfg.cell],
            fast_classes[cfg.cell],
            timer,
            policy,
            interleave,
            not args.no_parity,
            args.rtol,
        )
        if before is not None:
            # This VM's speed drifts by up to 2x within a one-minute run (a Zen 3: sgemm 167
            # GFLOP/s before a run, 97 after it), so a run-wide roofline misjudged the cases
            # timed in a slow stretch: each case is judged by sgemm measured beside it.
            after = _case_roofline(args)
            result["sgemm_peak_gflops_before_after"] = [before, after]
            result["sgemm_peak_gflops"] = max(before, after)
        results.append(result)
    wall = time.perf_counter() - t0
    meta["other_cpu_load_during_run"] = run_load.stop()
    threads_end = R.thread_info()
    meta["threads_end"] = threads_end
    if meta["threads"]["numba_threading_layer"] is None:
        meta["threads"]["numba_threading_layer"] = threads_end["numba_threading_layer"]

    if args.device == "cpu" and results:
        # The run-wide figure: the best of every measurement (the cases are judged by their own).
        start_peak = meta["sgemm_peak_gflops"]
        end_peak = results[-1]["sgemm_peak_gflops_before_after"][1]
        beside = [p for r in results for p in r["sgemm_peak_gflops_before_after"]]
        meta["sgemm_peak_gflops_start_end"] = [start_peak, end_peak]
        meta["sgemm_peak_gflops"] = max(start_peak, *beside)
        gemm = meta["peak_gemm"]
        print(
            f"roofline  : numpy {gemm} {min(beside):.0f}-{max(beside):.0f} GFLOP/s measured beside "
            f"the cases ({start_peak:.0f} before the run); each case's '% {gemm} peak' uses the "
            "higher of its own before and after"
        )
    print(R.console_table(results, meta.get("sgemm_peak_gflops"), meta.get("peak_gemm", "sgemm")))
    note_lines = R.notes(results, threads_start, threads_end)
    if args.device == "cuda":
        note_lines += [
            f"{r['label']}: fastrnn ran {r.get('fastrnn_strategy') or 'torch (fallback)'}; "
            f"cuDNN asked for {r.get('cudnn_algo')} forward, {r.get('cudnn_algo_backward')} "
            f"backward; torch's kernels: {r.get('cudnn_seen_fwd', '?')} (fwd), "
            f"{r.get('cudnn_seen_fwdbwd', '?')} (fwd+bwd)"
            for r in results
        ]
    if note_lines:
        print("\nNotes:")
        for ln in note_lines:
            print(f"  - {ln}")
    print(
        "\nspeed-up = torch median / fastrnn median (>1: fastrnn faster); ±: half the IQR "
        f"relative to the median; total {wall:.1f} s"
    )

    if not args.no_save:
        date = _dt.date.today().isoformat()
        stem = _file_stem(args, date)
        try:
            args.out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return _fail(f"cannot create {args.out}: {exc}")
        payload = {
            "schema": "fastrnn-bench/1",
            "meta": meta,
            "settings": settings,
            "wall_s": wall,
            "cases": results,
        }
        json_path = args.out / f"{stem}.json"
        md_path = args.out / f"{stem}.md"
        R.write_json(json_path, payload)
        md_path.write_text(R.markdown_report(meta, settings, results, note_lines))
        written = [json_path, md_path]
        if not args.no_plot:
            png_path = args.out / f"{stem}.png"
            t = meta["threads"]
            title = (
                f"fastrnn vs torch: {args.device} ({meta['machine']['cpu_model']}), "
                f"{R.settings_short(settings)}, threads torch {t['torch_num_threads']} / "
                f"numba {t['numba_num_threads']}, {date}"
            )
            why = R.write_plot(png_path, results, title)
            if why is None:
                written.append(png_path)
            else:
                print(f"note: plot skipped: {why}")
            grid_path = args.out / f"{stem}-vs-batch.png"
            if (
                R.write_grid_plot(
                    grid_path,
                    results,
                    meta.get("sgemm_peak_gflops"),
                    title,
                    meta.get("peak_gemm", "sgemm"),
                )
                is None
            ):
                written.append(grid_path)
        print("wrote " + ", ".join(str(p) for p in written))

    bad = [r["label"] for r in results if r["status"] != "ok"]
    if bad:
        print(f"FAILED (parity or error): {', '.join(bad)}", file=sys.stderr)
        return 1
    return 0
