"""What every `python -m bench.task` workload shares: building torch.nn and fastrnn models from
one seed, training both in lockstep on the same batches, timing each step, checking that the
losses agree step by step, and reporting (console, JSON, PNG plot of both loss curves).

Agreement is checked where it is exact. The two trainings start from the same weights and see
the same batches and dropout masks, so their losses are bit-identical or within float rounding
for the first steps; but each optimizer step amplifies the last one's rounding differences, and
after tens to hundreds of steps (fewer on long, chaotic sequences) the curves drift apart as two
runs of one float program with different summation orders do. So at every `--check-every`-th step
a third model, fastrnn's, is loaded with torch.nn's current weights and computes the loss of the
same batch with the same dropout masks: that loss must equal torch.nn's to `--tol` (relative),
step after step, whatever the drift. The free-running difference is reported beside it."""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastrnn

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "results" / "task"
NAMES = ("torch.nn", "fastrnn")


@dataclass
class Side:
    """One of the two models being trained: torch.nn's or fastrnn's, with its optimizer, the
    state a task carries from step to step (the language model's hidden state), and what each
    step gave (loss, seconds)."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    state: Any = None
    losses: list[float] = field(default_factory=list)
    seconds: list[float] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)


def build_pair(build: Callable[[], nn.Module], seed: int) -> tuple[nn.Module, nn.Module]:
    """`build()` twice from `torch.manual_seed(seed)`; the second copy goes through
    `fastrnn.convert`. Asserts the two start from identical parameters."""
    torch.manual_seed(seed)
    reference = build()
    torch.manual_seed(seed)
    fast = fastrnn.convert(build())
    for (name, a), (_, b) in zip(
        reference.named_parameters(), fast.named_parameters(), strict=True
    ):
        if not torch.equal(a, b):
            raise AssertionError(f"{name} differs between the torch.nn and fastrnn models")
    return reference, fast


def make_sides(build: Callable[[], nn.Module], seed: int, lr: float) -> list[Side]:
    """torch.nn's and fastrnn's model (`build_pair`), each with its own Adam optimizer."""
    models = build_pair(build, seed)
    return [
        Side(name, model, torch.optim.Adam(model.parameters(), lr=lr))
        for name, model in zip(NAMES, models, strict=True)
    ]


def add_common_arguments(parser: argparse.ArgumentParser, steps: int, batch: int) -> None:
    """The flags every task takes (defaults: a run well under a minute on 2 cores)."""
    group = parser.add_argument_group("training and reporting")
    group.add_argument("--steps", type=int, default=steps, help=f"training steps ({steps})")
    group.add_argument("--batch", type=int, default=batch, help=f"batch size ({batch})")
    group.add_argument("--seed", type=int, default=0, help="seed of weights, data, dropout (0)")
    group.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate (3e-3)")
    group.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip (1.0)")
    group.add_argument(
        "--tol",
        type=float,
        default=1e-5,
        help="largest relative difference of the two losses on the same weights (1e-5)",
    )
    group.add_argument(
        "--check-every",
        type=int,
        default=5,
        help="compare the losses on the same weights every N steps (5; 0: never)",
    )
    group.add_argument(
        "--warmup", type=int, default=3, help="first steps left out of the timings (3)"
    )
    group.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"folder for JSON and PNG ({DEFAULT_OUT})"
    )
    group.add_argument("--no-plot", action="store_true", help="skip the PNG plot")
    group.add_argument("--no-progress", action="store_true", help="no progress bar")


def step_seed(seed: int, step: int) -> int:
    """The RNG seed set before each step of either model: the same dropout masks (and sampling)
    for both, and the same again in a run resumed from a checkpoint."""
    return seed * 1_000_003 + step


def detach(state: Any) -> Any:
    """A recurrent state (None, a tensor, or a tuple of them) cut from the graph."""
    if isinstance(state, tuple):
        return tuple(detach(s) for s in state)
    return state.detach() if isinstance(state, torch.Tensor) else state


# loss_fn(model, state, batch) -> (loss, new state): one forward of a task's model in training mode
LossFn = Callable[[nn.Module, Any, Any], tuple[torch.Tensor, Any]]


def _train_step(side: Side, loss_fn: LossFn, batch: Any, clip: float) -> float:
    loss, state = loss_fn(side.model, side.state, batch)
    side.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(side.model.parameters(), clip)
    side.optimizer.step()
    side.state = detach(state)  # truncated BPTT where a task carries its state
    return loss.item()


@dataclass
class Checks:
    """Losses on the same weights: at each checked step, torch.nn's training loss and the loss
    fastrnn's model computes from torch.nn's weights, state, batch and dropout masks."""

    steps: list[int] = field(default_factory=list)
    torch_losses: list[float] = field(default_factory=list)
    fastrnn_losses: list[float] = field(default_factory=list)


def train(
    sides: list[Side],
    steps: Iterable[int],
    batch_fn: Callable[[int], Any],
    loss_fn: LossFn,
    args: argparse.Namespace,
    description: str = "",
) -> Checks:
    """For each step, build its batch once (`batch_fn(step)`, untimed), then train both sides
    on it (forward `loss_fn`, backward, gradient-norm clipping at `args.clip`, optimizer step),
    in alternating order so that neither always runs first, recording each loss and duration.
    Every `args.check_every` steps, fastrnn's model also computes the loss from torch.nn's
    weights (untimed; see the module docstring). Returns those checks."""
    steps = list(steps)
    reference = sides[0]
    probe = copy.deepcopy(sides[1].model)
    checks = Checks()
    bar = None
    if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=len(steps), desc=description, unit="step", leave=False)
    for i, step in enumerate(steps):
        batch = batch_fn(step)
        if args.check_every > 0 and i % args.check_every == 0:
            probe.load_state_dict(reference.model.state_dict())
            torch.manual_seed(step_seed(args.seed, step))
            with torch.no_grad():
                loss, _ = loss_fn(probe, reference.state, batch)
            checks.steps.append(step)
            checks.fastrnn_losses.append(loss.item())
        order = sides if step % 2 == 0 else sides[::-1]
        for side in order:
            torch.manual_seed(step_seed(args.seed, step))
            start = time.perf_counter()
            loss = _train_step(side, loss_fn, batch, args.clip)
            side.seconds.append(time.perf_counter() - start)
            side.losses.append(loss)
        if checks.steps and checks.steps[-1] == step:
            checks.torch_losses.append(reference.losses[-1])
        if bar is not None:
            bar.update(1)
            bar.set_postfix({side.name: f"{side.losses[-1]:.4f}" for side in sides})
    if bar is not None:
        bar.close()
    return checks


def _relative(a: float, b: float) -> float:
    r = abs(a - b) / max(1.0, abs(a))
    return math.inf if math.isnan(r) else r


@dataclass
class Agreement:
    """`checked` steps where the two losses on the same weights (`Checks`) differ by at most
    `worst` relative (`|a - b| / max(1, |a|)`; they agree when that is within `tol`), and how
    the free-running trainings compare: bit-identical losses for the first `identical_steps`
    steps, then at most `drift` apart (at `drift_step`)."""

    agree: bool
    checked: int
    worst: float
    worst_step: int | None
    tol: float
    identical_steps: int
    drift: float
    drift_step: int

    def text(self) -> str:
        if self.checked == 0:
            head = "losses not checked on the same weights (--check-every 0)"
        else:
            verdict = "agree" if self.agree else "DIFFER"
            relation = "<=" if self.agree else ">"
            head = (
                f"losses {verdict}: on torch.nn's weights, fastrnn's loss is within "
                f"{self.worst:.1e} {relation} {self.tol:.0e} (relative) of torch.nn's at all "
                f"{self.checked} checked steps"
            )
        if self.drift == 0:
            return f"{head}\nfree-running, the two trainings' losses were bit-identical throughout"
        return (
            f"{head}\nfree-running, the two trainings' losses were bit-identical for "
            f"{self.identical_steps} steps, then drift apart as training amplifies rounding "
            f"differences: {self.drift:.1e} relative at most (step {self.drift_step})"
        )


def agreement(sides: list[Side], checks: Checks, tol: float, first_step: int = 0) -> Agreement:
    """Judge the checks (see `Agreement`); NaN anywhere fails."""
    rel = [_relative(a, b) for a, b in zip(checks.torch_losses, checks.fastrnn_losses, strict=True)]
    worst = max(rel, default=0.0)
    worst_step = checks.steps[rel.index(worst)] if rel else None
    a, b = sides[0].losses, sides[1].losses
    drift_rel = [_relative(x, y) for x, y in zip(a, b, strict=True)]
    identical = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), len(a))
    drift = max(drift_rel, default=0.0)
    drift_step = first_step + (drift_rel.index(drift) if drift_rel else 0)
    agree = worst <= tol and not any(math.isinf(r) for r in drift_rel)
    return Agreement(agree, len(rel), worst, worst_step, tol, identical, drift, drift_step)


def throughput(side: Side, items: list[int], warmup: int) -> float:
    """Items (tokens or samples) per second over the steps after the first `warmup` (which
    include loading fastrnn's compiled kernels); all steps when there are no more."""
    start = warmup if len(side.seconds) > warmup else 0
    seconds = sum(side.seconds[start:])
    return sum(items[start:]) / seconds if seconds > 0 else math.nan


def machine() -> dict[str, Any]:
    """What ran: CPU, threads, versions."""
    try:
        from bench.report import cpu_model

        cpu = cpu_model()
    except Exception:  # noqa: BLE001 - the report runs without it
        cpu = platform.processor() or platform.machine()
    import numba

    return {
        "cpu": cpu,
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "numba_threads": numba.get_num_threads(),
        "torch": torch.__version__,
        "numba": numba.__version__,
        "fastrnn": fastrnn.__version__,
        "python": platform.python_version(),
    }


def write_plot(
    path: Path, sides: list[Side], checks: Checks, first_step: int, title: str
) -> str | None:
    """Both loss curves on one axis (fastrnn dashed over torch.nn's line) and, below on a log
    scale, their relative difference (free-running) and that of the checks on the same weights;
    returns the path, or None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = list(range(first_step, first_step + len(sides[0].losses)))
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(8, 6), sharex=True, gridspec_kw={"height_ratios": (3, 1)}
    )
    for side, style in zip(sides, ("-", "--"), strict=True):
        top.plot(steps, side.losses, style, label=side.name, linewidth=1.5)
    top.set_ylabel("training loss")
    top.set_title(title, fontsize=9)
    top.legend()
    rel = [
        max(abs(a - b) / max(1.0, abs(a)), 1e-12)
        for a, b in zip(sides[0].losses, sides[1].losses, strict=True)
    ]
    bottom.semilogy(steps, rel, color="gray", linewidth=1, label="free-running")
    same = [
        max(_relative(a, b), 1e-12)
        for a, b in zip(checks.torch_losses, checks.fastrnn_losses, strict=True)
    ]
    bottom.semilogy(checks.steps, same, "o", color="black", markersize=3, label="same weights")
    bottom.set_ylabel("relative |diff|")
    bottom.legend(fontsize=7)
    bottom.set_xlabel("step")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return str(path)


def report(
    task: str,
    args: argparse.Namespace,
    sides: list[Side],
    checks: Checks,
    items: list[int],
    unit: str,
    config: dict[str, Any],
    first_step: int = 0,
    extra_lines: Iterable[str] = (),
) -> int:
    """Print the summary (throughput of both, speed-up, task metrics, agreement), write
    `<out>/<task>.json` and `<out>/<task>-loss.png`; returns the exit code (0: losses agree)."""
    ref, fast = sides
    rates = [throughput(side, items, args.warmup) for side in sides]
    speedup = rates[1] / rates[0]
    agree = agreement(sides, checks, args.tol, first_step)
    meta = machine()
    title = f"{task}: " + ", ".join(f"{k} {v}" for k, v in config.items())
    lines = [
        title,
        f"{meta['cpu']}; torch {meta['torch']} ({meta['torch_threads']} threads), "
        f"numba {meta['numba']} ({meta['numba_threads']} threads), fastrnn {meta['fastrnn']}",
        f"{'':24}{NAMES[0]:>14}{NAMES[1]:>14}",
        f"{unit + '/s':24}{rates[0]:>14,.0f}{rates[1]:>14,.0f}   speed-up {speedup:.2f}x",
        f"{'final training loss':24}{ref.losses[-1]:>14.4f}{fast.losses[-1]:>14.4f}",
    ]
    for key in ref.metrics:
        lines.append(f"{key:24}{ref.metrics[key]:>14.4f}{fast.metrics[key]:>14.4f}")
    lines += list(extra_lines)
    lines.append(agree.text())
    args.out.mkdir(parents=True, exist_ok=True)
    plot = (
        None
        if args.no_plot
        else write_plot(args.out / f"{task}-loss.png", sides, checks, first_step, title)
    )
    record = {
        "task": task,
        "config": config,
        "machine": meta,
        "unit": unit,
        "first_step": first_step,
        "warmup_steps": args.warmup,
        "items_per_step": items,
        "speedup": speedup,
        "agreement": vars(agree),
        "checks": vars(checks),
        "sides": {
            side.name: {
                "items_per_second": rate,
                "losses": side.losses,
                "seconds": side.seconds,
                "metrics": side.metrics,
            }
            for side, rate in zip(sides, rates, strict=True)
        },
    }
    json_path = args.out / f"{task}.json"
    json_path.write_text(json.dumps(record, indent=1, default=float) + "\n")
    lines.append(f"results: {json_path}" + (f", plot: {plot}" if plot else ""))
    print("\n".join(lines), flush=True)
    return 0 if agree.agree else 1
