"""The parity grids the per-op test files run (test_lstm.py, test_gru.py, test_rnn.py): module
configurations and their inputs, and the checks against torch.nn with identical weights (output,
final states, gradients of the input, h0, c0 and every parameter; see `conftest.run_fwd_bwd`)."""

from __future__ import annotations

import pytest
import torch
from conftest import compare_modules, make_mode_pair

F32, F64 = torch.float32, torch.float64


def make_inputs(
    mode,
    *,
    T=5,
    B=3,
    I=4,
    H=5,
    layers=1,
    bidirectional=False,
    proj=0,
    batch_first=False,
    unbatched=False,
    hx=False,
    dtype=F32,
    seed=0,
):
    """Random input (and optionally h0 / (h0, c0)) of the right shapes."""
    gen = torch.Generator().manual_seed(seed + 100)
    D = 2 if bidirectional else 1
    if unbatched:
        x_shape = (T, I)
    else:
        x_shape = (B, T, I) if batch_first else (T, B, I)
    x = torch.randn(x_shape, generator=gen, dtype=F64).to(dtype)
    state = None
    if hx:
        batch = () if unbatched else (B,)
        h_out = proj if proj else H
        h0 = 0.5 * torch.randn((layers * D, *batch, h_out), generator=gen, dtype=F64).to(dtype)
        if mode == "LSTM":
            c0 = 0.5 * torch.randn((layers * D, *batch, H), generator=gen, dtype=F64).to(dtype)
            state = (h0, c0)
        else:
            state = h0
    return x, state


def make_case(mode, c, *, T, B, I, H):
    """`make_mode_pair` and `make_inputs` for a configuration dict c (optional keys layers,
    bias, batch_first, bidirectional, dropout, dtype, proj, hx, unbatched; torch's defaults):
    (ref, fast, x, hx)."""
    ref, fast = make_mode_pair(
        mode,
        I,
        H,
        num_layers=c.get("layers", 1),
        bias=c.get("bias", True),
        batch_first=c.get("batch_first", False),
        bidirectional=c.get("bidirectional", False),
        dropout=c.get("dropout", 0.0),
        dtype=c.get("dtype", F32),
        **({"proj_size": c["proj"]} if c.get("proj") else {}),
    )
    x, hx = make_inputs(
        mode,
        T=T,
        B=B,
        I=I,
        H=H,
        layers=c.get("layers", 1),
        bidirectional=c.get("bidirectional", False),
        proj=c.get("proj", 0),
        batch_first=c.get("batch_first", False),
        unbatched=c.get("unbatched", False),
        hx=c.get("hx", False),
        dtype=c.get("dtype", F32),
    )
    return ref, fast, x, hx


def _id(mode, layers, bidirectional, batch_first, bias, proj, dtype, inp, hx, T, B):
    parts = [mode, f"L{layers}", "bi" if bidirectional else "uni"]
    if batch_first:
        parts.append("bf")
    if not bias:
        parts.append("nobias")
    if proj:
        parts.append(f"proj{proj}")
    parts.append(inp)
    parts.append("hx" if hx else "nohx")
    parts.append("f64" if dtype == F64 else "f32")
    parts.append(f"T{T}B{B}")
    return "-".join(parts)


def cfg(
    mode,
    layers=1,
    bidirectional=False,
    batch_first=False,
    bias=True,
    proj=0,
    dtype=F32,
    inp="batched",
    hx=False,
    T=5,
    B=3,
    I=4,
    H=5,
):
    args = dict(
        mode=mode,
        layers=layers,
        bidirectional=bidirectional,
        batch_first=batch_first,
        bias=bias,
        proj=proj,
        dtype=dtype,
        inp=inp,
        hx=hx,
        T=T,
        B=B,
        I=I,
        H=H,
    )
    return pytest.param(
        args, id=_id(mode, layers, bidirectional, batch_first, bias, proj, dtype, inp, hx, T, B)
    )


def module_grid(m: str) -> list:
    """A covering sweep of one mode (not a cartesian product): every option appears, and
    options are combined with each other in several ways."""
    grid = [
        cfg(m),
        cfg(m, layers=2, bidirectional=True, batch_first=True, hx=True),
        cfg(m, layers=3, bias=False, dtype=F64, hx=True, I=3, H=6),
        cfg(m, layers=2, bidirectional=True, bias=False, batch_first=True, dtype=F64),
        cfg(m, layers=2, bidirectional=True, inp="unbatched", hx=True),
        cfg(m, layers=1, batch_first=True, inp="unbatched", dtype=F64),
        cfg(m, layers=2, inp="unbatched", bias=False, hx=False, T=1),
        cfg(m, layers=2, bidirectional=True, T=1, hx=True),
        cfg(m, layers=1, bidirectional=True, B=1, T=7, I=5, H=2),
        cfg(m, layers=3, bidirectional=True, batch_first=True, B=4, T=2, hx=True, dtype=F64),
        cfg(m, layers=1, H=1, I=1, B=2, hx=True),
    ]
    return grid


LSTM_PROJ_GRID = [
    cfg("LSTM", proj=3),
    cfg("LSTM", proj=3, layers=2, bidirectional=True, hx=True),
    cfg(
        "LSTM",
        proj=2,
        layers=2,
        bidirectional=True,
        batch_first=True,
        bias=False,
        hx=True,
        dtype=F64,
    ),
    cfg("LSTM", proj=3, layers=2, inp="unbatched", hx=True),
    cfg("LSTM", proj=1, layers=3, dtype=F64, batch_first=True),
    cfg("LSTM", proj=4, H=5, I=6, layers=2, bidirectional=True, inp="unbatched", dtype=F64),
    cfg("LSTM", proj=1, H=2, T=1, B=1, hx=True),
]


def check_module_parity(c) -> None:
    """The module of configuration c against torch.nn: outputs, states, every gradient."""
    ref, fast = make_mode_pair(
        c["mode"],
        c["I"],
        c["H"],
        num_layers=c["layers"],
        bias=c["bias"],
        batch_first=c["batch_first"],
        bidirectional=c["bidirectional"],
        dtype=c["dtype"],
        **({"proj_size": c["proj"]} if c["proj"] else {}),
    )
    x, hx = make_inputs(
        c["mode"],
        T=c["T"],
        B=c["B"],
        I=c["I"],
        H=c["H"],
        layers=c["layers"],
        bidirectional=c["bidirectional"],
        proj=c["proj"],
        batch_first=c["batch_first"],
        unbatched=c["inp"] == "unbatched",
        hx=c["hx"],
        dtype=c["dtype"],
    )
    fast_res, _ = compare_modules(ref, fast, x, hx)
    # shape sanity on top of the comparison with torch
    D = 2 if c["bidirectional"] else 1
    h_out = c["proj"] or c["H"]
    assert fast_res["y"].shape[-1] == D * h_out


# ---------------------------------------------------------------------------------------------
# PackedSequence input
# ---------------------------------------------------------------------------------------------
def pk(
    mode,
    lengths,
    enforce_sorted,
    layers=1,
    bidirectional=False,
    batch_first=False,
    hx=False,
    dtype=F32,
    proj=0,
    bias=True,
    T=None,
):
    T = T if T is not None else max(lengths)
    parts = [mode, f"L{layers}", "bi" if bidirectional else "uni"]
    if batch_first:
        parts.append("bf")
    if proj:
        parts.append(f"proj{proj}")
    if not bias:
        parts.append("nobias")
    parts += [
        "sorted" if enforce_sorted else "unsorted",
        "len" + "_".join(map(str, lengths)),
        "hx" if hx else "nohx",
        "f64" if dtype == F64 else "f32",
    ]
    return pytest.param(
        dict(
            mode=mode,
            lengths=lengths,
            enforce_sorted=enforce_sorted,
            layers=layers,
            bidirectional=bidirectional,
            batch_first=batch_first,
            hx=hx,
            dtype=dtype,
            proj=proj,
            bias=bias,
            T=T,
        ),
        id="-".join(parts),
    )


def packed_grid(m: str) -> list:
    """PackedSequence cases of one mode: sorted or not, batches of one, padding past the
    longest sequence."""
    return [
        pk(m, [5, 3, 1], True),
        pk(m, [2, 5, 1, 4], False, layers=2, bidirectional=True, batch_first=True, hx=True),
        pk(m, [3, 3, 3], True, layers=2, bidirectional=True, dtype=F64, hx=True),
        pk(m, [1, 1, 1], False, bidirectional=True, hx=True),
        pk(m, [4], True, layers=2, bidirectional=True, hx=True),  # batch of one
        pk(m, [1], True, layers=2, bidirectional=True, T=3),  # batch of one, length 1 < T
        pk(m, [1, 6, 3], False, layers=3, bias=False, dtype=F64, hx=True),
    ]


LSTM_PROJ_PACKED = [
    pk("LSTM", [2, 5, 1, 4], False, layers=2, bidirectional=True, hx=True, proj=3, dtype=F64),
    pk("LSTM", [5, 4, 2], True, layers=2, bidirectional=True, batch_first=True, proj=2),
    pk("LSTM", [3, 6], False, proj=1, hx=True, T=7),  # padded longer than the longest sequence
]


def check_packed_parity(c) -> None:
    """Packed input of configuration c against torch.nn, and exactly zero gradient on the
    padding."""
    I, H = 4, 5
    ref, fast = make_mode_pair(
        c["mode"],
        I,
        H,
        num_layers=c["layers"],
        bias=c["bias"],
        batch_first=c["batch_first"],
        bidirectional=c["bidirectional"],
        dtype=c["dtype"],
        **({"proj_size": c["proj"]} if c["proj"] else {}),
    )
    x, hx = make_inputs(
        c["mode"],
        T=c["T"],
        B=len(c["lengths"]),
        I=I,
        H=H,
        layers=c["layers"],
        bidirectional=c["bidirectional"],
        proj=c["proj"],
        batch_first=c["batch_first"],
        hx=c["hx"],
        dtype=c["dtype"],
    )
    fast_res, _ = compare_modules(
        ref, fast, x, hx, lengths=c["lengths"], enforce_sorted=c["enforce_sorted"]
    )
    # gradient of padding positions must be exactly zero
    gx = fast_res["grad_x"]
    for b, n in enumerate(c["lengths"]):
        pad = gx[b, n:] if c["batch_first"] else gx[n:, b]
        assert torch.count_nonzero(pad) == 0, f"non-zero gradient on padding of sequence {b}"
