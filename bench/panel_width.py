"""Panel width of the per-step product, measured: fastrnn's 16-column panels
(`kernels/cpu/panel_matmul.matmul_panels`) against an 8-row tile of 32-column panels (two zmm
registers a row on AVX-512: 16 accumulators), one thread, the same k-ordered sums (the outputs
must be bitwise equal). An experiment for choosing the panel width per CPU and dtype; the
kernels keep 16-column panels and take two at a time in float32 on AVX-512 (the same 16
accumulators), so `matmul_panels` here already runs that form.

    python -m bench.panel_width [--dtype float32|float64] [--save]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from numba import carray, njit

from bench.report import cpu_microarchitecture
from fastrnn.kernels.cpu.panel_matmul import _stack_buffer, matmul_panels, packed_panels

WIDTH = 32  # columns of a panel here
ROWS = 8  # rows of a tile
ACCUMULATORS = 256  # ROWS * WIDTH, a literal for the stack buffer
SHAPES = ((8, 256, 1024), (16, 256, 1024), (16, 512, 2048), (32, 1024, 4096), (64, 512, 2048))
RESULTS = Path(__file__).resolve().parent / "results"


@njit(boundscheck=False, error_model="numpy")
def _pack(W):
    """W (N, K) -> panels (ceil(N / WIDTH), K, WIDTH), zero past N."""
    columns, depth = W.shape
    panels = np.zeros(((columns + WIDTH - 1) // WIDTH, depth, WIDTH), dtype=W.dtype)
    for p in range(panels.shape[0]):
        for j in range(min(WIDTH, columns - p * WIDTH)):
            for k in range(depth):
                panels[p, k, j] = W[p * WIDTH + j, k]
    return panels


@njit(boundscheck=False, error_model="numpy", fastmath={"contract"})
def _wide_panel_matmul(rows, panels, out):
    """out = rows @ W^T for a multiple of ROWS rows and of WIDTH columns, 8-row tiles written out
    as `matmul_panels` writes its own (LLVM keeps the accumulators in registers)."""
    acc = carray(_stack_buffer(ACCUMULATORS, rows), (ACCUMULATORS,))
    for p in range(panels.shape[0]):
        panel = panels[p]
        for first in range(0, rows.shape[0], ROWS):
            for i in range(ACCUMULATORS):
                acc[i] = 0
            for k in range(rows.shape[1]):
                a0, a1 = rows[first, k], rows[first + 1, k]
                a2, a3 = rows[first + 2, k], rows[first + 3, k]
                a4, a5 = rows[first + 4, k], rows[first + 5, k]
                a6, a7 = rows[first + 6, k], rows[first + 7, k]
                for j in range(WIDTH):
                    w = panel[k, j]
                    acc[j] += a0 * w
                    acc[WIDTH + j] += a1 * w
                    acc[2 * WIDTH + j] += a2 * w
                    acc[3 * WIDTH + j] += a3 * w
                    acc[4 * WIDTH + j] += a4 * w
                    acc[5 * WIDTH + j] += a5 * w
                    acc[6 * WIDTH + j] += a6 * w
                    acc[7 * WIDTH + j] += a7 * w
            for r in range(ROWS):
                for j in range(WIDTH):
                    out[first + r, p * WIDTH + j] = acc[r * WIDTH + j]


def _seconds(function, *arguments, calls: int = 200, blocks: int = 15) -> float:
    function(*arguments)
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(calls):
            function(*arguments)
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument(
        "--save", action="store_true", help="write bench/results/<cpu>-panel-width.txt"
    )
    args = parser.parse_args(argv)
    dtype = np.dtype(args.dtype)
    rng = np.random.default_rng(0)
    lines = [
        f"# python -m bench.panel_width --dtype {args.dtype}, {cpu_microarchitecture()}, one "
        "thread; GFLOP/s, best of 15 blocks; outputs bitwise equal",
    ]
    for m, k, n in SHAPES:
        rows = rng.standard_normal((m, k)).astype(dtype)
        W = rng.standard_normal((n, k)).astype(dtype)
        narrow = packed_panels(W[None], False, 1)[0]
        wide = _pack(W)
        out_narrow, out_wide = np.empty((m, n), dtype), np.empty((m, n), dtype)
        t16 = _seconds(matmul_panels, rows, narrow, out_narrow, 0, narrow.shape[0])
        t32 = _seconds(_wide_panel_matmul, rows, wide, out_wide)
        if not np.array_equal(out_narrow, out_wide):
            raise SystemExit("the two products differ")
        flops = 2 * m * k * n
        lines.append(
            f"{m:3d} x {k:4d} @ {k:4d} x {n:4d}: 16 columns {flops / t16 / 1e9:6.1f}, "
            f"32 columns {flops / t32 / 1e9:6.1f}, ratio {t16 / t32:.2f}"
        )
        print(lines[-1], flush=True)
    if args.save:
        kind = (cpu_microarchitecture() or "cpu").split(",")[-1].strip().lower().replace(" ", "")
        path = RESULTS / f"{kind}-panel-width.txt"
        mode = "a" if path.exists() and args.dtype == "float64" else "w"
        with path.open(mode) as f:
            f.write("\n".join(lines) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
