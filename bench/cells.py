"""One step of LSTMCell / GRUCell / RNNCell: torch.nn vs fastrnn, same weights and inputs.

Cells are called once per time step from Python (decoders, time-series loops), so per-call cost
matters as much as the math. Parity (h', c' and every gradient) is checked first, then forward
(no grad) and forward+backward are timed interleaved, median of `--reps` blocks of `--calls`
calls each.

    python -m bench.cells [--sizes "97,1,51;64,128,256;1,64,128"] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import time
from pathlib import Path

import torch

import fastrnn

CELLS = ("LSTMCell", "GRUCell", "RNNCell")
RESULTS = Path(__file__).resolve().parent / "results"


def _parse_sizes(text: str) -> list[tuple[int, int, int]]:
    sizes = []
    for part in text.split(";"):
        batch, inputs, hidden = (int(v) for v in part.split(","))
        sizes.append((batch, inputs, hidden))
    return sizes


def _outputs(result) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def _max_difference(ref, fast, x, hx) -> float:
    """Largest |Δ| over h' (c') and the gradients of x, hx and every parameter."""
    worst = 0.0
    grads = []
    for module in (ref, fast):
        module.zero_grad(set_to_none=True)
        x_leaf = x.clone().requires_grad_()
        hx_leaf = tuple(h.clone().requires_grad_() for h in hx)
        outs = _outputs(module(x_leaf, hx_leaf if len(hx_leaf) == 2 else hx_leaf[0]))
        sum(o.pow(2).sum() for o in outs).backward()
        grads.append(
            [*outs, x_leaf.grad, *(h.grad for h in hx_leaf), *(p.grad for p in module.parameters())]
        )
    for a, b in zip(*grads, strict=True):
        worst = max(worst, (a.detach() - b.detach()).abs().max().item())
    return worst


def _time(fn, calls: int, device: str) -> float:
    """Seconds per call over a block of `calls` calls."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls


def _forward(module, x, state) -> None:
    with torch.no_grad():
        module(x, state)


def _forward_backward(module, x, state) -> None:
    sum(o.sum() for o in _outputs(module(x, state))).backward()


def _medians(ref, fast, x, state, args) -> list[list[float]]:
    """[[torch, fastrnn] forward, [torch, fastrnn] forward+backward], us per call."""
    medians = []
    for run in (_forward, _forward_backward):
        calls = {name: functools.partial(run, module, x, state) for name, module in
                 (("torch", ref), ("fastrnn", fast))}  # fmt: skip
        times: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            _time(call, 10, args.device)  # warm-up
        for _ in range(args.reps):
            for name, call in calls.items():
                times[name].append(_time(call, args.calls, args.device))
        medians.append([statistics.median(times[name]) * 1e6 for name in calls])
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.cells", description=__doc__)
    parser.add_argument("--sizes", default="97,1,51;64,128,256;1,64,128", help="B,I,H;...")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--calls", type=int, default=200, help="calls per timed block (200)")
    parser.add_argument("--reps", type=int, default=7, help="timed blocks per variant (7)")
    parser.add_argument(
        "--save", action="store_true", help="write bench/results/<dev>-<date>-cells.txt"
    )
    args = parser.parse_args(argv)

    lines = [
        f"# python -m bench.cells, {datetime.date.today().isoformat()}, device {args.device}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}",
        "# us per call, median of interleaved blocks; speed-up = torch / fastrnn",
        f"{'cell':9s} {'B':>4s} {'I':>4s} {'H':>5s} {'torch fwd':>10s} {'fastrnn fwd':>12s} "
        f"{'x':>6s} {'torch f+b':>10s} {'fastrnn f+b':>12s} {'x':>6s} {'max|d|':>8s}",
    ]
    print("\n".join(lines), flush=True)
    for cls in CELLS:
        for batch, inputs, hidden in _parse_sizes(args.sizes):
            torch.manual_seed(0)
            ref = getattr(torch.nn, cls)(inputs, hidden).to(args.device)
            fast = getattr(fastrnn, cls)(inputs, hidden).to(args.device)
            fast.load_state_dict(ref.state_dict())
            x = torch.randn(batch, inputs, device=args.device)
            states = 2 if cls == "LSTMCell" else 1
            hx = tuple(torch.randn(batch, hidden, device=args.device) for _ in range(states))
            worst = _max_difference(ref, fast, x, hx)
            state_arg = hx if states == 2 else hx[0]

            (tf, ff), (tb, fb) = _medians(ref, fast, x, state_arg, args)
            line = (
                f"{cls:9s} {batch:4d} {inputs:4d} {hidden:5d} {tf:10.1f} {ff:12.1f} "
                f"{tf / ff:5.2f}x {tb:10.1f} {fb:12.1f} {tb / fb:5.2f}x {worst:8.1e}"
            )
            lines.append(line)
            print(line, flush=True)
    if args.save:
        path = RESULTS / f"{args.device}-{datetime.date.today().isoformat()}-cells.txt"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
