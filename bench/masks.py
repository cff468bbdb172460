"""Recurrent dropout and zoneout: fastrnn's modules against what a user writes today, a
torch.nn.LSTMCell / RNNCell stepped in Python that applies the same masks (for the GRU, its
step written out with GRUCell's weights: GRUCell can't read a masked h in W_hh alone).

Both sides get the same weights and, under one seed, the same masks (drawn as fastrnn draws
them, `fastrnn.recurrent_masks.layer_masks`, inside the timed call on both sides). Parity of
the output, the final states and every gradient is checked first; then forward (no grad) and
forward+backward are timed interleaved, median of `--reps` blocks of `--calls` calls each.

    python -m bench.masks [--sizes "50,16,64,128;100,1,64,128"] [--cells lstm,gru,rnn]
                          [--recurrent-dropout 0.25] [--zoneout 0.1]
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
from bench.report import cpu_microarchitecture
from fastrnn.recurrent_masks import layer_masks

RESULTS = Path(__file__).resolve().parent / "results"
# float32, against the largest |value| of order 1-100 the gradients reach at these sizes
PARITY_TOLERANCE = 1e-4
CLASSES = {"lstm": ("LSTM", "LSTMCell"), "gru": ("GRU", "GRUCell"), "rnn": ("RNN", "RNNCell")}


def _parse_sizes(text: str) -> list[tuple[int, int, int, int]]:
    return [tuple(int(v) for v in part.split(",")) for part in text.split(";")]  # type: ignore[misc]


class CellLoop(torch.nn.Module):
    """One layer as a torch cell stepped in Python with recurrent dropout (h * mask into the
    cell, the mask fixed for the sequence) and zoneout (d * old + (1 - d) * new per step)."""

    def __init__(self, kind: str, cell: torch.nn.Module, rates: tuple[float, float, float]):
        super().__init__()
        self.kind, self.cell, self.rates = kind, cell, rates

    def _gru_step(self, x: torch.Tensor, h: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
        """A GRU step whose W_hh reads `read` (the masked h) while z * h keeps h: GRUCell
        can't be told apart the two, so the step is written out with its weights."""
        cell = self.cell
        x_r, x_z, x_n = torch.addmm(cell.bias_ih, x, cell.weight_ih.t()).chunk(3, 1)
        h_r, h_z, h_n = torch.addmm(cell.bias_hh, read, cell.weight_hh.t()).chunk(3, 1)
        r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
        n = torch.tanh(x_n + r * h_n)
        return (1 - z) * n + z * h

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        steps, batch = x.shape[:2]
        hidden = self.cell.hidden_size
        h_mask, zone_h, zone_c = layer_masks(
            self.kind, steps * batch, batch, 1, hidden, hidden, self.rates, self.training, x
        )
        h = x.new_zeros(batch, hidden)
        c = x.new_zeros(batch, hidden)
        zone_h = None if zone_h is None else zone_h[0].view(steps, batch, hidden)
        zone_c = None if zone_c is None else zone_c[0].view(steps, batch, hidden)
        outputs = []
        for t in range(steps):
            read = h if h_mask is None else h * h_mask[0]
            if self.kind == "lstm":
                h_new, c_new = self.cell(x[t], (read, c))
                c = c_new if zone_c is None else zone_c[t] * c + (1 - zone_c[t]) * c_new
            elif self.kind == "gru":
                h_new = self._gru_step(x[t], h, read)
            else:
                h_new = self.cell(x[t], read)
            h = h_new if zone_h is None else zone_h[t] * h + (1 - zone_h[t]) * h_new
            outputs.append(h)
        states = (h, c) if self.kind == "lstm" else (h,)
        return (torch.stack(outputs), *states)


def _fastrnn_outputs(module, x) -> tuple[torch.Tensor, ...]:
    y, state = module(x)
    states = state if isinstance(state, tuple) else (state,)
    return (y, *(s[0] for s in states))


def _build(kind: str, size, rates, zoneout):
    """(the cell loop, fastrnn's module) with the same weights."""
    _, inputs, hidden = size[1:]
    module_name, cell_name = CLASSES[kind]
    torch.manual_seed(0)
    fast = getattr(fastrnn, module_name)(
        inputs, hidden, recurrent_dropout=rates[0], zoneout=zoneout
    )
    cell = getattr(torch.nn, cell_name)(inputs, hidden)
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(cell, name).data.copy_(getattr(fast, f"{name}_l0"))
    return CellLoop(kind, cell, rates), fast


def _runs(loop, fast):
    return (("loop", lambda x: loop(x)), ("fastrnn", lambda x: _fastrnn_outputs(fast, x)))


def _max_difference(loop, fast, x) -> float:
    """Largest |Δ| over the output, the final states and the gradients of x and the weights,
    the same seed (so the same masks) before each side."""
    results = []
    for name, run in _runs(loop, fast):
        module = loop.cell if name == "loop" else fast
        module.zero_grad(set_to_none=True)
        leaf = x.clone().requires_grad_()
        torch.manual_seed(1)
        outs = run(leaf)
        sum((o * o).sum() for o in outs).backward()
        results.append([*outs, leaf.grad, *(p.grad for p in module.parameters())])
    pairs = zip(*results, strict=True)
    return max((a.detach() - b.detach()).abs().max().item() for a, b in pairs)


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _forward(run, x) -> None:
    with torch.no_grad():
        run(x)


def _forward_backward(run, x) -> None:
    sum(o.sum() for o in run(x)).backward()


def _medians(loop, fast, x, args) -> list[list[float]]:
    """[[loop, fastrnn] forward, [loop, fastrnn] forward+backward], ms per call."""
    leaf = x.clone().requires_grad_()
    medians = []
    for timed, data in ((_forward, x), (_forward_backward, leaf)):
        calls = {name: functools.partial(timed, run, data) for name, run in _runs(loop, fast)}
        times: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            _time(call, 2)  # warm-up (and the kernels' first compile)
        for _ in range(args.reps):
            for name, call in calls.items():
                times[name].append(_time(call, args.calls))
        medians.append([statistics.median(times[name]) * 1e3 for name in calls])
    return medians


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.masks", description=__doc__)
    parser.add_argument("--sizes", default="50,16,64,128;100,1,64,128", help="T,B,I,H;...")
    parser.add_argument("--cells", default="lstm,gru,rnn", help="of lstm,gru,rnn")
    parser.add_argument("--recurrent-dropout", type=float, default=0.25, help="p (0.25)")
    parser.add_argument("--zoneout", type=float, default=0.1, help="h and c rate (0.1)")
    parser.add_argument("--calls", type=int, default=5, help="calls per timed block (5)")
    parser.add_argument("--reps", type=int, default=5, help="timed blocks per side (5)")
    parser.add_argument(
        "--save", action="store_true", help="write bench/results/<cpu>-masks.txt (replaced)"
    )
    args = parser.parse_args(argv)
    rates = (args.recurrent_dropout, args.zoneout, args.zoneout)

    lines = [
        f"# python -m bench.masks, {datetime.date.today().isoformat()}, {cpu_microarchitecture()}, "
        f"torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, recurrent_dropout {rates[0]}, zoneout {rates[1]}",
        "# ms per call (training mode), median of interleaved blocks; speed-up = loop / fastrnn",
        f"{'cell':5s} {'T':>4s} {'B':>4s} {'I':>4s} {'H':>5s} {'loop fwd':>9s} {'fast fwd':>9s} "
        f"{'x':>6s} {'loop f+b':>9s} {'fast f+b':>9s} {'x':>6s} {'max|d|':>8s}",
    ]
    print("\n".join(lines), flush=True)
    status = 0
    for kind in [c.strip() for c in args.cells.split(",") if c.strip()]:
        for size in _parse_sizes(args.sizes):
            loop, fast = _build(kind, size, rates, args.zoneout)
            x = torch.randn(size[0], size[1], size[2], generator=torch.Generator().manual_seed(2))
            worst = _max_difference(loop, fast, x)
            if not worst <= PARITY_TOLERANCE:  # no timing for a case that computes otherwise
                line = f"{kind:5s} {size}: parity failed, max|d| {worst:.1e}"
                lines.append(line)
                print(line, flush=True)
                status = 1
                continue
            (lf, ff), (lb, fb) = _medians(loop, fast, x, args)
            line = (
                f"{kind:5s} {size[0]:4d} {size[1]:4d} {size[2]:4d} {size[3]:5d} {lf:9.2f} "
                f"{ff:9.2f} {lf / ff:5.2f}x {lb:9.2f} {fb:9.2f} {lb / fb:5.2f}x {worst:8.1e}"
            )
            lines.append(line)
            print(line, flush=True)
    if args.save:
        # one current file per CPU kind: "AMD EPYC, Zen 5" -> zen5
        kind = (cpu_microarchitecture() or "cpu").split(",")[-1].strip().lower().replace(" ", "")
        path = RESULTS / f"{kind}-masks.txt"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
