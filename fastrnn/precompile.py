"""Compile fastrnn's kernels ahead of time into Numba's on-disk cache.

The first call of each kernel in a fresh environment compiles it (30-50 s for LSTM and GRU
forward+backward together on a 2-core machine); later processes load it from the cache in well
under a second. Run this once where the first call's latency matters, e.g. in a Docker build:

    python -m fastrnn.precompile                  # float32
    python -m fastrnn.precompile float32 float64
    python -m fastrnn.precompile --device cuda float32 float16   # both GPU strategies
    python -m fastrnn.precompile --forked         # also the kernels of forked processes

`--forked` adds the single-threaded twins that a process forked from one using fastrnn runs
(Hogwild training with torch.multiprocessing, `multiprocessing` with "fork"); each child
would otherwise compile them on first use.
"""

from __future__ import annotations

import argparse
import time

import torch

from .kernels.cpu.cells import SMALL_BATCH
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .recurrence_cpu import serial_kernels
from .recurrence_cuda import get_cuda_strategy, set_cuda_strategy

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}


def _run_cells(dtype: torch.dtype, device: str) -> None:
    for module in (LSTM(2, 3), GRU(2, 3), RNN(2, 3)):
        module = module.to(device=device, dtype=dtype)
        x = torch.randn(3, 2, 2, dtype=dtype, device=device, requires_grad=True)
        output, _ = module(x)
        output.float().sum().backward()
    if device != "cpu":
        return  # CUDA cells run the layer path compiled above
    for cell in (LSTMCell(2, 3), GRUCell(2, 3), RNNCell(2, 3)):
        cell = cell.to(dtype=dtype)
        for batch in (1, SMALL_BATCH + 1):  # both product paths (`kernels.cpu.cells`)
            x = torch.randn(batch, 2, dtype=dtype, requires_grad=True)
            output = cell(x)
            (output[0] if isinstance(output, tuple) else output).sum().backward()


def precompile(
    dtypes: tuple[str, ...] = ("float32",), device: str = "cpu", forked: bool = False
) -> dict[str, float]:
    """Run a tiny forward+backward of every cell for each dtype (on CUDA: with each kernel
    strategy that applies; on the CPU with `forked`, also with the serial twins that forked
    processes run); returns seconds per dtype."""
    seconds = {}
    for name in dtypes:
        dtype = _DTYPES[name]
        if device == "cpu" and dtype == torch.float16:
            raise ValueError("fastrnn has no float16 CPU kernels")
        start = time.perf_counter()
        if device == "cpu":
            _run_cells(dtype, device)
            if forked:
                with serial_kernels():
                    _run_cells(dtype, device)
        else:
            before = get_cuda_strategy()
            try:
                for strategy in ("stepwise", "auto"):  # auto: persistent where it applies
                    set_cuda_strategy(strategy)
                    _run_cells(dtype, device)
            finally:
                set_cuda_strategy(before)
        seconds[name] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrnn.precompile", description=__doc__)
    # names checked below, not by `choices`: argparse (Python 3.11) checks an empty nargs="*"
    # list against `choices` as one value, so `python -m fastrnn.precompile` alone failed
    parser.add_argument("dtypes", nargs="*", help=f"any of {sorted(_DTYPES)} (float32)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument(
        "--forked",
        action="store_true",
        help="also the CPU kernels that processes forked from a fastrnn process run",
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.dtypes if name not in _DTYPES]
    if unknown:
        parser.error(f"unknown dtype {unknown[0]!r} (choose from {', '.join(sorted(_DTYPES))})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    for name, took in precompile(
        tuple(args.dtypes or ["float32"]), args.device, args.forked
    ).items():
        print(f"fastrnn {args.device} kernels for {name}: ready ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
