"""What cuDNN runs for torch's RNN modules on a GPU: the algorithm PyTorch asks for, and the kernels
that actually ran (torch.profiler).

PyTorch's `get_algo` (aten/src/ATen/native/cudnn/RNN.cpp) asks cuDNN for
`CUDNN_RNN_ALGO_PERSIST_STATIC_SMALL_H` for unpacked, non-float64 input without proj_size when the
hidden size is small: LSTM / GRU H <= 192 in forward and <= 128 in backward, RNN (tanh / relu)
H <= 384 / 256; for float16 it may then pick `PERSIST_STATIC` by its own heuristics; otherwise
`STANDARD`, whose float32 GEMMs use TF32 unless `torch.backends.cudnn.allow_tf32` is off. The rule
is a prediction; the profiled kernel names are what happened.
"""

from __future__ import annotations

import torch

_SMALL_H = {"lstm": (192, 128), "gru": (192, 128), "rnn": (384, 256)}
# Profile torch's kernels per case (`python -m bench --no-cudnn-profile` turns it off).
PROFILE = True


def expected_algorithm(
    cell: str, hidden: int, dtype: str, packed: bool, proj_size: int, backward: bool
) -> str:
    """The cuDNN RNN algorithm PyTorch requests for this layer (forward or backward pass)."""
    if proj_size or packed:
        algorithm = "STANDARD"
    elif dtype != "float64" and hidden <= _SMALL_H[cell][1 if backward else 0]:
        algorithm = "PERSIST_STATIC_SMALL_H"
    elif dtype == "float16":
        algorithm = "STANDARD or PERSIST_STATIC (cuDNN's float16 heuristics)"
    else:
        algorithm = "STANDARD"
    if algorithm == "STANDARD" and dtype == "float32":
        algorithm += " (TF32)" if torch.backends.cudnn.allow_tf32 else " (no TF32)"
    return algorithm


def profiled_kernels(run, top: int = 6) -> list[dict]:
    """The GPU kernels one call of `run` launched, most device time first: name (cut to 90
    characters), calls, total microseconds."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        run()
        torch.cuda.synchronize()
    kernels: dict[str, dict] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = kernels.setdefault(event.name, {"name": event.name[:90], "calls": 0, "us": 0.0})
        entry["calls"] += 1
        entry["us"] += event.time_range.elapsed_us()  # a device event's own span
    ranked = sorted(kernels.values(), key=lambda k: -k["us"])
    return [{**k, "us": round(k["us"], 1)} for k in ranked[:top]]


def summarise(kernels: list[dict]) -> str:
    """A few words on what the kernel names show: persistent RNN kernels, TF32 GEMMs."""
    names = " ".join(k["name"].lower() for k in kernels)
    found = []
    if "persist" in names:
        found.append("persistent RNN kernel")
    if "tf32" in names:
        found.append("TF32 GEMM")
    return ", ".join(found) or "no persistent kernel, no TF32 GEMM in the top kernels"


def cudnn_report(cfg, ref_module, source, fwd_runner, fwdbwd_runner) -> dict:
    """The expected algorithm (forward and backward) and the kernels torch's module ran for one
    forward (no grad) and one forward+backward. Errors are reported, not raised."""
    args = (cfg.cell, cfg.size.H, cfg.dtype, cfg.packed, cfg.effective_proj_size)
    report = {
        "cudnn_algo": expected_algorithm(*args, backward=False),
        "cudnn_algo_backward": expected_algorithm(*args, backward=True),
    }
    if not PROFILE:
        return report
    try:
        for mode, make in (("fwd", fwd_runner), ("fwdbwd", fwdbwd_runner)):
            run, reset = make(ref_module, source)
            if reset is not None:
                reset()
            kernels = profiled_kernels(run)
            report[f"cudnn_kernels_{mode}"] = kernels
            report[f"cudnn_seen_{mode}"] = summarise(kernels)
    except Exception as exc:  # noqa: BLE001 - a profiler problem must not end the benchmark
        report["cudnn_kernels_error"] = f"{type(exc).__name__}: {exc}"
    return report
