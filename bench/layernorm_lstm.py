"""fastrnn.LayerNormLSTM against what users write today for the same math: nn.LSTMCell's
weights with three nn.LayerNorm (each side's gate pre-activations, and the cell), stepped in a
Python loop (one layer, one direction), with the same weights and inputs.

Parity first: the output, final states and the gradients of the input and every parameter of
both float32 modules against the users' module in float64; fastrnn's error may be at most 4x the
users' module's plus --rtol, or the case is reported and not timed. Then forward (no grad) and
forward+backward are timed interleaved, median of `--reps` blocks of `--calls` calls each.

    python -m bench.layernorm_lstm [--sizes "100,1,64,128;100,16,128,256"]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import statistics
import time

import torch
from torch import nn

import fastrnn


class UsersLayerNormLSTM(nn.Module):
    """The layer-norm LSTM as users write it in plain torch: x (T, B, I), hx ((B, H), (B, H))
    -> (output (T, B, H), (h, c))."""

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(input_size, hidden_size)
        self.norm_ih = nn.LayerNorm(4 * hidden_size)
        self.norm_hh = nn.LayerNorm(4 * hidden_size)
        self.norm_c = nn.LayerNorm(hidden_size)

    def forward(self, x, hx):
        h, c = hx
        cell, outputs = self.cell, []
        projected = self.norm_ih(x @ cell.weight_ih.T) + cell.bias_ih + cell.bias_hh
        for x_t in projected:
            i, f, g, o = (x_t + self.norm_hh(h @ cell.weight_hh.T)).chunk(4, 1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(self.norm_c(c))
            outputs.append(h)
        return torch.stack(outputs), (h, c)

    def copy_from(self, model: fastrnn.LayerNormLSTM) -> UsersLayerNormLSTM:
        """Take a one-layer, one-direction LayerNormLSTM's parameters."""
        pairs = {
            "cell.weight_ih": "weight_ih_l0",
            "cell.weight_hh": "weight_hh_l0",
            "cell.bias_ih": "bias_ih_l0",
            "cell.bias_hh": "bias_hh_l0",
        }
        for side in ("ih", "hh", "c"):
            for kind in ("weight", "bias"):
                pairs[f"norm_{side}.{kind}"] = f"layernorm_{side}_{kind}_l0"
        theirs = model.state_dict()
        self.load_state_dict({mine: theirs[name] for mine, name in pairs.items()})
        return self


def _parse_sizes(text: str) -> list[tuple[int, int, int, int]]:
    return [tuple(int(v) for v in part.split(",")) for part in text.split(";")]  # type: ignore[misc]


def _results(module, x, hx, grad: bool) -> list[torch.Tensor]:
    """Output, h, c and (with grad) the gradients of x and of every parameter."""
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(grad)
    out, (h, c) = module(x, hx)
    if not grad:
        return [out, h.reshape(c.shape[-2:]), c.reshape(c.shape[-2:])]
    (out.square().sum() + h.sum() + c.sum()).backward()
    params = [p.grad for p in module.parameters()]
    return [out, h.reshape(c.shape[-2:]), c.reshape(c.shape[-2:]), x.grad, *params]


def _users_order(users: UsersLayerNormLSTM, results: list[torch.Tensor]) -> list[torch.Tensor]:
    """`_results` of the users' module with its parameters' gradients in fastrnn's order (as
    `UsersLayerNormLSTM.copy_from` maps them)."""
    named = dict(zip([n for n, _ in users.named_parameters()], results[4:], strict=True))
    order = ["cell.weight_ih", "cell.weight_hh", "cell.bias_ih", "cell.bias_hh"]
    order += [f"norm_{s}.{k}" for s in ("ih", "hh", "c") for k in ("weight", "bias")]
    return results[:4] + [named[n] for n in order]


def _errors(users, fast, x, hx) -> tuple[float, float]:
    """(fastrnn's, the users' module's) largest |Δ| / max(1, |value|) against the users'
    module run in float64: over a long sequence both float32 results drift ~1e-4 from it (the
    norms' 1/σ factors amplify rounding), so each is judged against float64, not the other."""
    truth_module = UsersLayerNormLSTM(users.cell.input_size, users.cell.hidden_size)
    truth_module.load_state_dict(users.state_dict())
    truth_module.double()
    state64 = (hx[0][0].double(), hx[1][0].double())
    truth = _users_order(truth_module, _results(truth_module, x.double(), state64, True))
    got = {
        "fastrnn": _results(fast, x, hx, True),
        "users": _users_order(users, _results(users, x, (hx[0][0], hx[1][0]), True)),
    }
    worst = {}
    for name, results in got.items():
        worst[name] = 0.0
        for a, e in zip(results, truth, strict=True):
            scale = max(1.0, e.abs().max().item())
            error = (a.detach().double() - e.detach()).abs().max().item() / scale
            worst[name] = max(worst[name], error)
    return worst["fastrnn"], worst["users"]


def _time(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def _forward(module, x, hx) -> None:
    with torch.no_grad():
        module(x, hx)


def _forward_backward(module, x, hx) -> None:
    out, (h, c) = module(x, hx)
    (out.sum() + c.sum()).backward()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.layernorm_lstm", description=__doc__)
    parser.add_argument("--sizes", default="100,1,64,128;100,16,128,256", help="T,B,I,H;...")
    parser.add_argument("--calls", type=int, default=5, help="calls per timed block (5)")
    parser.add_argument("--reps", type=int, default=5, help="timed blocks per variant (5)")
    parser.add_argument("--rtol", type=float, default=1e-5, help="parity slack (1e-5)")
    args = parser.parse_args(argv)
    print(
        f"# python -m bench.layernorm_lstm, {datetime.date.today().isoformat()}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, float32, CPU\n"
        "# ms per call, median of interleaved blocks; speed-up = plain torch / fastrnn; "
        "err: max |d| / max(1, |value|) against float64\n"
        f"{'T':>4s} {'B':>4s} {'I':>5s} {'H':>5s} {'torch fwd':>10s} {'fastrnn fwd':>12s} "
        f"{'x':>6s} {'torch f+b':>10s} {'fastrnn f+b':>12s} {'x':>6s} {'err fast':>9s} "
        f"{'err torch':>9s}",
        flush=True,
    )
    status = 0
    for steps, batch, inputs, hidden in _parse_sizes(args.sizes):
        torch.manual_seed(0)
        fast = fastrnn.LayerNormLSTM(inputs, hidden)
        with torch.no_grad():  # gains and biases off their initial 1 and 0
            for name, p in fast.named_parameters():
                if name.startswith("layernorm_"):
                    p.add_(0.1 * torch.randn_like(p))
        users = UsersLayerNormLSTM(inputs, hidden).copy_from(fast)
        x = torch.randn(steps, batch, inputs)
        hx = tuple(0.5 * torch.randn(1, batch, hidden) for _ in "hc")
        error, users_error = _errors(users, fast, x, hx)
        head = f"{steps:4d} {batch:4d} {inputs:5d} {hidden:5d}"
        if not error <= 4 * users_error + args.rtol:
            print(
                f"{head} parity FAILED: fastrnn's error {error:.1e} against float64, plain "
                f"torch's {users_error:.1e}"
            )
            status = 1
            continue
        medians = []
        for run in (_forward, _forward_backward):
            calls = {
                "torch": functools.partial(run, users, x, (hx[0][0], hx[1][0])),
                "fastrnn": functools.partial(run, fast, x, hx),
            }
            times: dict[str, list[float]] = {name: [] for name in calls}
            for call in calls.values():
                _time(call, 1)  # warm-up (and the kernels' first compile)
            for _ in range(args.reps):
                for name, call in calls.items():
                    times[name].append(_time(call, args.calls))
            medians.append([statistics.median(times[name]) * 1e3 for name in calls])
        (tf, ff), (tb, fb) = medians
        print(
            f"{head} {tf:10.2f} {ff:12.2f} {tf / ff:5.2f}x {tb:10.2f} {fb:12.2f} "
            f"{tb / fb:5.2f}x {error:9.1e} {users_error:9.1e}",
            flush=True,
        )
    return status


if __name__ == "__main__":
    raise SystemExit(main())
