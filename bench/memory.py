"""Peak memory of one forward+backward, torch.nn vs fastrnn, each in a fresh process.

Each measurement runs in its own interpreter: build the module and input, warm up at a tiny size
(which also loads fastrnn's compiled kernels), read the resident-set high-water mark, run one
forward+backward at the real size, and read it again. The difference is the peak extra memory
that forward+backward needed (activations, caches, gradients), as the OS saw it.

    python -m bench.memory [--cells lstm,gru,rnn] [--sizes small|standard|T,B,I,H;...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.cases import parse_cells, parse_sizes

_CHILD = r"""
import json, resource, sys, torch
impl, cell, T, B, I, H = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
if impl == "fastrnn":
    import fastrnn as lib
else:
    lib = torch.nn
cls = {"lstm": lib.LSTM, "gru": lib.GRU, "rnn": lib.RNN}[cell]
torch.manual_seed(0)
small = cls(I, 8)
y, _ = small(torch.randn(3, 2, I, requires_grad=True))
y.sum().backward()
module = cls(I, H)
x = torch.randn(T, B, I, requires_grad=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, _ = module(x)
out.sum().backward()
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"peak_mib": (after - before) / 1024}))
"""


def measure(impl: str, cell: str, size) -> float:
    args = [str(v) for v in (size.T, size.B, size.I, size.H)]
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, impl, cell, *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])["peak_mib"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    parser.add_argument("--cells", default="lstm,gru,rnn")
    parser.add_argument("--sizes", default="standard")
    args = parser.parse_args(argv)
    print("cell    T   B    I     H  torch MiB  fastrnn MiB  fastrnn/torch")
    for cell in parse_cells(args.cells):
        for size in parse_sizes(args.sizes):
            torch_mib = measure("torch", cell, size)
            fast_mib = measure("fastrnn", cell, size)
            ratio = fast_mib / torch_mib if torch_mib > 0 else float("nan")
            print(
                f"{cell:4} {size.T:4} {size.B:3} {size.I:4} {size.H:5} {torch_mib:10.1f} "
                f"{fast_mib:12.1f} {ratio:14.2f}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
