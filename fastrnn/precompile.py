"""Compile fastrnn's CPU kernels ahead of time into Numba's on-disk cache.

The first call of each kernel in a fresh environment compiles it (about 30 s for LSTM and GRU
forward+backward together on a 2-core machine); later processes load it from the cache in well
under a second. Run this once where the first call's latency matters, e.g. in a Docker build:

    python -m fastrnn.precompile                  # float32
    python -m fastrnn.precompile float32 float64
"""

from __future__ import annotations

import argparse
import time

import torch

from .modules import GRU, LSTM, RNN

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def precompile(dtypes: tuple[str, ...] = ("float32",)) -> dict[str, float]:
    """Run a tiny forward+backward of every cell for each dtype; returns seconds per dtype."""
    seconds = {}
    for name in dtypes:
        dtype = _DTYPES[name]
        start = time.perf_counter()
        for module in (LSTM(2, 3), GRU(2, 3), RNN(2, 3)):
            module = module.to(dtype)
            x = torch.randn(3, 2, 2, dtype=dtype, requires_grad=True)
            output, _ = module(x)
            output.sum().backward()
        seconds[name] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastrnn.precompile", description=__doc__)
    parser.add_argument("dtypes", nargs="*", default=["float32"], choices=sorted(_DTYPES))
    args = parser.parse_args(argv)
    for name, took in precompile(tuple(args.dtypes)).items():
        print(f"fastrnn kernels for {name}: ready ({took:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
