"""Timing: warm-up, interleaved repetitions, adaptive repetition count, robust statistics."""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch


class CpuTimer:
    """Wall-clock time of one call with ``time.perf_counter``."""

    name = "time.perf_counter"

    def __call__(self, fn: Callable[[], object]) -> float:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0


class CudaTimer:
    """GPU time of one call between two ``torch.cuda.Event`` s (the device is synchronised)."""

    name = "torch.cuda.Event"

    def __init__(self):
        self.start = torch.cuda.Event(enable_timing=True)
        self.end = torch.cuda.Event(enable_timing=True)

    def __call__(self, fn: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        self.start.record()
        fn()
        self.end.record()
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1e3


def make_timer(device: str):
    return CudaTimer() if device == "cuda" else CpuTimer()


@dataclass
class Stats:
    """Summary of repeated timings (seconds)."""

    samples: list[float]
    median: float = field(init=False)
    p25: float = field(init=False)
    p75: float = field(init=False)
    mean: float = field(init=False)
    min: float = field(init=False)
    max: float = field(init=False)

    def __post_init__(self):
        a = np.asarray(self.samples, dtype=np.float64)
        self.median = float(np.median(a))
        self.p25, self.p75 = (float(v) for v in np.percentile(a, [25, 75]))
        self.mean = float(a.mean())
        self.min = float(a.min())
        self.max = float(a.max())

    @property
    def iqr(self) -> float:
        return self.p75 - self.p25

    @property
    def rel_iqr(self) -> float:
        """Half the IQR relative to the median (a robust '±' spread)."""
        return self.iqr / (2 * self.median) if self.median > 0 else float("nan")

    def to_dict(self) -> dict:
        return {
            "n": len(self.samples),
            "median_s": self.median,
            "p25_s": self.p25,
            "p75_s": self.p75,
            "iqr_s": self.iqr,
            "mean_s": self.mean,
            "min_s": self.min,
            "max_s": self.max,
            "samples_s": list(self.samples),
        }


@dataclass
class Measurement:
    """Result of timing several implementations of the same operation."""

    stats: dict[str, Stats]
    warmup_s: dict[str, list[float]]
    reps: int
    schedule: str

    def paired_ratios(self, numerator: str, denominator: str) -> list[float] | None:
        """numerator's i-th time / denominator's i-th time, for interleaved runs: each pair ran
        back to back, so a machine that drifts between pairs (this VM does, by 1.5-2x within
        minutes) moves both sides of a pair alike. None for a blocked schedule."""
        if self.schedule != "interleaved":
            return None
        a, b = self.stats[numerator].samples, self.stats[denominator].samples
        return [x / y for x, y in zip(a, b, strict=True) if y > 0]

    def to_dict(self) -> dict:
        return {
            "reps": self.reps,
            "schedule": self.schedule,
            "warmup_s": self.warmup_s,
            **{name: s.to_dict() for name, s in self.stats.items()},
        }


@dataclass
class RepPolicy:
    """How many timed repetitions: fixed (``reps``) or adaptive towards ``target_s``.

    Adaptive: ``ceil(target_s / estimate)`` clamped to ``[min_reps, max_reps]``, where the
    estimate is the mean over implementations of each one's last warm-up call, so that each
    implementation gets about ``target_s`` of timed calls; all implementations get the same
    count (they are interleaved).
    """

    target_s: float = 0.3
    min_reps: int = 3
    max_reps: int = 50
    reps: int | None = None
    warmup: int = 2

    def count(self, estimates: list[float]) -> int:
        if self.reps is not None:
            return self.reps
        est = max(sum(estimates) / len(estimates), 1e-7)
        n = math.ceil(self.target_s / est)
        return int(min(max(n, self.min_reps), self.max_reps))


def measure(
    fns: dict[str, tuple[Callable[[], object], Callable[[], object] | None]],
    timer,
    policy: RepPolicy,
    interleave: bool = True,
) -> Measurement:
    """Time each ``run`` in ``fns`` (name -> (run, reset)); ``reset`` runs untimed before each call.

    Warm-up: ``policy.warmup`` calls of each, interleaved, untimed for the statistics (they also
    trigger JIT compilation / cache loading). Then ``N`` timed calls of each, interleaved
    A B A B ... (or all A then all B with ``interleave=False``). The garbage collector is
    collected before and disabled during the timed loop.
    """
    names = list(fns)
    warm: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(max(policy.warmup, 1)):
        for n in names:
            run, reset = fns[n]
            if reset is not None:
                reset()
            warm[n].append(timer(run))
    reps = policy.count([warm[n][-1] for n in names])

    samples: dict[str, list[float]] = {n: [] for n in names}
    if interleave:
        order = [n for _ in range(reps) for n in names]
    else:
        order = [n for n in names for _ in range(reps)]
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for n in order:
            run, reset = fns[n]
            if reset is not None:
                reset()
            samples[n].append(timer(run))
    finally:
        if gc_was_enabled:
            gc.enable()
    return Measurement(
        stats={n: Stats(samples[n]) for n in names},
        warmup_s=warm,
        reps=reps,
        schedule="interleaved" if interleave else "blocked",
    )


class OtherLoad:
    """Fraction of the machine's CPU time used by *other* processes between start and stop.

    Reads the busy jiffies of ``/proc/stat`` (steal included) and subtracts this process's own
    CPU time (``os.times``); ``None`` where ``/proc/stat`` is unavailable. A benchmark on a shared
    machine is only trustworthy when this stays near 0.
    """

    def __init__(self):
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._start = self._snapshot()

    @staticmethod
    def _busy_jiffies() -> int | None:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        # user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields[:8]) - idle

    def _snapshot(self):
        t = os.times()
        return self._busy_jiffies(), t.user + t.system, time.perf_counter()

    def stop(self, min_wall_s: float = 0.5) -> float | None:
        """The fraction, or None when unknown or when the interval is too short for jiffies."""
        busy1, own1, wall1 = self._snapshot()
        busy0, own0, wall0 = self._start
        if busy0 is None or busy1 is None or wall1 - wall0 < min_wall_s:
            return None
        ncpu = os.cpu_count() or 1
        other = (busy1 - busy0) / self._hz - (own1 - own0)
        return min(1.0, max(0.0, other / ((wall1 - wall0) * ncpu)))
