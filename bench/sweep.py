"""``python -m bench.sweep``: a random parity sweep of fastrnn's modules against torch.nn.

Draws module configurations at random (cell, sizes, layers, directions, batch_first, bias, RNN
nonlinearity, LSTM proj_size, packed input sorted or not, hx given or not, float32 / float64),
runs forward + backward through torch.nn and through fastrnn with the same weights and inputs,
and compares the output, the final states and the gradients of the input, the initial states
and every parameter: max |fastrnn - torch| <= rtol * max(1, max |torch|) per tensor (rtol 1e-5
float32, 1e-10 float64, as the test suite). Each configuration also runs fastrnn again with one
kernel thread, and its results must be bitwise the same (torch's own thread count unchanged).

A float32 difference above the tolerance is rerun in float64 on both sides. When the two agree
there to 1e-10, the same algorithm is being computed and the float32 gap comes from the
problem's sensitivity to rounding (a ReLU pre-activation within rounding of 0, which decides a
gradient's kink; or a long sum cancelling to a small value): the sweep reports such a case as
"sensitive", with the float64 errors of both sides, and does not count it as a failure.

Exit status: 0 when nothing failed, 1 when a configuration failed or raised, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
import traceback
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numba
import torch
from torch.nn.utils.rnn import pack_padded_sequence

from bench.cases import CLASS_NAMES, build_modules, fastrnn_classes, torch_classes
from bench.parity import compare

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}


@dataclass
class SweepConfig:
    """One randomly drawn module configuration."""

    cell: str
    T: int
    B: int
    I: int  # the input size (the math's own name)
    H: int
    layers: int
    bidirectional: bool
    batch_first: bool
    bias: bool
    nonlinearity: str  # RNN only
    proj_size: int  # LSTM only
    lengths: list[int] | None  # packed input when given
    enforce_sorted: bool
    hx: bool
    dtype: str
    seed: int
    device: str = "cpu"

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def module_kwargs(self) -> dict:
        kw = dict(
            input_size=self.I,
            hidden_size=self.H,
            num_layers=self.layers,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
            bias=self.bias,
        )
        if self.cell == "rnn":
            kw["nonlinearity"] = self.nonlinearity
        if self.proj_size:
            kw["proj_size"] = self.proj_size
        return kw

    def label(self) -> str:
        parts = [f"{self.cell} T{self.T} B{self.B} I{self.I} H{self.H} L{self.layers}"]
        parts += [name for name, on in self._flags() if on]
        if self.cell == "rnn":
            parts.append(self.nonlinearity)
        if self.proj_size:
            parts.append(f"proj{self.proj_size}")
        if self.lengths is not None:
            parts.append("packed sorted" if self.enforce_sorted else "packed unsorted")
        return " ".join(parts + [self.dtype, f"seed {self.seed}"])

    def _flags(self):
        return (
            ("bi", self.bidirectional),
            ("batch_first", self.batch_first),
            ("no-bias", not self.bias),
            ("hx", self.hx),
        )


def draw_config(rng: random.Random, cells: list[str], dtypes: list[str]) -> SweepConfig:
    """A random configuration; batch sizes around the kernels' row-chunk and tile boundaries
    (4-, 8- and 16-row multiples), hidden sizes around the 16-unit panels."""
    cell = rng.choice(cells)
    T = rng.choice([1, 2, 3, 7, 13, 25])
    B = rng.choice([1, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 20, 24, 31, 33, 40])
    H = rng.choice([1, 5, 16, 17, 32, 48, 64, 128, 130])
    packed = rng.random() < 0.5
    lengths = [rng.randint(1, T) for _ in range(B)] if packed else None
    enforce_sorted = packed and rng.random() < 0.3
    if enforce_sorted:
        lengths.sort(reverse=True)
    return SweepConfig(
        cell=cell,
        T=T,
        B=B,
        I=rng.choice([1, 3, 16, 33, 64]),
        H=H,
        layers=rng.choice([1, 1, 2]),
        bidirectional=rng.random() < 0.4,
        batch_first=rng.random() < 0.3,
        bias=rng.random() < 0.85,
        nonlinearity=rng.choice(["tanh", "relu"]),
        proj_size=rng.randint(1, H - 1) if cell == "lstm" and H > 1 and rng.random() < 0.25 else 0,
        lengths=lengths,
        enforce_sorted=enforce_sorted,
        hx=rng.random() < 0.5,
        dtype=rng.choice(dtypes),
        seed=rng.randint(0, 2**30),
    )


def _inputs(cfg: SweepConfig, dtype: torch.dtype):
    """(x, hx) as float64 draws cast to `dtype`, the same values whatever the dtype."""
    gen = torch.Generator().manual_seed(cfg.seed)
    shape = (cfg.B, cfg.T, cfg.I) if cfg.batch_first else (cfg.T, cfg.B, cfg.I)
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if not cfg.hx:
        return x, None
    states = cfg.layers * (2 if cfg.bidirectional else 1)
    h0 = torch.randn(states, cfg.B, cfg.proj_size or cfg.H, generator=gen, dtype=torch.float64)
    if cfg.cell != "lstm":
        return x, h0.to(dtype)
    c0 = torch.randn(states, cfg.B, cfg.H, generator=gen, dtype=torch.float64)
    return x, (h0.to(dtype), c0.to(dtype))


def run(module: torch.nn.Module, cfg: SweepConfig, dtype: torch.dtype) -> dict:
    """Forward + backward of sum_k <out_k, w_k> (random w_k): the output, the final states and
    the gradients of the input, the initial states and every parameter, by name."""
    x, hx = _inputs(cfg, dtype)
    x.requires_grad_(True)
    leaves = [] if hx is None else list(hx if isinstance(hx, tuple) else (hx,))
    for t in leaves:
        t.requires_grad_(True)
    inp = x
    if cfg.lengths is not None:
        lengths = torch.tensor(cfg.lengths, dtype=torch.int64)
        inp = pack_padded_sequence(
            x, lengths, batch_first=cfg.batch_first, enforce_sorted=cfg.enforce_sorted
        )
    module.zero_grad(set_to_none=True)
    out, states = module(inp) if hx is None else module(inp, hx)
    results = {"output": out.data if cfg.lengths is not None else out}
    if isinstance(states, tuple):
        results["h_n"], results["c_n"] = states
    else:
        results["h_n"] = states
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    loss = sum(
        (t * torch.randn(t.shape, generator=gen, dtype=torch.float64).to(dtype)).sum()
        for t in results.values()
    )
    loss.backward()
    results = {k: v.detach() for k, v in results.items()}
    results["grad_input"] = x.grad
    for name, t in zip(("grad_h0", "grad_c0"), leaves, strict=False):
        results[name] = t.grad
    for name, p in module.named_parameters():
        results[f"grad_{name}"] = p.grad
    return results


def _differences(got: dict, ref: dict, rtol: float) -> dict:
    return {k: compare(ref[k], got.get(k), rtol) for k in ref}


def check(cfg: SweepConfig, ref_cls, fast_cls, threads: int) -> dict:
    """The verdict on one configuration: 'ok', 'sensitive' or 'fail', with the details."""
    dtype = cfg.torch_dtype
    rtol = TOLERANCE[dtype]
    ref, fast = build_modules(cfg, ref_cls, fast_cls)
    expected = run(ref, cfg, dtype)
    got = run(fast, cfg, dtype)
    diffs = _differences(got, expected, rtol)
    worst = max(
        (d.max_abs_diff / max(1.0, d.ref_max_abs) for d in diffs.values() if d.ok),
        default=0.0,
    )
    verdict = {"worst_relative": worst}
    unequal = []
    if threads > 1:  # with one kernel thread already, the rerun would repeat the same call
        numba.set_num_threads(1)
        try:
            alone = run(fast, cfg, dtype)
        finally:
            numba.set_num_threads(threads)
        unequal = [k for k, v in got.items() if v is not None and not torch.equal(v, alone[k])]
    if unequal:
        return {**verdict, "verdict": "fail", "why": f"1 kernel thread changed {unequal}"}
    failed = {k: d for k, d in diffs.items() if not d.ok}
    if not failed:
        return {**verdict, "verdict": "ok"}
    why = ", ".join(
        f"{k} {d.max_abs_diff:.2e} > {d.tol:.1e} {d.note}".strip() for k, d in failed.items()
    )
    if dtype != torch.float32:
        return {**verdict, "verdict": "fail", "why": why}
    # float64 on both sides: the same algorithm agrees there, whatever float32 rounding did.
    ref64, fast64 = build_modules(replace(cfg, dtype="float64"), ref_cls, fast_cls)
    truth = run(ref64, cfg, torch.float64)
    agree = _differences(run(fast64, cfg, torch.float64), truth, TOLERANCE[torch.float64])
    if not all(d.ok for d in agree.values()):
        return {**verdict, "verdict": "fail", "why": why + "; float64 differs too"}
    errors = {
        k: (
            compare(truth[k], got[k], 1.0).max_abs_diff,
            compare(truth[k], expected[k], 1.0).max_abs_diff,
        )
        for k in failed
    }
    detail = ", ".join(f"{k}: fastrnn {f:.1e}, torch {t:.1e}" for k, (f, t) in errors.items())
    return {**verdict, "verdict": "sensitive", "why": f"{why}; float32 error vs float64: {detail}"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.sweep",
        description="Random parity sweep of fastrnn.LSTM / GRU / RNN against torch.nn (outputs, "
        "states, every gradient; bitwise across kernel thread counts).",
        epilog="Exit status: 0 nothing failed, 1 a configuration failed or raised.",
    )
    p.add_argument("--seconds", type=float, default=60.0, help="time budget (60)")
    p.add_argument("--max-cases", type=int, default=0, help="stop after this many (0: no limit)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the draws (0)")
    p.add_argument("--cells", default="lstm,gru,rnn", help="subset of lstm,gru,rnn")
    p.add_argument("--dtypes", default="float32,float32,float32,float64", help="drawn from")
    p.add_argument("--json", type=Path, help="write every configuration and verdict here")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cells = [c.strip() for c in args.cells.split(",") if c.strip()]
    if not cells or any(c not in CLASS_NAMES for c in cells):
        print(f"--cells: choose from {', '.join(CLASS_NAMES)}", file=sys.stderr)
        return 2
    dtypes = [d.strip() for d in args.dtypes.split(",")]
    if any(d not in ("float32", "float64") for d in dtypes):
        print("--dtypes: float32 and/or float64", file=sys.stderr)
        return 2
    ref_classes = torch_classes()
    fast_classes, version = fastrnn_classes()
    threads = numba.get_num_threads()
    rng = random.Random(args.seed)
    records = []
    counts = {"ok": 0, "sensitive": 0, "fail": 0}
    worst = 0.0
    start = time.perf_counter()
    print(f"fastrnn {version} against torch {torch.__version__}, {threads} kernel threads")
    warnings.simplefilter("ignore")  # torch's "not supported with oneDNN" notes, per call
    while time.perf_counter() - start < args.seconds:
        if args.max_cases and len(records) >= args.max_cases:
            break
        cfg = draw_config(rng, cells, dtypes)
        try:
            result = check(cfg, ref_classes[cfg.cell], fast_classes[cfg.cell], threads)
        except Exception:  # noqa: BLE001 - anything raised is a failure to report
            result = {"verdict": "fail", "why": traceback.format_exc(limit=3)}
        counts[result["verdict"]] += 1
        if cfg.dtype == "float32" and result["verdict"] == "ok":
            worst = max(worst, result["worst_relative"])
        if result["verdict"] != "ok":
            print(f"{result['verdict'].upper()}: {cfg.label()}\n    {result['why']}", flush=True)
        records.append({"config": asdict(cfg), **result})
    elapsed = time.perf_counter() - start
    print(
        f"{len(records)} configurations in {elapsed:.0f} s: {counts['ok']} ok, "
        f"{counts['sensitive']} sensitive to float32 rounding, {counts['fail']} failed; "
        f"worst float32 relative difference of the rest {worst:.1e}"
    )
    if args.json:
        args.json.write_text(json.dumps({"counts": counts, "cases": records}, indent=1))
    return 1 if counts["fail"] else 0


if __name__ == "__main__":
    sys.exit(main())
