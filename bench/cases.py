"""Benchmark cases: sizes, presets, module / input construction and FLOP counts."""

from __future__ import annotations

import functools
import importlib
from dataclasses import asdict, dataclass

import torch
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence

CELLS = ("lstm", "gru", "rnn")
# Opt-in cell variants, run only when named (`--cells gru_reset_before`): fastrnn's module with
# the option against what a user writes today, torch has none of them.
VARIANT_CELLS = ("gru_reset_before",)
GATES = {"lstm": 4, "gru": 3, "rnn": 1, "gru_reset_before": 3}
CLASS_NAMES = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN", "gru_reset_before": "GRU"}


@dataclass(frozen=True)
class Size:
    """One problem size: sequence length, batch, input size, hidden size."""

    T: int
    B: int
    I: int  # noqa: E741
    H: int

    def __str__(self) -> str:
        return f"{self.T},{self.B},{self.I},{self.H}"


STANDARD_SIZES = (
    Size(100, 1, 64, 128),
    Size(100, 16, 128, 256),
    Size(100, 64, 256, 512),
    Size(50, 32, 512, 1024),
)
# PyTorch's benchmarks/fastrnns default size; part of the standard set on a GPU.
FASTRNNS_GPU_SIZE = Size(100, 64, 512, 512)

# Batch x hidden grid (T = 50, I = H) for the speed-up / roofline-vs-size plot.
GRID_SIZES = tuple(Size(50, b, h, h) for h in (128, 256, 512) for b in (1, 4, 16, 64))

SIZE_PRESETS = {
    "small": STANDARD_SIZES[:2],
    "standard": STANDARD_SIZES,
    "grid": GRID_SIZES,
}


def parse_sizes(spec: str, device: str = "cpu") -> list[Size]:
    """Parse ``--sizes``: a preset name (``small``, ``standard``, ``grid``) or ``T,B,I,H;...``.

    Presets and explicit sizes can be mixed (``small;10,2,8,16``). On a GPU the ``standard``
    preset also contains PyTorch's fastrnns default size (100, 64, 512, 512).
    """
    sizes: list[Size] = []
    for part in spec.replace(" ", "").split(";"):
        if not part:
            continue
        if part in SIZE_PRESETS:
            sizes.extend(SIZE_PRESETS[part])
            if part == "standard" and device == "cuda":
                sizes.append(FASTRNNS_GPU_SIZE)
            continue
        fields = part.split(",")
        if len(fields) != 4:
            raise ValueError(
                f"bad size {part!r}: expected a preset ({', '.join(SIZE_PRESETS)}) or T,B,I,H"
            )
        try:
            values = [int(f) for f in fields]
        except ValueError:
            raise ValueError(f"bad size {part!r}: T,B,I,H must be integers") from None
        if min(values) < 1:
            raise ValueError(f"bad size {part!r}: all of T,B,I,H must be >= 1")
        sizes.append(Size(*values))
    if not sizes:
        raise ValueError("no sizes given")
    # Keep the order, drop duplicates.
    return list(dict.fromkeys(sizes))


def parse_cells(spec: str) -> list[str]:
    cells = [c.strip().lower() for c in spec.split(",") if c.strip()]
    bad = [c for c in cells if c not in CELLS + VARIANT_CELLS]
    if bad or not cells:
        choices = ",".join(CELLS + VARIANT_CELLS)
        raise ValueError(f"bad --cells {spec!r}: choose from {choices}")
    return list(dict.fromkeys(cells))


@dataclass(frozen=True)
class CaseConfig:
    """Everything that defines one benchmark case."""

    cell: str
    size: Size
    dtype: str = "float32"
    device: str = "cpu"
    layers: int = 1
    bidirectional: bool = False
    proj_size: int = 0  # LSTM only; ignored for GRU / RNN
    packed: bool = False
    seed: int = 0

    @property
    def effective_proj_size(self) -> int:
        return self.proj_size if self.cell == "lstm" else 0

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def label(self) -> str:
        s = self.size
        extra = []
        if self.layers != 1:
            extra.append(f"L{self.layers}")
        if self.bidirectional:
            extra.append("bi")
        if self.effective_proj_size:
            extra.append(f"P{self.effective_proj_size}")
        if self.packed:
            extra.append("packed")
        tail = (" " + " ".join(extra)) if extra else ""
        return f"{self.cell} T{s.T} B{s.B} I{s.I} H{s.H}{tail}"

    def module_kwargs(self) -> dict:
        kw = dict(
            input_size=self.size.I,
            hidden_size=self.size.H,
            num_layers=self.layers,
            bidirectional=self.bidirectional,
        )
        if self.effective_proj_size:
            kw["proj_size"] = self.effective_proj_size
        return kw

    def to_dict(self) -> dict:
        d = asdict(self)
        d["size"] = asdict(self.size)
        d["proj_size"] = self.effective_proj_size
        return d


# --------------------------------------------------------------------------------------------
# Implementations


class TorchLoopResetBeforeGRU(torch.nn.GRU):
    """The "reset before" GRU as users write it in torch today: torch.nn.GRU's parameters and
    a Python loop over time of the cell in torch ops (dense input; layers, directions)."""

    def forward(self, input, hx=None):
        if isinstance(input, PackedSequence):
            raise NotImplementedError("the torch loop takes dense input")
        x = input.transpose(0, 1) if self.batch_first else input
        directions = 2 if self.bidirectional else 1
        H = self.hidden_size
        if hx is None:
            hx = x.new_zeros(self.num_layers * directions, x.shape[1], H)
        finals = []
        for layer in range(self.num_layers):
            outputs = []
            for d in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if d else "")
                W_ih, W_hh = (
                    getattr(self, "weight_ih" + suffix),
                    getattr(self, "weight_hh" + suffix),
                )
                b_ih, b_hh = getattr(self, "bias_ih" + suffix), getattr(self, "bias_hh" + suffix)
                h = hx[layer * directions + d]
                xi = torch.addmm(b_ih, x.reshape(-1, x.shape[2]), W_ih.t()).view(*x.shape[:2], -1)
                steps = range(x.shape[0] - 1, -1, -1) if d else range(x.shape[0])
                out = [None] * x.shape[0]
                for t in steps:
                    x_r, x_z, x_n = xi[t].chunk(3, 1)
                    h_r, h_z = torch.addmm(b_hh[: 2 * H], h, W_hh[: 2 * H].t()).chunk(2, 1)
                    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                    n = torch.tanh(x_n + torch.addmm(b_hh[2 * H :], r * h, W_hh[2 * H :].t()))
                    h = (1 - z) * n + z * h
                    out[t] = h
                outputs.append(torch.stack(out))
                finals.append(h)
            x = torch.cat(outputs, 2)
        output = x.transpose(0, 1) if self.batch_first else x
        return output, torch.stack(finals)


def torch_classes() -> dict:
    classes = {cell: getattr(torch.nn, CLASS_NAMES[cell]) for cell in CELLS}
    classes["gru_reset_before"] = TorchLoopResetBeforeGRU
    return classes


def fastrnn_classes() -> tuple[dict, str]:
    """Import fastrnn and return ``({cell: class}, version)``; raises ImportError if unusable."""
    fastrnn = importlib.import_module("fastrnn")
    missing = [name for name in CLASS_NAMES.values() if not hasattr(fastrnn, name)]
    if missing:
        raise ImportError(
            f"fastrnn (at {getattr(fastrnn, '__file__', None) or list(fastrnn.__path__)}) "
            f"has no {', '.join(missing)}"
        )
    version = str(getattr(fastrnn, "__version__", "unknown"))
    classes = {cell: getattr(fastrnn, CLASS_NAMES[cell]) for cell in CELLS}
    classes["gru_reset_before"] = functools.partial(fastrnn.GRU, reset="before")
    return classes, version


def build_modules(cfg: CaseConfig, ref_cls, fast_cls):
    """Build torch's module with ``cfg.seed``, then fastrnn's with the very same weights."""
    torch.manual_seed(cfg.seed)
    ref = ref_cls(**cfg.module_kwargs())
    fast = fast_cls(**cfg.module_kwargs())
    fast.load_state_dict(ref.state_dict())
    ref = ref.to(device=cfg.device, dtype=cfg.torch_dtype)
    fast = fast.to(device=cfg.device, dtype=cfg.torch_dtype)
    return ref, fast


# --------------------------------------------------------------------------------------------
# Inputs


class InputSource:
    """Deterministic input data for one case; hands out fresh leaf tensors per implementation.

    Dense: ``x`` of shape (T, B, I). Packed: lengths uniform in [ceil(T/2), T], unsorted, packed
    with ``pack_padded_sequence(enforce_sorted=False)``; the packed ``data`` is made a leaf so
    that its gradient can be read and the same PackedSequence can be reused across repetitions.
    """

    def __init__(self, cfg: CaseConfig):
        self.cfg = cfg
        s = cfg.size
        gen = torch.Generator().manual_seed(cfg.seed + 1)
        x = torch.randn(s.T, s.B, s.I, generator=gen, dtype=torch.float64)
        self.x = x.to(device=cfg.device, dtype=cfg.torch_dtype)
        self.lengths = None
        self.packed_template = None
        if cfg.packed:
            lo = (s.T + 1) // 2
            self.lengths = torch.randint(lo, s.T + 1, (s.B,), generator=gen)
            # pack_padded_sequence wants lengths on the CPU.
            self.packed_template = pack_padded_sequence(self.x, self.lengths, enforce_sorted=False)

    @property
    def tokens(self) -> int:
        """Number of (time step, sequence) pairs actually processed."""
        if self.lengths is not None:
            return int(self.lengths.sum())
        return self.cfg.size.T * self.cfg.size.B

    def make(self, requires_grad: bool = True):
        """Return ``(module_input, grad_leaf)``, built fresh (outside any timed region)."""
        if self.packed_template is None:
            x = self.x.clone().requires_grad_(requires_grad)
            return x, x
        p = self.packed_template
        data = p.data.clone().requires_grad_(requires_grad)
        return PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices), data


def split_output(out, hidden):
    """Flatten a module's return value into named tensors (output, h_n[, c_n])."""
    named = {"output": out.data if isinstance(out, PackedSequence) else out}
    if isinstance(hidden, tuple):
        named["h_n"], named["c_n"] = hidden
    else:
        named["h_n"] = hidden
    return named


# --------------------------------------------------------------------------------------------
# FLOPs


def forward_flops(cfg: CaseConfig, tokens: int | None = None) -> float:
    """Multiply-add FLOPs of a forward pass (2 per MAC), GEMM work only.

    Per layer and direction: ``2 * tokens * G * H * (I_l + H_r)`` plus the projection
    ``2 * tokens * H * P`` for an LSTM with ``proj_size`` P; ``H_r`` is P or H, ``I_l`` is
    the input size for layer 0 and ``D * H_r`` above. ``tokens`` defaults to T * B (for a
    packed batch, pass the sum of the lengths). For one layer, one direction this is the
    classic ``2 * T * B * G * H * (I + H)``. Forward+backward is counted as 3x forward.
    """
    s = cfg.size
    if tokens is None:
        tokens = s.T * s.B
    G = GATES[cfg.cell]
    P = cfg.effective_proj_size
    Hr = P or s.H
    D = 2 if cfg.bidirectional else 1
    total = 0.0
    for layer in range(cfg.layers):
        I_l = s.I if layer == 0 else D * Hr
        per_dir = G * s.H * (I_l + Hr) + (s.H * P if P else 0)
        total += D * 2.0 * tokens * per_dir
    return total
