"""Parity: run torch and fastrnn on the same input and weights, compare outputs and gradients."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from bench.cases import InputSource, split_output


@dataclass
class TensorDiff:
    max_abs_diff: float
    ref_max_abs: float
    tol: float
    ok: bool
    note: str = ""

    def to_dict(self) -> dict:
        d = {
            "max_abs_diff": self.max_abs_diff,
            "ref_max_abs": self.ref_max_abs,
            "tol": self.tol,
            "ok": self.ok,
        }
        if self.note:
            d["note"] = self.note
        return d


@dataclass
class ParityResult:
    ok: bool
    max_abs_diff: float
    worst: str
    rtol: float
    tensors: dict[str, TensorDiff] = field(default_factory=dict)
    error: str = ""

    @property
    def failures(self) -> list[str]:
        return [name for name, d in self.tensors.items() if not d.ok]

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "max_abs_diff": self.max_abs_diff,
            "worst": self.worst,
            "rtol": self.rtol,
            "criterion": "max|fastrnn - torch| <= rtol * max(1, max|torch|), per tensor",
            "failures": self.failures,
            "error": self.error,
            "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
        }


def compare(ref: torch.Tensor | None, got: torch.Tensor | None, rtol: float) -> TensorDiff:
    """``max |got - ref|`` with tolerance ``rtol * max(1, max |ref|)``; NaNs must match."""
    nan = float("nan")
    if ref is None or got is None:
        if ref is None and got is None:
            return TensorDiff(0.0, 0.0, rtol, True, "both None")
        which = "torch" if ref is None else "fastrnn"
        return TensorDiff(nan, nan, rtol, False, f"missing on {which} side")
    if tuple(ref.shape) != tuple(got.shape):
        note = f"shape {tuple(got.shape)} != torch {tuple(ref.shape)}"
        return TensorDiff(nan, nan, rtol, False, note)
    a = ref.detach().to("cpu", torch.float64)
    b = got.detach().to("cpu", torch.float64)
    if a.numel() == 0:
        return TensorDiff(0.0, 0.0, rtol, True, "empty")
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    if not torch.equal(nan_a, nan_b):
        return TensorDiff(nan, nan, rtol, False, "NaN positions differ")
    # Equal values (including equal infinities) count as 0 difference.
    diff = torch.where((a == b) | nan_a, torch.zeros_like(a), (a - b).abs())
    finite_ref = a[torch.isfinite(a)]
    ref_max = float(finite_ref.abs().max()) if finite_ref.numel() else 0.0
    max_diff = float(diff.max())
    tol = rtol * max(1.0, ref_max)
    ok = math.isfinite(max_diff) and max_diff <= tol
    return TensorDiff(max_diff, ref_max, tol, ok)


def _forward_backward(module, source: InputSource, weights: dict | None):
    """Forward + backward of ``sum_k <out_k, w_k>``; returns (named outputs, named grads, w)."""
    for p in module.parameters():
        p.grad = None
    inp, leaf = source.make(requires_grad=True)
    out, hidden = module(inp)
    named = split_output(out, hidden)
    if weights is None:
        # Random cotangents (instead of plain sums) so that every output element and every
        # state contributes its own gradient signal.
        gen = torch.Generator().manual_seed(source.cfg.seed + 2)
        weights = {
            k: torch.randn(v.shape, generator=gen, dtype=torch.float64).to(v.device, v.dtype)
            for k, v in named.items()
        }
    loss = sum((named[k] * weights[k]).sum() for k in named if k in weights)
    loss.backward()
    grads = {"grad_input": leaf.grad}
    for name, p in module.named_parameters():
        grads[f"grad_{name}"] = p.grad
    outs = {k: v.detach() for k, v in named.items()}
    return outs, grads, weights


def check_parity(ref_module, fast_module, source: InputSource, rtol: float) -> ParityResult:
    """Compare output, h_n (c_n) and the gradients of the input and every parameter.

    Exceptions raised by fastrnn are reported as a failed parity with the error message.
    """
    ref_module.train()
    fast_module.train()
    # cuDNN may run float32 RNN GEMMs in TF32 (torch.backends.cudnn.allow_tf32 defaults to True),
    # which alone differs from float32 by ~1e-3: the parity reference is strict float32. The
    # timings use the settings as they are (recorded in the metadata).
    with torch.backends.cudnn.flags(enabled=torch.backends.cudnn.enabled, allow_tf32=False):
        ref_out, ref_grads, weights = _forward_backward(ref_module, source, None)
    try:
        got_out, got_grads, _ = _forward_backward(fast_module, source, weights)
    except Exception as exc:  # noqa: BLE001 - anything fastrnn raises is a parity failure
        return ParityResult(
            ok=False,
            max_abs_diff=float("nan"),
            worst="",
            rtol=rtol,
            error=f"{type(exc).__name__}: {exc}",
        )
    tensors: dict[str, TensorDiff] = {}
    for k in ref_out.keys() | got_out.keys():
        tensors[k] = compare(ref_out.get(k), got_out.get(k), rtol)
    for k in ref_grads.keys() | got_grads.keys():
        tensors[k] = compare(ref_grads.get(k), got_grads.get(k), rtol)
    order = list(ref_out) + list(ref_grads)
    tensors = {k: tensors[k] for k in order + sorted(set(tensors) - set(order))}

    worst, worst_val = "", -1.0
    for k, d in tensors.items():
        v = d.max_abs_diff if math.isfinite(d.max_abs_diff) else math.inf
        if v > worst_val:
            worst, worst_val = k, v
    ok = all(d.ok for d in tensors.values())
    finite = [d.max_abs_diff for d in tensors.values() if math.isfinite(d.max_abs_diff)]
    max_diff = max(finite) if len(finite) == len(tensors) else float("nan")
    return ParityResult(ok=ok, max_abs_diff=max_diff, worst=worst, rtol=rtol, tensors=tensors)
