"""The recurrence of one layer (all its directions) on the CPU: fastrnn's Numba kernels on zero-copy
numpy views of torch tensors. Same functions and arguments as `recurrence_cuda`; shapes in
`autograd` and `kernels/cpu/`.

The kernels spread directions and row chunks of the batch over `torch.get_num_threads()` threads
(capped by Numba's pool); the per-step products are the kernels' own (`kernels/cpu/panel_matmul`),
so no BLAS runs inside them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Iterator

import numba
import numpy as np
import torch
from torch import Tensor

from .kernels.cpu import gru as _gru_kernels
from .kernels.cpu import gru_masked as _gru_masked_kernels
from .kernels.cpu import gru_reset_before as _gru_reset_before_kernels
from .kernels.cpu import layernorm_lstm as _layernorm_lstm_kernels
from .kernels.cpu import lstm as _lstm_kernels
from .kernels.cpu import lstm_masked as _lstm_masked_kernels
from .kernels.cpu import rnn as _rnn_kernels
from .kernels.cpu import rnn_masked as _rnn_masked_kernels
from .kernels.cpu.common import PANEL_PRODUCTS, WIDE_ROWS
from .kernels.cpu.common import fuses_input_projection as _fuses_input_projection
from .kernels.cpu.gru import gru_backward as _gru_backward
from .kernels.cpu.gru import gru_forward as _gru_forward
from .kernels.cpu.gru_masked import gru_masked_backward as _gru_masked_backward
from .kernels.cpu.gru_masked import gru_masked_forward as _gru_masked_forward
from .kernels.cpu.gru_reset_before import gru_reset_before_backward as _gru_reset_before_backward
from .kernels.cpu.gru_reset_before import gru_reset_before_forward as _gru_reset_before_forward
from .kernels.cpu.layernorm_lstm import layernorm_lstm_backward as _layernorm_lstm_backward
from .kernels.cpu.layernorm_lstm import layernorm_lstm_forward as _layernorm_lstm_forward
from .kernels.cpu.lstm import lstm_backward as _lstm_backward
from .kernels.cpu.lstm import lstm_forward as _lstm_forward
from .kernels.cpu.lstm_masked import lstm_masked_backward as _lstm_masked_backward
from .kernels.cpu.lstm_masked import lstm_masked_forward as _lstm_masked_forward
from .kernels.cpu.panel_matmul import matmul as _matmul
from .kernels.cpu.rnn import rnn_backward as _rnn_backward
from .kernels.cpu.rnn import rnn_forward as _rnn_forward
from .kernels.cpu.rnn_masked import rnn_masked_backward as _rnn_masked_backward
from .kernels.cpu.rnn_masked import rnn_masked_forward as _rnn_masked_forward
from .kernels.cpu.runtime import prefer_openmp_threading_layer, prefer_workqueue_threading_layer

prefer_openmp_threading_layer()

# Set in a process forked from this one (`_after_fork_in_child`): its kernels then run on one
# thread, without a parallel region.
_forked = False
_serial = False  # inside `serial_kernels`
_warned: set[str] = set()
_FORKED_WARNING = (
    "fastrnn: this process was forked from one that had imported fastrnn, and GNU OpenMP "
    "(torch's and Numba's thread pools) can't run a parallel region after fork(), so fastrnn's "
    "kernels run on one thread here. Start worker processes with the 'spawn' or 'forkserver' "
    "method to keep them multi-threaded."
)


# What the layer Functions may leave out for these kernels (`autograd`; `recurrence_cuda` has
# its own values): caches in inference, the consumed states of dense input (read from y and h0),
# and the GRU recurrent gradient's r and z blocks (equal to the input side's).
SKIPS_INFERENCE_CACHES = True
DERIVES_DENSE_STATES = True
GRU_RECURRENT_N_ONLY = True


def _kernel_set(serial: bool) -> dict:
    """The kernels this module calls, by their global names here: the parallel ones, or
    their serial twins (`kernels/cpu/runtime.serial_twin`)."""
    suffix = "_serial" if serial else ""
    kernels = {}
    cells = (
        (_lstm_kernels, "lstm"),
        (_gru_kernels, "gru"),
        (_gru_reset_before_kernels, "gru_reset_before"),
        (_rnn_kernels, "rnn"),
        (_layernorm_lstm_kernels, "layernorm_lstm"),
        (_lstm_masked_kernels, "lstm_masked"),
        (_gru_masked_kernels, "gru_masked"),
        (_rnn_masked_kernels, "rnn_masked"),
    )
    for module, cell in cells:
        for part in ("forward", "backward"):
            kernels[f"_{cell}_{part}"] = getattr(module, f"{cell}_{part}{suffix}")
    return kernels


def _after_fork_in_child() -> None:
    """A child of fork() inherits the parent's OpenMP state but not its threads: GNU OpenMP's
    next parallel region there hangs (the parent had run torch's pool) or Numba terminates the
    child ("fork() called from a process already using GNU OpenMP", the parent had run a
    kernel), while torch itself carries on. So the child runs the kernels' serial twins
    (`kernels/cpu/runtime.serial_twin`) on one thread, as in torch's Hogwild example
    (`torch.multiprocessing` training processes forked from the main one)."""
    global _forked
    _forked = True
    globals().update(_kernel_set(serial=True))


@contextlib.contextmanager
def serial_kernels() -> Iterator[None]:
    """Run the serial twins on one thread inside this block, as a forked child does
    (`python -m fastrnn.precompile --forked` compiles them into the cache this way)."""
    global _serial
    before = _serial
    _serial = True
    globals().update(_kernel_set(serial=True))
    try:
        yield
    finally:
        _serial = before
        if not (_forked or before):
            globals().update(_kernel_set(serial=False))


if hasattr(os, "register_at_fork"):  # not on Windows, which has no fork()
    os.register_at_fork(after_in_child=_after_fork_in_child)


def available_cpus() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


# More threads than CPUs never helps, and it would hurt the batch-1 helpers, which spin while
# they wait for the owner (`kernels/cpu/shared_product.py`).
_CPUS = available_cpus()


try:  # Numba's reader of its thread count, for `_numba_threads`
    from numba.np.ufunc import parallel as _numba_parallel
except ImportError:  # pragma: no cover - another Numba layout
    _numba_parallel = None


def _numba_threads() -> int:
    """`numba.get_num_threads()` without its two locks once Numba's pool has started: that call
    cost ~7 us of a batch-1 RNN forward's ~100 us of Python (1 us in a tight loop), its C
    reader alone 0.14 us. Numba's public function before the pool starts, or if its
    internals move."""
    reader = getattr(_numba_parallel, "_get_num_threads", None)
    if reader is not None and getattr(_numba_parallel, "_is_initialized", False):
        return reader()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        prefer_workqueue_threading_layer()  # the pool starts below: see the function
    wanted = torch.get_num_threads()
    threads = numba.get_num_threads()
    # Starting Numba's OpenMP pool sets the process's OpenMP thread count, which is torch's
    # setting too (numba issue 9387): a user's torch.set_num_threads(1) became 2.
    if torch.get_num_threads() != wanted:
        torch.set_num_threads(wanted)
    return threads


def _threads() -> int:
    """Threads the kernels may use: torch's setting (what users tune), capped by Numba's pool and
    by the CPUs this process may run on; one in a forked process (see `_after_fork_in_child`),
    saying so once if torch would use more."""
    if _forked:
        if torch.get_num_threads() > 1 and _FORKED_WARNING not in _warned:
            _warned.add(_FORKED_WARNING)
            warnings.warn(_FORKED_WARNING, RuntimeWarning, stacklevel=2)
        return 1
    if _serial:
        return 1
    return max(1, min(torch.get_num_threads(), _numba_threads(), _CPUS))


def numpy_view(t: Tensor) -> np.ndarray:
    """Zero-copy numpy view of a tensor's data (copied first only if not contiguous).
    `numpy(force=True)` detaches in C++: 1.3 us against 1.9 for `detach().numpy()`, and a
    batch-1 fwd+bwd converts ~20 tensors."""
    if not t.is_contiguous():
        t = t.contiguous()
    return t.numpy(force=True)


NUMPY_DTYPES = {torch.float32: np.dtype(np.float32), torch.float64: np.dtype(np.float64)}


@functools.lru_cache(maxsize=64)
def empty_array(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An array with no elements for an absent argument (W_hr, the unfused projection's x,
    W_ih and bias), made once: np.empty costs ~1 us, and a batch-1 call makes up to four."""
    return np.empty(shape, dtype)


def _np_or_empty(W: Tensor | None, shape: tuple[int, ...], like: Tensor) -> np.ndarray:
    return numpy_view(W) if W is not None else empty_array(shape, NUMPY_DTYPES[like.dtype])


def fuses_input_projection(batch_sizes, x: Tensor, W_hh: Tensor, h0: Tensor) -> bool:
    """Whether `lstm_forward` / `gru_forward` / `rnn_forward` should get x, W_ih and bias to
    compute the input projection in their per-step products, rather than gate_cache / projected /
    y filled with it (the kernels' rule, `kernels.cpu.common.fuses_input_projection`).

    The rule is asked for the CPUs this process may use, not the thread setting of this call:
    the fused product sums [x | h] in one FMA chain where torch's GEMM sums x's part apart, so a
    decision that followed the thread count gave other bits with 1 thread than with 2."""
    batch = int(batch_sizes[0])
    if batch < WIDE_ROWS:
        return False  # the rule's row chunks never have more rows than the batch
    return _fuses_input_projection(
        batch,
        W_hh.shape[0],
        _CPUS,
        x.shape[1],
        h0.shape[2],
        W_hh.shape[1],
        x.element_size(),
    )


def _fused_inputs(x, W_ih, bias, directions: int, dtype) -> tuple[np.ndarray, ...]:
    """(x, W_ih, bias) for a forward kernel: the arrays to fuse the input projection, or empty
    ones of the same types when it isn't (one compiled form of each kernel serves both)."""
    if W_ih is None:
        return (
            empty_array((0, 0), dtype),
            empty_array((directions, 0, 0), dtype),
            empty_array((directions, 0), dtype),
        )
    bias_np = numpy_view(bias) if bias is not None else np.zeros(W_ih.shape[:2], dtype)
    return numpy_view(x), numpy_view(W_ih), bias_np


def _nothing(directions: int, like: Tensor, width: int = 0) -> np.ndarray:
    """(D, 0, width): an array argument that a cell's kernels take but don't use
    (`kernels/cpu/recurrence`: one argument list for every cell)."""
    return empty_array((directions, 0, width), NUMPY_DTYPES[like.dtype])


def _mask_arrays(masks, directions: int, width: int, hidden: int, like: Tensor) -> tuple:
    """(h_mask, zone_h, zone_c) as the masked kernels take them (`kernels/cpu/recurrence`):
    numpy views, or arrays with no rows for those that are None (off)."""
    h_mask, zone_h, zone_c = masks
    dtype = NUMPY_DTYPES[like.dtype]
    return (
        numpy_view(h_mask) if h_mask is not None else empty_array((directions, 0, width), dtype),
        numpy_view(zone_h) if zone_h is not None else empty_array((directions, 0, width), dtype),
        numpy_view(zone_c) if zone_c is not None else empty_array((directions, 0, hidden), dtype),
    )


def panel_product(a: Tensor, b: Tensor, more: Tensor | None, out: Tensor) -> bool:
    """out (M, N) = a (M, K) @ b (K, N), or with `more` (K2, N) a (M, K + K2) @ [b; more], on
    the kernels' panel product, every output one k-ordered sum whatever the thread count; only
    float32 on the CPUs where it beats torch's GEMM (`kernels.cpu.common.panel_products_fit`).
    False: not done here (the caller runs torch's GEMM)."""
    if not (PANEL_PRODUCTS and a.dtype == torch.float32 and a.shape[0] > 0):
        return False
    rest = numpy_view(more) if more is not None else empty_array((0, b.shape[1]), np.float32)
    _matmul(a.numpy(force=True), numpy_view(b), rest, out.numpy(), _threads())
    return True


def _launch(kernel, masked, masks, like: Tensor, width: int, hidden: int, *args) -> None:
    """kernel(*args, threads), or with masks (h_mask, zone_h, zone_c) its masked twin with
    their arrays (`_mask_arrays`: D from like (D, B, P), width P, hidden H)."""
    if masks is None:
        kernel(*args, _threads())
    else:
        arrays = _mask_arrays(masks, like.shape[0], width, hidden, like)
        masked(*args, _threads(), arrays)


def lstm_forward(
    batch_sizes, W_hh, W_hr, h0, c0, y, h_n, c_n, gate_cache, cell_cache, x=None, W_ih=None,
    bias=None, masks=None,
) -> None:  # fmt: skip
    """As `recurrence_cuda.lstm_forward`; given x (N, I), W_ih (D, 4H, I) and bias (D, 4H) or
    None, the kernel computes the input projection itself and gate_cache isn't read. masks:
    (h_mask, zone_h, zone_c), each a tensor or None (`kernels/cpu/lstm_masked`), or None."""
    directions, hidden = W_hh.shape[0], c0.shape[2]
    dtype = NUMPY_DTYPES[h0.dtype]
    gates = gate_cache.numpy()
    _launch(
        _lstm_forward, _lstm_masked_forward, masks, h0, h0.shape[2], hidden,
        batch_sizes, False, *_fused_inputs(x, W_ih, bias, directions, dtype), numpy_view(W_hh),
        empty_array((directions, 0), dtype), _np_or_empty(W_hr, (directions, 0, hidden), h0),
        numpy_view(h0), numpy_view(c0), gates, y.numpy(), h_n.numpy(), c_n.numpy(), gates,
        cell_cache.numpy(),
    )  # fmt: skip


def lstm_backward(
    batch_sizes, W_hh, W_hr, h0, c0, y, gate_cache, cell_cache, dy, dh_n, dc_n, d_gates, h_prev,
    dh_total, h_raw, dh0, dc0, masks=None,
) -> None:  # fmt: skip
    directions, hidden = W_hh.shape[0], c0.shape[2]
    _launch(
        _lstm_backward, _lstm_masked_backward, masks, h0, h0.shape[2], hidden,
        batch_sizes, False, numpy_view(W_hh), _np_or_empty(W_hr, (directions, 0, hidden), h0),
        numpy_view(h0), numpy_view(c0), numpy_view(y), gate_cache.numpy(), cell_cache.numpy(),
        numpy_view(dy), numpy_view(dh_n), numpy_view(dc_n), d_gates.numpy(),
        _nothing(directions, h0, hidden), h_prev.numpy(), dh_total.numpy(), h_raw.numpy(),
        dh0.numpy(), dc0.numpy(),
    )  # fmt: skip


def gru_forward(
    batch_sizes, W_hh, b_hh, h0, projected, y, h_n, gate_cache, x=None, W_ih=None, bias=None,
    reset_before=False, masks=None,
) -> None:  # fmt: skip
    """As `recurrence_cuda.gru_forward`; given x (N, I), W_ih (D, 3H, I) and bias = b_ih (D, 3H)
    or None, the kernel computes the input projection step by step and `projected` isn't read.
    reset_before: the "reset before" cell (`kernels.cpu.gru_reset_before`; gate_cache keeps
    r * h in its last block). masks: as `lstm_forward`'s (zone_c None)."""
    directions, hidden = W_hh.shape[0], W_hh.shape[2]
    dtype = NUMPY_DTYPES[h0.dtype]
    if b_hh is not None:
        b_hh_np = numpy_view(b_hh)
    else:
        b_hh_np = np.zeros((directions, 3 * hidden), dtype=dtype)
    no_cell = _nothing(directions, h0)
    _launch(
        _gru_reset_before_forward if reset_before else _gru_forward, _gru_masked_forward, masks,
        h0, hidden, 0,
        batch_sizes, False, *_fused_inputs(x, W_ih, bias, directions, dtype), numpy_view(W_hh),
        b_hh_np, _nothing(directions, h0, hidden), numpy_view(h0), no_cell, projected.numpy(),
        y.numpy(), h_n.numpy(), no_cell, gate_cache.numpy(), no_cell,
    )  # fmt: skip


def gru_backward(
    batch_sizes, W_hh, h0, y, gate_cache, dy, dh_n, h_prev, d_input, d_recurrent, dh0,
    reset_before=False, masks=None,
) -> None:  # fmt: skip
    """As `recurrence_cuda.gru_backward`; reset_before: the "reset before" cell, whose
    d_recurrent (D, 0, H) isn't written (`kernels.cpu.gru_reset_before`); masks: as
    `lstm_forward`'s (zone_c None)."""
    directions, hidden = W_hh.shape[0], W_hh.shape[2]
    no_cell, no_proj = _nothing(directions, h0), _nothing(directions, h0, hidden)
    _launch(
        _gru_reset_before_backward if reset_before else _gru_backward, _gru_masked_backward,
        masks, h0, hidden, 0,
        batch_sizes, False, numpy_view(W_hh), no_proj, numpy_view(h0), no_cell, numpy_view(y),
        gate_cache.numpy(), no_cell, numpy_view(dy), numpy_view(dh_n), no_cell, d_input.numpy(),
        d_recurrent.numpy(), h_prev.numpy(), no_proj, no_proj, dh0.numpy(), no_cell,
    )  # fmt: skip


def rnn_forward(
    batch_sizes, relu, W_hh, h0, y, h_n, x=None, W_ih=None, bias=None, masks=None, gate_cache=None
) -> None:
    """As `recurrence_cuda.rnn_forward`; given x (N, I), W_ih (D, H, I) and bias (D, H) or None,
    the kernel computes the input projection itself and y's input isn't read. masks: as
    `lstm_forward`'s (zone_c None); with zoneout, gate_cache (D, N, H) keeps each row's state
    before zoneout for a backward (`kernels/cpu/rnn_masked`; None or no rows: not kept)."""
    directions, hidden = W_hh.shape[0], W_hh.shape[2]
    dtype = NUMPY_DTYPES[h0.dtype]
    no_cell = _nothing(directions, h0)
    cache = gate_cache.numpy() if masks is not None and gate_cache is not None else no_cell
    out = y.numpy()
    _launch(
        _rnn_forward, _rnn_masked_forward, masks, h0, hidden, 0,
        batch_sizes, relu, *_fused_inputs(x, W_ih, bias, directions, dtype), numpy_view(W_hh),
        empty_array((directions, 0), dtype), _nothing(directions, h0, hidden), numpy_view(h0),
        no_cell, out, out, h_n.numpy(), no_cell, cache, no_cell,
    )  # fmt: skip


def rnn_backward(
    batch_sizes, relu, W_hh, h0, y, dy, dh_n, d_pre, h_prev, dh0, masks=None, gate_cache=None
) -> None:
    """As `recurrence_cuda.rnn_backward`; masks and gate_cache as `rnn_forward`'s."""
    directions, hidden = W_hh.shape[0], W_hh.shape[2]
    no_cell, no_proj = _nothing(directions, h0), _nothing(directions, h0, hidden)
    cache = gate_cache.numpy() if masks is not None and gate_cache is not None else no_cell
    _launch(
        _rnn_backward, _rnn_masked_backward, masks, h0, hidden, 0,
        batch_sizes, relu, numpy_view(W_hh), no_proj, numpy_view(h0), no_cell, numpy_view(y),
        cache, no_cell, numpy_view(dy), numpy_view(dh_n), no_cell, d_pre.numpy(), no_proj,
        h_prev.numpy(), no_proj, no_proj, dh0.numpy(), no_cell,
    )  # fmt: skip


def layernorm_lstm_forward(
    batch_sizes, W_hh, consts, h0, c0, pre, y, h_n, c_n, gate_cache, cell_cache
) -> None:
    """The layer-norm LSTM's recurrence (`kernels/cpu/layernorm_lstm`): W_hh (D, 4H, H);
    consts (D, 6H) = gain_hh, gain_c, bias_c; pre (D, N, 4H) the input side with every bias;
    out y (D, N, H), h_n, c_n (D, B, H), gate_cache (D, N + 1, 9H + 2) (row N: the caller's
    consts) and cell_cache (D, N, H), or both with no rows (inference)."""
    directions, hidden = W_hh.shape[0], c0.shape[2]
    _layernorm_lstm_forward(
        batch_sizes, False, *_fused_inputs(None, None, None, directions, NUMPY_DTYPES[h0.dtype]),
        numpy_view(W_hh), numpy_view(consts), _nothing(directions, h0, hidden), numpy_view(h0),
        numpy_view(c0), numpy_view(pre), y.numpy(), h_n.numpy(), c_n.numpy(), gate_cache.numpy(),
        cell_cache.numpy(), _threads(),
    )  # fmt: skip


def layernorm_lstm_backward(
    batch_sizes, W_hh, h0, c0, y, gate_cache, cell_cache, dy, dh_n, dc_n, d_input, d_recurrent,
    h_prev, d_cell_norm, dh0, dc0,
) -> None:  # fmt: skip
    """Backward of `layernorm_lstm_forward`: out d_input (D, N, 4H) (the gates'
    pre-activations), d_recurrent (D, N, 4H) (W_hh h's, before its norm), h_prev (D, N, H) or
    (D, 0, H), d_cell_norm (D, N, H) (dL/d LN_c(c')), dh0, dc0 (D, B, H)."""
    directions, hidden = W_hh.shape[0], c0.shape[2]
    no_proj = _nothing(directions, h0, hidden)
    _layernorm_lstm_backward(
        batch_sizes, False, numpy_view(W_hh), no_proj, numpy_view(h0), numpy_view(c0),
        numpy_view(y), gate_cache.numpy(), cell_cache.numpy(), numpy_view(dy), numpy_view(dh_n),
        numpy_view(dc_n), d_input.numpy(), d_recurrent.numpy(), h_prev.numpy(),
        d_cell_norm.numpy(), no_proj, dh0.numpy(), dc0.numpy(), _threads(),
    )  # fmt: skip
