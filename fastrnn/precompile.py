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

On the CPU the parts (lstm, gru, rnn, cells) compile in `--jobs` processes at once, by default
one per usable CPU: Numba compiles on one thread, and its on-disk cache takes several writers.
LSTM, GRU and RNN fwd+bwd, float32, cold on 2 Zen 3 cores: 49 s in one process, 37 s in two
(`part_groups`). `--parts lstm,gru` compiles only those; opt-in variants compile only when
named: `--parts gru_reset_before`, or `masks` (the kernels of recurrent dropout and zoneout).
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from .kernels.cpu.cells import SMALL_BATCH
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell
from .recurrence_cpu import available_cpus, serial_kernels
from .recurrence_cuda import get_cuda_strategy, set_cuda_strategy

_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16}


# What can compile on its own: each sequence module's kernels, and the cells'; and, only when
# named (`--parts masks`), the kernels of recurrent dropout and zoneout (`recurrent_masks`).
PARTS = ("lstm", "gru", "rnn", "cells")
# Opt-in variants, compiled only when named: their layer and (on the CPU) cell kernels.
OPTIONAL_PARTS = ("gru_reset_before", "masks")
_MODULES = {"lstm": LSTM, "gru": GRU, "rnn": RNN}
_VARIANTS = {"gru_reset_before": functools.partial(GRU, reset="before")}
_VARIANT_CELLS = {"gru_reset_before": functools.partial(GRUCell, reset="before")}


def _step(module, device: str, dtype: torch.dtype, shape=(3, 2, 2)) -> None:
    """A forward and backward of `module` (moved to device and dtype) on random input."""
    module = module.to(device=device, dtype=dtype)
    output = module(torch.randn(*shape, dtype=dtype, device=device, requires_grad=True))
    (output[0] if isinstance(output, tuple) else output).float().sum().backward()


def _run_cells(dtype: torch.dtype, device: str, parts: tuple[str, ...] = PARTS) -> None:
    for part in parts:
        if part in _MODULES:
            _step(_MODULES[part](2, 3), device, dtype)
    for part in parts:
        if part in _VARIANTS:
            _step(_VARIANTS[part](2, 3), device, dtype)
            if device == "cpu":
                _step(_VARIANT_CELLS[part](2, 3), device, dtype, (2, 2))
    if "masks" in parts:
        for module_class in _MODULES.values():
            _step(module_class(2, 3, recurrent_dropout=0.1, zoneout=0.1), device, dtype)
    if device != "cpu" or "cells" not in parts:
        return  # CUDA cells run the layer path compiled above
    for cell in (LSTMCell(2, 3), GRUCell(2, 3), RNNCell(2, 3)):
        for batch in (1, SMALL_BATCH + 1):  # both product paths (`kernels.cpu.cells`)
            _step(cell, device, dtype, (batch, 2))


def precompile(
    dtypes: tuple[str, ...] = ("float32",),
    device: str = "cpu",
    forked: bool = False,
    parts: tuple[str, ...] = PARTS,
) -> dict[str, float]:
    """Run a tiny forward+backward of every cell (or those of `parts`) for each dtype, in this
    process (on CUDA: with each kernel strategy that applies; on the CPU with `forked`, also
    with the serial twins that forked processes run); returns seconds per dtype."""
    seconds = {}
    for name in dtypes:
        dtype = _DTYPES[name]
        if device == "cpu" and dtype == torch.float16:
            raise ValueError("fastrnn has no float16 CPU kernels")
        start = time.perf_counter()
        if device == "cpu":
            _run_cells(dtype, device, parts)
            if forked:
                with serial_kernels():
                    _run_cells(dtype, device, parts)
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


def precompile_in_processes(
    dtypes: tuple[str, ...] = ("float32",),
    parts: tuple[str, ...] = PARTS,
    jobs: int | None = None,
    forked: bool = False,
) -> float:
    """`precompile` of the CPU kernels in `jobs` processes at once (default: the usable CPUs),
    the parts grouped as `part_groups` says; returns the seconds it took. Raises RuntimeError
    with a process's output if one fails."""
    groups = part_groups(parts, jobs or available_cpus())
    start = time.perf_counter()

    def compile_group(group: tuple[str, ...]) -> None:
        command = [sys.executable, "-m", "fastrnn.precompile", "--jobs", "1"]
        command += ["--parts", ",".join(group), *(["--forked"] if forked else []), *dtypes]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(
                f"precompiling {','.join(group)} failed:\n{done.stdout}{done.stderr}"
            )

    with ThreadPoolExecutor(len(groups)) as pool:
        list(pool.map(compile_group, groups))
    return time.perf_counter() - start


# How the parts share processes, by the number of processes. A process compiles the helpers
# its kernels share once, so the grouping matters: cold on 2 Zen 3 cores, float32, lstm alone
# 24.6 s, gru 24.9, rnn 27.5, cells 9.2, lstm + rnn 41.1, gru + rnn 37.0, all 48.8 in one
# process; lstm | gru + rnn in two 37 s, one process per part two at a time 45 s.
_GROUPINGS = {
    1: (PARTS,),
    2: (("lstm", "cells"), ("gru", "rnn")),
    3: (("lstm", "cells"), ("gru",), ("rnn",)),
}


def part_groups(parts: tuple[str, ...], jobs: int) -> list[tuple[str, ...]]:
    """`parts` split into at most `jobs` groups, one process each (an opt-in variant joins
    the last group, or has its own when there is room)."""
    grouping = _GROUPINGS.get(max(1, jobs), tuple((part,) for part in PARTS))
    groups = [tuple(part for part in group if part in parts) for group in grouping]
    groups = [group for group in groups if group]
    extra = tuple(part for part in OPTIONAL_PARTS if part in parts)
    if extra:  # with the smallest group (the masked kernels compile about as long as a cell's)
        if groups:
            smallest = min(range(len(groups)), key=lambda i: len(groups[i]))
            groups[smallest] += extra
        else:
            groups = [extra]
    return groups


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(dict.fromkeys(p.strip() for p in text.split(",") if p.strip()))
    unknown = [p for p in parts if p not in PARTS + OPTIONAL_PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"choose parts from {','.join(PARTS + OPTIONAL_PARTS)}")
    return parts


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
    parser.add_argument(
        "--parts",
        type=_parts,
        default=PARTS,
        help=f"some of {','.join(PARTS + OPTIONAL_PARTS)} ({','.join(PARTS)})",
    )
    parser.add_argument(
        "--jobs", type=int, default=None, help="CPU: processes at once (the usable CPUs)"
    )
    args = parser.parse_args(argv)
    unknown = [name for name in args.dtypes if name not in _DTYPES]
    if unknown:
        parser.error(f"unknown dtype {unknown[0]!r} (choose from {', '.join(sorted(_DTYPES))})")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    dtypes = tuple(args.dtypes or ["float32"])
    jobs = len(part_groups(args.parts, args.jobs or available_cpus()))
    if args.device == "cpu" and jobs > 1:
        if torch.float16 in (_DTYPES[name] for name in dtypes):
            parser.error("fastrnn has no float16 CPU kernels")
        took = precompile_in_processes(dtypes, args.parts, jobs, args.forked)
        print(f"fastrnn cpu kernels for {', '.join(dtypes)}: ready ({took:.1f} s, {jobs} jobs)")
        return 0
    for name, took in precompile(dtypes, args.device, args.forked, args.parts).items():
        print(f"fastrnn {args.device} kernels for {name}: ready ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
