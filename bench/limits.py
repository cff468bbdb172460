"""What this machine allows: a lower bound of any implementation's time, against torch's.

Speed targets are ratios (torch time / fastrnn time). Whether a target can be met at all on a
given machine follows from two measured throughputs, not from FLOP counts alone:

- A batch-1 step multiplies one row by W_hh, so every step streams all of W_hh (G*H x H
  floats: 256 KiB for an LSTM at H = 128) through the cache, one multiply-add per weight. Its
  floor is the time of fastrnn's own one-row panel product over the whole of W_hh, measured on
  one core in a tight loop, divided by the threads (a perfect split with no hand-over between
  them). The backward's per-step product (dG @ W_hh) reads the same weights.
- Everything else that has to happen is GEMM work over the whole sequence: the input
  projection, and in the backward dx, dW_ih and dW_hh, counted at numpy's measured sgemm peak
  with the same threads (`bench.roofline`). For a packed batch the bound is the forward's whole
  GEMM work at that peak (its per-step products have 16 rows or fewer).

Nothing is counted for the gate math, Python, autograd, or thread wake-ups, so the bound is
optimistic: `torch time / bound` is the highest ratio any float32 implementation could reach
here, and a target above it can't be met on this machine. fastrnn's own time is shown against
the bound. torch and fastrnn are timed interleaved, as `python -m bench` does.

    python -m bench.limits [--reps 40] [--save]
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numba import njit

import fastrnn
from bench import cases as C
from bench.cli import runners
from bench.roofline import sgemm_peak_gflops
from bench.timing import CpuTimer, RepPolicy, measure
from fastrnn.kernels.cpu.panel_matmul import matmul_panels, packed_panels

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Target:
    """One of the project's speed targets: a case and the ratios asked for."""

    cell: str
    size: C.Size
    packed: bool
    fwd: float
    fwdbwd: float


TARGETS = (
    Target("lstm", C.Size(100, 1, 64, 128), False, 2.0, 3.0),
    Target("gru", C.Size(100, 1, 64, 128), False, 4.0, 8.0),
    Target("rnn", C.Size(100, 1, 64, 128), False, 3.0, 6.0),
    Target("lstm", C.Size(100, 16, 128, 256), True, 3.0, 3.0),
)


@njit(cache=True)
def _repeat_products(row, panels, out, repeats):
    for _ in range(repeats):
        matmul_panels(row, panels, out, 0, panels.shape[0])


def one_row_product_seconds(rows_out: int, depth: int, transposed: bool, repeats: int) -> float:
    """Best time of one (1, depth) @ (depth, rows_out) product with fastrnn's panel kernel on
    the calling thread, the weights already in cache (a tight loop of `repeats` products)."""
    rng = np.random.default_rng(0)
    shape = (1, depth, rows_out) if transposed else (1, rows_out, depth)
    panels = packed_panels(rng.standard_normal(shape, dtype=np.float32), transposed, 1)[0]
    row = rng.standard_normal((1, depth), dtype=np.float32)
    out = np.empty((1, rows_out), dtype=np.float32)
    _repeat_products(row, panels, out, 10)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        _repeat_products(row, panels, out, repeats)
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def bounds(target: Target, tokens: int, threads: int, peak_gflops: float) -> dict:
    """Lower bounds (seconds) of a forward and a forward+backward, and what they are made of."""
    s, gates = target.size, C.GATES[target.cell]
    cfg = C.CaseConfig(target.cell, s, packed=target.packed)
    peak = peak_gflops * 1e9
    if target.packed:
        forward_gemm = C.forward_flops(cfg, tokens) / peak
        return {"fwd_s": forward_gemm, "fwdbwd_s": 3 * forward_gemm, "gemm_s": forward_gemm}
    # forward: the recurrent products, W_hh (G*H, H); the backward's read it transposed
    forward_step = one_row_product_seconds(gates * s.H, s.H, False, 2000) / threads
    backward_step = one_row_product_seconds(s.H, gates * s.H, True, 2000) / threads
    projection = 2.0 * tokens * gates * s.H * s.I / peak
    # backward GEMMs: dx and dW_ih (each as the projection), dW_hh (H deep)
    weight_grads = (2 * projection) + 2.0 * tokens * gates * s.H * s.H / peak
    return {
        "fwd_s": s.T * forward_step + projection,
        "fwdbwd_s": s.T * (forward_step + backward_step) + projection + weight_grads,
        "step_fwd_s": forward_step,
        "step_bwd_s": backward_step,
        "projection_s": projection,
        "weight_grads_s": weight_grads,
    }


def run_target(target: Target, threads: int, peak_gflops: float, reps: int) -> dict:
    cfg = C.CaseConfig(target.cell, target.size, packed=target.packed)
    fast_cls = getattr(fastrnn, C.CLASS_NAMES[target.cell])
    reference, fast = C.build_modules(cfg, C.torch_classes()[target.cell], fast_cls)
    source = C.InputSource(cfg)
    result = {"case": cfg.label, "tokens": source.tokens, "threads": threads}
    result.update(bounds(target, source.tokens, threads, peak_gflops))
    policy = RepPolicy(reps=reps, warmup=3)
    for mode, asked in (("fwd", target.fwd), ("fwdbwd", target.fwdbwd)):
        measured = measure(runners(mode, reference, fast, source), CpuTimer(), policy)
        torch_s = measured.stats["torch"].median
        fastrnn_s = measured.stats["fastrnn"].median
        result[mode] = {
            "torch_s": torch_s,
            "fastrnn_s": fastrnn_s,
            "ratio": torch_s / fastrnn_s,
            "target": asked,
            "best_possible_ratio": torch_s / result[f"{mode}_s"],
            "fastrnn_over_bound": fastrnn_s / result[f"{mode}_s"],
        }
    return result


def _line(result: dict, mode: str) -> str:
    m = result[mode]
    verdict = "within reach" if m["best_possible_ratio"] >= m["target"] else "above the bound"
    return (
        f"{result['case']:<30s} {mode:<7s} {m['torch_s'] * 1e3:9.3f} "
        f"{result[mode + '_s'] * 1e3:9.3f} "
        f"{m['fastrnn_s'] * 1e3:11.3f} {m['best_possible_ratio']:8.2f}x {m['target']:6.1f}x "
        f"{m['ratio']:7.2f}x  {verdict}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.limits",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--reps", type=int, default=40, help="timed calls per implementation")
    parser.add_argument("--save", action="store_true", help="write JSON + text to bench/results")
    args = parser.parse_args(argv)

    threads = torch.get_num_threads()
    peak = sgemm_peak_gflops(threads)
    lines = [
        f"# python -m bench.limits, {datetime.datetime.now().isoformat(timespec='seconds')}, "
        f"torch {torch.__version__}, {threads} threads, numpy sgemm peak {peak:.0f} GFLOP/s",
        "# ms; bound = lowest time any float32 implementation could take here (see the module "
        "docstring); best = torch / bound",
        f"{'case':<30s} {'mode':<7s} {'torch':>9s} {'bound':>9s} {'fastrnn':>11s} "
        f"{'best':>9s} {'target':>7s} {'fastrnn':>8s}",
    ]
    print("\n".join(lines), flush=True)
    results = []
    for target in TARGETS:
        result = run_target(target, threads, peak, args.reps)
        results.append(result)
        for mode in ("fwd", "fwdbwd"):
            lines.append(_line(result, mode))
            print(lines[-1], flush=True)
    after = sgemm_peak_gflops(threads)
    lines.append(f"# numpy sgemm peak after the run: {after:.0f} GFLOP/s")
    print(lines[-1])
    if args.save:
        stem = RESULTS / f"cpu-{datetime.date.today().isoformat()}-limits"
        payload = {"sgemm_peak_gflops": [peak, after], "threads": threads, "results": results}
        stem.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
        stem.with_suffix(".txt").write_text("\n".join(lines) + "\n")
        print(f"wrote {stem}.json / .txt")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
