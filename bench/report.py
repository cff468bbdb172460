"""Reporting: machine / version metadata, console and markdown tables, JSON and the PNG plot."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numba
import numpy as np
import torch

# --------------------------------------------------------------------------------------------
# Metadata

_THREAD_ENV = (
    "OMP_NUM_THREADS",
    "OMP_WAIT_POLICY",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMBA_NUM_THREADS",
    "NUMBA_THREADING_LAYER",
    "NUMBA_CACHE_DIR",
    "NUMBA_DISABLE_JIT",
    "NUMBA_ENABLE_CUDASIM",
)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cpuinfo_field(name: str) -> str | None:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


# (vendor, family, first model, last model) -> microarchitecture, for the server CPUs this
# project is measured on; a VM's model name often says only "AMD EPYC".
_MICROARCHITECTURES = [
    ("AuthenticAMD", 0x17, 0x30, 0x3F, "Zen 2"),
    ("AuthenticAMD", 0x19, 0x00, 0x0F, "Zen 3"),
    ("AuthenticAMD", 0x19, 0x10, 0x1F, "Zen 4"),
    ("AuthenticAMD", 0x19, 0xA0, 0xAF, "Zen 4"),
    ("AuthenticAMD", 0x1A, 0x00, 0x1F, "Zen 5"),
    ("GenuineIntel", 6, 0x55, 0x55, "Skylake / Cascade Lake"),
    ("GenuineIntel", 6, 0x6A, 0x6C, "Ice Lake"),
    ("GenuineIntel", 6, 0x8F, 0x8F, "Sapphire Rapids"),
    ("GenuineIntel", 6, 0xCF, 0xCF, "Emerald Rapids"),
    ("GenuineIntel", 6, 0xAD, 0xAE, "Granite Rapids"),
]


def cpu_microarchitecture() -> str | None:
    """The CPU's microarchitecture from its vendor, family and model numbers, or None."""
    vendor, family, model = (_cpuinfo_field(k) for k in ("vendor_id", "cpu family", "model"))
    if vendor is None or family is None or model is None:
        return None
    try:
        family_number, model_number = int(family), int(model)
    except ValueError:
        return None
    for known_vendor, known_family, first, last, name in _MICROARCHITECTURES:
        if (
            vendor == known_vendor
            and family_number == known_family
            and first <= model_number <= last
        ):
            return name
    return f"family {family_number} model {model_number}"


def _cpu_flags() -> list[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    wanted = ("avx", "avx2", "fma", "avx512f", "avx512_bf16", "amx_tile")
                    return [x for x in wanted if x in flags]
    except OSError:
        pass
    return []


def _pkg_version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return None


def _numpy_blas() -> str:
    try:
        cfg = np.show_config(mode="dicts")
        blas = cfg["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001
        return "unknown"


def _git_commit(repo: Path) -> dict:
    def git(*a):
        return subprocess.run(
            ["git", "-C", str(repo), *a], capture_output=True, text=True, timeout=5
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit or None, "dirty": dirty}
    except Exception:  # noqa: BLE001
        return {"commit": None, "dirty": None}


def numba_threading_layer() -> str | None:
    try:
        return numba.threading_layer()
    except Exception:  # noqa: BLE001 - only known after a parallel function ran
        return None


def thread_info() -> dict:
    return {
        "torch_num_threads": torch.get_num_threads(),
        "torch_num_interop_threads": torch.get_num_interop_threads(),
        "numba_num_threads": numba.get_num_threads(),
        "numba_threading_layer": numba_threading_layer(),
    }


def _microarchitecture_note(machine: dict) -> str:
    name = machine.get("microarchitecture")
    return f", {name}" if name and name not in machine["cpu_model"] else ""


def collect_metadata(device: str, fastrnn_version: str, fastrnn_file: str | None) -> dict:
    now = _dt.datetime.now().astimezone()
    try:
        affinity = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    meta = {
        "date": now.isoformat(timespec="seconds"),
        "device": device,
        "machine": {
            "cpu_model": cpu_model(),
            "microarchitecture": cpu_microarchitecture(),
            "processor": platform.processor(),
            "arch": platform.machine(),
            "cpu_flags": _cpu_flags(),
            "logical_cores": os.cpu_count(),
            "usable_cores": affinity,
            "platform": platform.platform(),
        },
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numba": numba.__version__,
            "numpy": np.__version__,
            "scipy": _pkg_version("scipy"),
            "llvmlite": _pkg_version("llvmlite"),
            "fastrnn": fastrnn_version,
        },
        "fastrnn_path": fastrnn_file,
        "git": _git_commit(Path(__file__).resolve().parent.parent),
        "threads": thread_info(),
        "thread_env": {k: os.environ.get(k) for k in _THREAD_ENV if k in os.environ},
        "blas": {
            "numpy": _numpy_blas(),
            "torch_mkldnn": torch.backends.mkldnn.is_available(),
            "torch_mkl": torch.backends.mkl.is_available(),
        },
        "loadavg_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "argv": sys.argv,
    }
    if device == "cuda":
        idx = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(idx)
        meta["gpu"] = {
            "name": torch.cuda.get_device_name(idx),
            "capability": ".".join(map(str, torch.cuda.get_device_capability(idx))),
            "memory_gib": round(props.total_memory / 2**30, 1),
            "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
            "cudnn_enabled": torch.backends.cudnn.enabled,
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "numba_cuda": _pkg_version("numba-cuda"),
        }
    return meta


def header_lines(meta: dict, settings: dict) -> list[str]:
    m, v, t = meta["machine"], meta["versions"], meta["threads"]
    lines = [
        f"date      : {meta['date']}",
        f"machine   : {m['cpu_model']}{_microarchitecture_note(m)} ({m['arch']}, "
        f"{m['logical_cores']} logical cores, "
        f"{m['usable_cores']} usable; {' '.join(m['cpu_flags']) or 'no SIMD flags found'})",
    ]
    if "gpu" in meta:
        g = meta["gpu"]
        lines.append(
            f"gpu       : {g['name']} (sm {g['capability']}, {g['memory_gib']} GiB), "
            f"CUDA {g['torch_cuda']}, cuDNN {g['cudnn']}"
        )
    lines += [
        f"versions  : python {v['python']}, torch {v['torch']}, numba {v['numba']}, "
        f"numpy {v['numpy']}, fastrnn {v['fastrnn']}",
        f"threads   : torch {t['torch_num_threads']} (interop {t['torch_num_interop_threads']}), "
        f"numba {t['numba_num_threads']} (layer {t['numba_threading_layer'] or 'n/a'})"
        + (f"; env {meta['thread_env']}" if meta["thread_env"] else ""),
        f"settings  : {settings_line(settings)}",
    ]
    if meta.get("sgemm_peak_gflops"):
        start_end = meta.get("sgemm_peak_gflops_start_end")
        measured = (
            f" (the best of all measurements; {start_end[0]:.0f} before the run, "
            f"{start_end[1]:.0f} after it)"
            if start_end
            else ""
        )
        gemm = meta.get("peak_gemm", "sgemm")
        lines.append(
            f"roofline  : numpy {gemm} {meta['sgemm_peak_gflops']:.0f} GFLOP/s with "
            f"{t['torch_num_threads']} threads{measured}; the '% {gemm} peak' column judges "
            f"each case by {gemm} measured just before and after it (the higher)"
        )
    return lines


def settings_short(s: dict) -> str:
    parts = [s["dtype"]]
    if s["layers"] != 1:
        parts.append(f"{s['layers']} layers")
    if s["bidirectional"]:
        parts.append("bidirectional")
    if s["proj_size"]:
        parts.append(f"proj_size {s['proj_size']}")
    if s["packed"]:
        parts.append("packed")
    return ", ".join(parts)


def settings_line(s: dict) -> str:
    parts = [f"dtype {s['dtype']}", f"layers {s['layers']}"]
    if s["bidirectional"]:
        parts.append("bidirectional")
    if s["proj_size"]:
        parts.append(f"proj_size {s['proj_size']} (LSTM only)")
    if s["packed"]:
        parts.append("packed (lengths uniform in [T/2, T], unsorted)")
    t = s["timing"]
    reps = (
        f"{t['reps']} reps"
        if t["reps"] is not None
        else f"adaptive reps ({t['min_reps']}-{t['max_reps']}, target {t['target_s']} s/impl)"
    )
    parts.append(f"median of {reps}, {t['schedule']}, warm-up {t['warmup']}, timer {t['timer']}")
    parts.append(f"parity rtol {s['rtol']}" if s["parity"] else "parity skipped")
    return "; ".join(parts)


# --------------------------------------------------------------------------------------------
# Tables


def _fmt_ms(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "-"
    ms = seconds * 1e3
    if ms < 1:
        return f"{ms:.3f}"
    if ms < 10:
        return f"{ms:.2f}"
    if ms < 100:
        return f"{ms:.1f}"
    return f"{ms:.0f}"


def _fmt_ratio(r: float | None) -> str:
    if r is None or not math.isfinite(r):
        return "nan"
    return f"{r:.2f}x"


def _speedup_cell(case: dict, key: str, spread: str = "") -> str:
    if case["status"] == "parity_failed":
        return "parity failed"
    if case["status"] == "error":
        return "error"
    text = _fmt_ratio(case.get(key))
    pairs = case.get(key.replace("speedup_", "paired_ratio_"))
    if spread == "range" and pairs:
        text += f" ({pairs['p25']:.2f}–{pairs['p75']:.2f})"
    return text


def _parity_cell(case: dict) -> str:
    p = case.get("parity")
    if p is None:
        return "error" if case["status"] == "error" else "skipped"
    if p["error"]:
        return "FAILED (error)"
    d = p["max_abs_diff"]
    val = f"{d:.1e}" if d is not None and math.isfinite(d) else "nan"
    return val if p["ok"] else f"FAILED {val}"


def _time_cell(case: dict, mode: str, impl: str, spread: str) -> str:
    m = case.get(mode)
    if not m:
        return "-"
    st = m[impl]
    med = _fmt_ms(st["median_s"])
    if spread == "pct":
        rel = st["iqr_s"] / (2 * st["median_s"]) if st["median_s"] > 0 else float("nan")
        return f"{med} ±{rel * 100:.0f}%"
    if spread == "range":
        return f"{med} ({_fmt_ms(st['p25_s'])}–{_fmt_ms(st['p75_s'])})"
    return med


def _gflops_cell(case: dict) -> str:
    g = case.get("gflops", {}).get("fastrnn_fwdbwd")
    if g is None or not math.isfinite(g) or case["status"] == "error":
        return "-"
    return f"{g:.1f}"


def case_peak(case: dict, run_peak: float | None) -> float | None:
    """The sgemm GFLOP/s a case is judged by: measured beside it (the higher of just before and
    just after it), else the run's (older result files have only that)."""
    return case.get("sgemm_peak_gflops") or run_peak


def _peak_cell(case: dict, peak: float | None) -> str:
    g = case.get("gflops", {}).get("fastrnn_fwdbwd")
    peak = case_peak(case, peak)
    if not peak or g is None or not math.isfinite(g) or case["status"] == "error":
        return "-"
    return f"{100 * g / peak:.0f}%"


COLUMNS = (
    "cell",
    "T",
    "B",
    "I",
    "H",
    "torch fwd ms",
    "fastrnn fwd ms",
    "fwd speed-up",
    "torch fwd+bwd ms",
    "fastrnn fwd+bwd ms",
    "fwd+bwd speed-up",
    "fastrnn fwd+bwd GFLOP/s",
    "% sgemm peak",
    "parity max|Δ|",
)


def table_rows(cases: list[dict], spread: str, peak: float | None = None) -> list[list[str]]:
    rows = []
    for c in cases:
        s = c["config"]["size"]
        rows.append(
            [
                c["config"]["cell"],
                str(s["T"]),
                str(s["B"]),
                str(s["I"]),
                str(s["H"]),
                _time_cell(c, "fwd", "torch", spread),
                _time_cell(c, "fwd", "fastrnn", spread),
                _speedup_cell(c, "speedup_fwd", spread),
                _time_cell(c, "fwdbwd", "torch", spread),
                _time_cell(c, "fwdbwd", "fastrnn", spread),
                _speedup_cell(c, "speedup_fwdbwd", spread),
                _gflops_cell(c),
                _peak_cell(c, peak),
                _parity_cell(c),
            ]
        )
    return rows


def columns(gemm: str = "sgemm") -> tuple[str, ...]:
    """The table's column names, the roofline's named after the GEMM it measured
    (`bench.roofline.gemm_name`)."""
    return tuple(c.replace("sgemm", gemm) for c in COLUMNS)


def console_table(cases: list[dict], peak: float | None = None, gemm: str = "sgemm") -> str:
    rows = table_rows(cases, spread="pct", peak=peak)
    names = columns(gemm)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(names)]
    left = {0}

    def line(cells):
        return "  ".join(
            c.ljust(w) if i in left else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    out = [line(names), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows]
    return "\n".join(out)


def markdown_table(cases: list[dict], peak: float | None = None, gemm: str = "sgemm") -> str:
    rows = table_rows(cases, spread="range", peak=peak)
    header = [h.replace("|", "\\|") for h in columns(gemm)]  # the pipes in "max|Δ|"
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _parity_failure_text(p: dict) -> str:
    parts = []
    for k in p["failures"]:
        t = p["tensors"][k]
        d = t["max_abs_diff"]
        text = f"{k} (max|Δ| {d:.2e} > tol {t['tol']:.1e}" if d is not None else f"{k} ("
        if t.get("note"):
            text += (", " if d is not None else "") + t["note"]
        parts.append(text + ")")
    return ", ".join(parts)


def notes(
    cases: list[dict], threads_start: dict, threads_end: dict, busy_threshold: float = 0.1
) -> list[str]:
    lines = []
    for c in cases:
        p = c.get("parity")
        if c["status"] == "error":
            lines.append(f"{c['label']}: ERROR {c['error']}")
        elif p and not p["ok"]:
            lines.append(f"{c['label']}: parity FAILED in {_parity_failure_text(p)}")
        for w in c.get("warnings", []):
            lines.append(f"{c['label']}: warning: {w}")
    busy = [
        (c["label"], c["other_cpu_load"])
        for c in cases
        if c.get("other_cpu_load") is not None and c["other_cpu_load"] > busy_threshold
    ]
    if busy:
        worst = max(v for _, v in busy)
        which = (
            "all cases"
            if len(busy) == len(cases) and len(cases) > 1
            else ", ".join(label for label, _ in busy)
        )
        lines.append(
            f"other processes used up to {worst:.0%} of the CPUs while timing {which}: "
            "those timings are unreliable (per-case 'other_cpu_load' in JSON); re-run on an idle "
            "machine (with --threads 1 a busy machine hurts torch's OpenMP loops less)"
        )
    if threads_start["torch_num_threads"] != threads_end["torch_num_threads"]:
        lines.append(
            f"torch.get_num_threads() changed during the run: "
            f"{threads_start['torch_num_threads']} -> {threads_end['torch_num_threads']} "
            "(see numba issue 9387: Numba's OpenMP layer can reset it); per-case values in JSON"
        )
    return lines


def markdown_report(meta: dict, settings: dict, cases: list[dict], note_lines: list[str]) -> str:
    gemm = meta.get("peak_gemm", "sgemm")
    out = [f"# fastrnn benchmark: {meta['device']}, {meta['date'][:10]}", ""]
    out += [
        f"- {ln.split(':', 1)[0].strip()}: {ln.split(':', 1)[1].strip()}"
        for ln in header_lines(meta, settings)
    ]
    out += [
        "",
        "Times are medians in ms, (p25–p75) in parentheses; speed-up = torch median / fastrnn "
        "median (> 1: fastrnn is faster), and in parentheses the p25–p75 of the per-pair ratios "
        "(each torch call against the fastrnn call right after it, robust to a machine whose "
        "speed drifts during the run). GFLOP/s: GEMM FLOPs of fwd+bwd (3x forward, forward = "
        "2·tokens·G·H·(I+H) per layer-direction) / fastrnn fwd+bwd median; % "
        f"{gemm} peak: that against the machine's {gemm} throughput (the run's dtype) measured "
        "just before and after the case (the higher).",
        "",
        markdown_table(cases, meta.get("sgemm_peak_gflops"), gemm),
    ]
    if note_lines:
        out += ["", "Notes:", ""] + [f"- {ln}" for ln in note_lines]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# Files


def _json_safe(obj):
    """Replace NaN / inf by None (strict JSON), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(_json_safe(payload), indent=1, allow_nan=False) + "\n")


def write_plot(path: Path, cases: list[dict], title: str) -> str | None:
    """Bar chart of fwd and fwd+bwd speed-up per case; returns None or why it was skipped."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib, or the 'bench' extra)"

    labels = [c["label"] for c in cases]
    fwd = [c.get("speedup_fwd") for c in cases]
    fb = [c.get("speedup_fwdbwd") for c in cases]
    vals = [v for v in fwd + fb if v is not None and math.isfinite(v) and v > 0]
    x = np.arange(len(cases))
    w = 0.38
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cases) + 2), 4.5))
    nz = [v if v is not None and math.isfinite(v) else float("nan") for v in fwd]
    nb = [v if v is not None and math.isfinite(v) else float("nan") for v in fb]
    b1 = ax.bar(x - w / 2, nz, w, label="forward (no grad)", color="#4C72B0")
    b2 = ax.bar(x + w / 2, nb, w, label="forward+backward", color="#DD8452")
    log = bool(vals) and (max(vals) / min(vals) > 20)
    if log:
        ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    for bars, series in ((b1, fwd), (b2, fb)):
        for rect, v in zip(bars, series, strict=True):
            if v is not None and math.isfinite(v) and v > 0:
                ax.annotate(
                    f"{v:.2f}",
                    (rect.get_x() + rect.get_width() / 2, v),
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    for i, c in enumerate(cases):
        if c["status"] in ("parity_failed", "error"):
            text = "parity failed" if c["status"] == "parity_failed" else "error"
            ax.annotate(
                text,
                (i, 1.0),
                ha="center",
                va="bottom",
                color="red",
                fontsize=8,
                rotation=90,
            )
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("speed-up vs torch (torch time / fastrnn time)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


def write_grid_plot(
    path: Path, cases: list[dict], peak: float | None, title: str, gemm: str = "sgemm"
) -> str | None:
    """Speed-up (fwd+bwd) and % of the GEMM peak (`gemm`) against batch, one line per (cell,
    hidden size); drawn when the run covers at least two batch sizes for some (cell, H, I, T)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed"
    series: dict[tuple, list[tuple[int, float, float]]] = {}
    for c in cases:
        s = c["config"]["size"]
        speedup = c.get("speedup_fwdbwd")
        if speedup is None or not math.isfinite(speedup):
            continue
        g = c.get("gflops", {}).get("fastrnn_fwdbwd")
        case_roof = case_peak(c, peak)
        pct = 100 * g / case_roof if case_roof and g is not None else float("nan")
        key = (c["config"]["cell"], s["H"], s["I"], s["T"])
        series.setdefault(key, []).append((s["B"], speedup, pct))
    series = {k: sorted(v) for k, v in series.items() if len(v) >= 2}
    if not series:
        return "fewer than two batch sizes per (cell, hidden size)"
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for (cell, hidden, _, _), points in sorted(series.items()):
        batches = [p[0] for p in points]
        label = f"{cell} H{hidden}"
        ax1.plot(batches, [p[1] for p in points], marker="o", label=label)
        ax2.plot(batches, [p[2] for p in points], marker="o", label=label)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.grid(True, alpha=0.3)
    ax1.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax1.set_ylabel("fwd+bwd speed-up vs torch")
    ax2.set_ylabel(f"fastrnn fwd+bwd, % of measured {gemm} peak")
    ax1.legend(fontsize=7, ncol=2)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
