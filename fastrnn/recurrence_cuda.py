"""The recurrence of one layer (all its directions) on a GPU: fastrnn's numba-cuda kernels on
torch tensors, with the same contract as `recurrence_cpu` (see `autograd` for the shapes).

Two strategies (`kernels/cuda/stepwise.py`, `kernels/cuda/persistent.py`):
- "persistent": one cooperative launch for the whole sequence, W_hh held in shared memory
  (opting in to the device's maximum, 227 KiB a block on an H100: LSTM / GRU / RNN up to
  H = 1024 on one direction). float32 / float16 / bfloat16 without a projection, when the
  hidden size fits (`persistent_plan`).
- "stepwise": per step, the recurrent product by cuBLAS (torch.mm; float32 sums for 16-bit
  data) and one fused pointwise kernel for all directions. Any dtype the kernels support and
  proj_size. Recurrent dropout and zoneout, the "reset before" GRU and the layer-norm LSTM run
  this way only, through the same loop (`_Steps`).
`set_cuda_strategy("auto" | "persistent" | "stepwise" | "torch")` (or FASTRNN_CUDA_STRATEGY)
picks one; "auto" takes the persistent kernel wherever it applies, "torch" leaves CUDA tensors to
torch's own implementation (cuDNN).

Interop: tensors go to the kernels zero-copy as device-array views of their memory (cached by
address, shape and dtype; no stream synchronisation), and the kernels run on torch's current
stream, so nothing in forward or backward synchronises with the host. numba-cuda's
low-occupancy warning is off for fastrnn's launches: their small grids are by design.

Tests run this module without a GPU: under Numba's simulator (NUMBA_ENABLE_CUDASIM=1) CPU
tensors are handed to the simulated kernels as numpy arrays, and torch's CPU ops stand in for
cuBLAS.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from types import SimpleNamespace

import numpy as np
import torch
from torch import Tensor

STRATEGIES = ("auto", "persistent", "stepwise", "torch")
# Under the simulator, blocks of 4 threads: every thread then loops over several (row, unit)
# items and the stepwise grids span several blocks, the code paths large sizes take on a GPU.
_SIMULATOR_THREADS = 4
# ... persistent grids of up to 3 blocks a direction (run as virtual blocks of one block), whose
# (row, unit) items go to groups of 2 threads (a warp of 32 on a GPU).
_SIMULATOR_BLOCKS = 3
_SIMULATOR_LANES = 2
_GPU_LANES = 32
# Shared memory a block may use without opting in to more (all CUDA devices since sm_20); the
# persistent kernels opt in to the device's maximum (227 KiB on an H100) where they need more.
_SHARED_BYTES = 48 * 1024

_LSTM, _GRU, _RNN = 0, 1, 2  # kernels/cuda/common.py's cell codes
# __cuda_array_interface__ type strings of the dtypes the kernels take (bfloat16 goes as int16)
_TYPESTR = {
    torch.float64: "<f8",
    torch.float32: "<f4",
    torch.float16: "<f2",
    torch.int16: "<i2",
    torch.int64: "<i8",
}
# "auto" leaves larger batches to the stepwise strategy: there cuBLAS's per-step GEMM has enough
# work, and each persistent thread would loop over several rows. A first guess, not a measured
# crossover (no GPU has run these kernels yet).
_PERSISTENT_MAX_BATCH = 64

_strategy = os.environ.get("FASTRNN_CUDA_STRATEGY", "auto")
_last_strategy: str | None = None


# What the layer Functions may leave out for these kernels (`autograd`; `recurrence_cpu` has its own
# values): caches in inference, the consumed states of dense input (read from y and h0), and the
# GRU recurrent gradient's r and z blocks (equal to the input side's).
SKIPS_INFERENCE_CACHES = False
DERIVES_DENSE_STATES = False
GRU_RECURRENT_N_ONLY = False


def panel_product(a: Tensor, b: Tensor, more: Tensor | None, out: Tensor) -> bool:
    """As `recurrence_cpu.panel_product`: never here (cuBLAS runs these products)."""
    return False


def set_cuda_strategy(name: str) -> None:
    """Choose how CUDA tensors run: "auto" (the default: fastrnn's kernels, persistent where it
    applies), "persistent" or "stepwise" (force one; "persistent" raises where it can't run), or
    "torch" (torch's own implementation, i.e. cuDNN, without a warning)."""
    global _strategy
    if name not in STRATEGIES:
        raise ValueError(f"fastrnn: cuda strategy must be one of {STRATEGIES}, got {name!r}")
    _strategy = name


def get_cuda_strategy() -> str:
    """The strategy setting ("auto", "persistent" or "stepwise")."""
    return _strategy


def last_cuda_strategy(reset: bool = False) -> str | None:
    """The strategy the most recent GPU layer forward ran ("persistent" / "stepwise"; None if
    none ran since the last reset). `reset=True` clears it after reading."""
    global _last_strategy
    strategy = _last_strategy
    if reset:
        _last_strategy = None
    return strategy


@functools.cache
def _cuda_modules() -> SimpleNamespace:
    """numba.cuda and fastrnn's CUDA kernel modules (imported on first use: numba-cuda is an
    optional dependency)."""
    from numba import config, cuda

    from .kernels.cuda import common, layernorm_lstm, persistent, stepwise

    return SimpleNamespace(
        cuda=cuda, simulated=bool(config.ENABLE_CUDASIM), common=common, persistent=persistent,
        stepwise=stepwise, layernorm_lstm=layernorm_lstm,
    )  # fmt: skip


@functools.cache
def unavailable_reason() -> str | None:
    """None when the GPU kernels can run on CUDA tensors here, else why not."""
    try:
        modules = _cuda_modules()
    except ImportError as error:
        return f"numba-cuda is not installed ({error}; pip install 'fastrnn[cuda]')"
    if modules.simulated:
        return "NUMBA_ENABLE_CUDASIM is set, so Numba can't launch on a real GPU"
    try:
        if not modules.cuda.is_available():
            return "Numba finds no usable CUDA driver/GPU"
    except Exception as error:  # a broken driver install raises here rather than returning False
        return f"Numba's CUDA initialisation failed: {error}"
    return None


def _to_device(values: np.ndarray, device: torch.device) -> Tensor:
    """A small host array on the GPU without synchronising: a copy from pageable memory would
    first wait for the stream, so it goes through torch's pinned-memory pool (which keeps the
    block alive until the copy has run)."""
    return torch.from_numpy(values).pin_memory().to(device, non_blocking=True)


def _simulated_device_array(values: np.ndarray):
    """The simulator's device array over a numpy array, sharing its memory. (Passing the numpy
    array itself would make the simulator copy it in and out per launch, and two arguments that
    are the same tensor, like LSTM's gate_cache as input and output, would become two copies.)"""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    return FakeCUDAArray(values)


@functools.lru_cache(maxsize=256)
def _device_view(pointer: int, shape: tuple, strides: tuple, typestr: str, device: int):
    """A numba device array over GPU memory, without an owner: it is only a pointer, a shape
    and a dtype, so a cached one stays right for whatever tensor later sits at that address
    (and keeps no tensor alive). Saves rebuilding ~15 of them per layer call."""
    desc = dict(shape=shape, strides=strides, typestr=typestr, data=(pointer, False), version=3)
    cuda = _cuda_modules().cuda
    with cuda.gpus[device]:  # the pointer belongs to that device's context
        return cuda.from_cuda_array_interface(desc, owner=None, sync=False)


@contextlib.contextmanager
def _no_occupancy_warning():
    """numba-cuda warns (NumbaPerformanceWarning) for every grid under 128 blocks when the
    launch is configured; the persistent grids and small stepwise grids all are, by design.
    The user's own setting is back in place as soon as the configuration exists."""
    from numba import config

    before = config.CUDA_LOW_OCCUPANCY_WARNINGS
    config.CUDA_LOW_OCCUPANCY_WARNINGS = 0
    try:
        yield
    finally:
        config.CUDA_LOW_OCCUPANCY_WARNINGS = before


class _Launch:
    """What every launch of one call shares: the stream, the compute dtype (float64 for float64
    data, else float32: 16-bit data widens on load, and recurrent products and the LSTM cell
    state are kept in it) and its `one`, threads per block, device arrays and launch
    configurations."""

    def __init__(self, like: Tensor):
        modules = _cuda_modules()
        self.device = like.device
        self.on_gpu = like.is_cuda
        self.compute = torch.float64 if like.dtype == torch.float64 else torch.float32
        self.one = np.ones(1, dtype=np.float64 if self.compute == torch.float64 else np.float32)[0]
        self.threads = modules.common.THREADS_PER_BLOCK if self.on_gpu else _SIMULATOR_THREADS
        if self.on_gpu:
            self.context = modules.cuda.gpus[like.device.index or 0]
            self.stream_pointer = torch.cuda.current_stream(like.device).cuda_stream
            with self.context:
                self.stream = modules.cuda.external_stream(self.stream_pointer)
        else:
            self.context = None
            self.stream, self.stream_pointer = 0, 0
        self.dtype = like.dtype
        self._configured = {}
        # The tensors behind this call's device views (which own nothing): alive until every
        # launch is queued; torch's allocator reuses their memory in stream order after that.
        self._keep: list[Tensor] = []

    def array(self, t: Tensor | None, ndim: int = 3, compute: bool = False):
        """Zero-copy kernel argument for a tensor (outputs are allocated contiguous, so only an
        input is ever copied here); None becomes a one-element dummy with `ndim` dimensions,
        in the storage dtype, or with `compute` the compute dtype (a dummy has the type of the
        array it stands for in other cells, so that every cell runs one compiled kernel)."""
        if t is None:
            dtype = self.compute if compute else self.dtype
            t = torch.zeros((1,) * ndim, dtype=dtype, device=self.device)
        t = t.detach().contiguous()
        if t.dtype == torch.bfloat16:  # the kernels take bfloat16 as its int16 bit patterns
            t = t.view(torch.int16)
        if self.on_gpu:
            self._keep.append(t)
            strides = tuple(s * t.element_size() for s in t.stride())
            index = t.device.index or 0
            return _device_view(t.data_ptr(), tuple(t.shape), strides, _TYPESTR[t.dtype], index)
        return _simulated_device_array(t.numpy())

    def run(self, kernel, blocks, threads, shared, *args):
        """Launch on torch's current stream; the configuration is made once per call (the
        stepwise strategy launches the same one every step)."""
        if self.context is None:  # the simulator's kernels keep their configuration themselves
            with _no_occupancy_warning():
                configured = kernel[blocks, threads, self.stream, shared]
            configured(*args)
            return
        key = (kernel, blocks, threads, shared)
        with self.context:
            configured = self._configured.get(key)
            if configured is None:
                with _no_occupancy_warning():
                    configured = kernel[blocks, threads, self.stream, shared]
                self._configured[key] = configured
            configured(*args)


def persistent_plan(
    hidden: int, width: int, gates: int, directions: int, blocks_available: int,
    shared_bytes: int = _SHARED_BYTES, partial_floats: int = 0,
) -> tuple[int, int] | None:  # fmt: skip
    """(units per block, blocks per direction) for the persistent kernels, or None where W_hh
    doesn't fit: each block keeps gates * units * width float32 of it in shared memory, beside
    at least two staged rows (backward's, gates * hidden floats each) and `partial_floats`
    (the simulator's group sums); every block of the grid must be resident at once
    (`blocks_available`)."""
    per_direction = blocks_available // directions
    if per_direction < 1:
        return None
    units = math.ceil(hidden / per_direction)
    weights = gates * units * max(width, hidden)
    staged = 2 * max(width, gates * hidden)  # a pair of rows (backward's are the longer)
    if (weights + staged + partial_floats) * 4 > shared_bytes:
        return None
    return units, math.ceil(hidden / units)


def _partials(threads: int) -> int:
    """Shared-memory floats of the persistent kernels' group sums (the simulator's only)."""
    return 4 * threads if _cuda_modules().simulated else 0


def _stage_rows(shared_bytes: int, weight_floats: int, row_floats: int, threads: int, batch: int):
    """Rows of the step's operand a persistent block stages at once: as many as fit, an even
    count (the kernels take rows in pairs), at least 2."""
    free = shared_bytes // 4 - weight_floats - _partials(threads)
    return max(2, 2 * ((min(batch + 1, free // row_floats)) // 2))


@functools.cache
def _multiprocessors(device_index: int) -> int:
    """Blocks a cooperative grid can always hold: one per SM (a 256-thread block with up to the
    opt-in shared memory always fits an SM)."""
    cuda = _cuda_modules().cuda
    with cuda.gpus[device_index]:
        return cuda.get_current_device().MULTIPROCESSOR_COUNT


# Devices where the shared-memory opt-in failed once: their plans stay within 48 KiB.
_opt_in_refused: set = set()


def _shared_limit(device_index: int) -> int:
    """Dynamic shared memory one block may opt in to on this device (48 KiB if unknown or
    refused)."""
    if device_index in _opt_in_refused:
        return _SHARED_BYTES
    return _device_shared_limit(device_index)


@functools.cache
def _device_shared_limit(device_index: int) -> int:
    cuda = _cuda_modules().cuda
    try:
        with cuda.gpus[device_index]:
            return int(cuda.get_current_device().MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
    except Exception:  # noqa: BLE001 - an old driver binding: stay within the default
        return _SHARED_BYTES


_opted_in: set = set()
_opted_in_calls: set = set()


def _allow_dynamic_shared(kernel, args: tuple, nbytes: int) -> None:
    """Let `kernel`, compiled for `args`, launch with `nbytes` (> 48 KiB) of dynamic shared
    memory: CUDA needs an explicit opt-in per kernel (MAX_DYNAMIC_SHARED_SIZE_BYTES), set once
    per compiled kernel to the device's maximum."""
    if nbytes <= _SHARED_BYTES:
        return
    from numba.cuda.cudadrv.driver import binding, driver

    overload = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
    cufunc = overload._codelibrary.get_cufunc()
    device = cufunc.device.id
    if (id(cufunc), device) in _opted_in:
        return
    attribute = binding.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
    driver.cuKernelSetAttribute(attribute, _shared_limit(device), cufunc.handle, device)
    _opted_in.add((id(cufunc), device))


def _choose(launch: _Launch, hidden, width, gates, directions, batch, dtype, projected):
    """("persistent", plan) or ("stepwise", None), honouring the user's setting."""
    plan = None
    if dtype in (torch.float32, torch.float16, torch.bfloat16) and not projected:
        if launch.on_gpu:
            index = launch.device.index or 0
            limit, blocks = _shared_limit(index), _multiprocessors(index)
            plan = persistent_plan(hidden, width, gates, directions, blocks, limit)
        else:  # simulator: up to 3 (virtual) blocks a direction, one launch per direction
            partials = _partials(_SIMULATOR_THREADS)
            plan = persistent_plan(
                hidden, width, gates, 1, _SIMULATOR_BLOCKS, partial_floats=partials
            )
    if _strategy == "persistent" and plan is None:
        raise RuntimeError(
            "fastrnn: the persistent CUDA kernel can't run this layer (it needs float32 or "
            "float16 / bfloat16, no "
            f"proj_size, and {gates} x hidden x hidden float32 weights split over the GPU's "
            "blocks within their shared memory); use set_cuda_strategy('auto') or 'stepwise'"
        )
    if _strategy == "stepwise" or plan is None:
        return "stepwise", None
    if _strategy != "persistent" and batch > _PERSISTENT_MAX_BATCH:
        return "stepwise", None
    return "persistent", plan


def persistent_launch(
    launch: _Launch, plan, threads: int, W_hh: Tensor, backward: bool, batch: int
) -> tuple[int, int, int]:
    """(lanes, stage rows, shared bytes a block) of a persistent launch. A block keeps
    G*H floats of W_hh per unit (W = H: no projection here) and stages rows of forward's
    h_{t-1} (W floats) or backward's gate gradients (G*H floats)."""
    units = plan[0]
    on_gpu = launch.on_gpu
    limit = _shared_limit(launch.device.index or 0) if on_gpu else _SHARED_BYTES
    weight_floats = units * W_hh.shape[1]
    row_floats = W_hh.shape[1] if backward else W_hh.shape[2]
    rows = _stage_rows(limit, weight_floats, row_floats, threads, batch)
    floats = weight_floats + rows * row_floats + _partials(threads)
    return (_GPU_LANES if on_gpu else _SIMULATOR_LANES), rows, 4 * floats


def _run_persistent(launch, kernel, plan, threads, backward, W_hh, h0, cell, relu, args) -> bool:
    """One cooperative grid (blocks per direction, directions) on a GPU. The simulator runs one
    block at a time, so there one launch per direction has a single block standing in for all
    of the direction's blocks (`virtual_blocks`). False (nothing launched) where the device
    refused the shared-memory opt-in: later plans stay within 48 KiB, and under "auto" the
    call goes on stepwise (both strategies fill the same caches)."""
    units, blocks = plan
    directions, batch = h0.shape[0], h0.shape[1]
    lanes, rows, shared = persistent_launch(launch, plan, threads, W_hh, backward, batch)
    if launch.on_gpu:
        full = (cell, relu, 0, 0, units, lanes, rows, *args)
        # all cells share one compiled kernel per dtype: one opt-in per (kernel, dtype, device)
        key = (kernel, launch.dtype, launch.device.index or 0)
        try:
            if shared > _SHARED_BYTES and key not in _opted_in_calls:
                with launch.context:
                    _allow_dynamic_shared(kernel, full, shared)
                _opted_in_calls.add(key)
        except Exception as error:  # noqa: BLE001 - any refusal: stay within the default
            _opt_in_refused.add(launch.device.index or 0)
            if _strategy == "persistent":
                raise RuntimeError(
                    f"fastrnn: the GPU refused {shared} bytes of shared memory for the "
                    f"persistent kernel ({type(error).__name__}: {error})"
                ) from error
            return False
        launch.run(kernel, (blocks, directions), threads, shared, *full)
    else:
        for d in range(directions):
            launch.run(
                kernel, (1, 1), threads * blocks, shared * blocks, cell, relu, d, blocks, units,
                lanes, rows, *args,
            )  # fmt: skip
    return True


def _setup(cell: int, W_hh: Tensor, W_hr: Tensor | None, h0: Tensor, stepwise_only=False):
    """What forward and backward both start from: (launch, hidden, strategy, plan). A layer
    that only runs stepwise (`stepwise_only`) still honours a forced "persistent" by raising
    where the persistent kernel couldn't run it."""
    launch = _Launch(h0)
    gates = _cuda_modules().common.GATES[cell]
    hidden = W_hh.shape[1] // gates
    strategy, plan = _choose(
        launch, hidden, W_hh.shape[2], gates, h0.shape[0], h0.shape[1], h0.dtype, W_hr is not None
    )
    return launch, hidden, "stepwise" if stepwise_only else strategy, plan


# A dense batch's step arrays on a GPU, by (steps, batch, device, stream): the same few recur
# call after call, and each saves two pinned host-to-device copies. (Kept per stream: the copy
# is ordered before the kernels of its own stream only.)
_dense_step_arrays: dict = {}


def _step_arrays(launch: _Launch, batch_sizes: np.ndarray, directions: int):
    """(rows, first row) of every direction's k-th processed step on the host, each (D, T)
    int64, and the batch sizes and step offsets as kernel arguments."""
    offsets = np.concatenate(([0], np.cumsum(batch_sizes)[:-1])).astype(np.int64)
    rows = np.stack([batch_sizes, batch_sizes[::-1]][:directions])
    firsts = np.stack([offsets, offsets[::-1]][:directions])
    values = (batch_sizes.astype(np.int64), offsets)
    if not launch.on_gpu:
        return rows, firsts, *map(_simulated_device_array, values)
    dense = batch_sizes.size > 0 and bool((batch_sizes == batch_sizes[0]).all())
    key = dense and (len(batch_sizes), batch_sizes[0], launch.device.index, launch.stream_pointer)
    tensors = _dense_step_arrays.get(key) if dense else None
    if tensors is None:
        tensors = tuple(_to_device(v, launch.device) for v in values)
        if dense:
            if len(_dense_step_arrays) >= 64:
                _dense_step_arrays.clear()
            _dense_step_arrays[key] = tensors
    return rows, firsts, *(launch.array(t, ndim=1) for t in tensors)


def _cell_state_buffer(state: Tensor | None, cell_cache: Tensor | None) -> Tensor | None:
    """Where LSTM's running c (or dc) lives: `state` itself, or a float32 buffer for 16-bit
    data (the cell state is kept in cell_cache's dtype); None for GRU and RNN."""
    if state is None or state.dtype == cell_cache.dtype:
        return state
    return torch.empty(state.shape, dtype=cell_cache.dtype, device=state.device)


# torch.mm(..., out_dtype=torch.float32) on CUDA (torch >= 2.8): 16-bit operands, cuBLAS's float32
# sums kept as they are. Switched off for the process if this torch lacks it.
_mm_out_dtype = True


def _product_operand(weights: Tensor, compute: torch.dtype) -> Tensor:
    """W_hh (or W_hr) as the per-step products take it: as it is where they can write their
    float32 sums directly (CUDA with out_dtype), else widened once per call."""
    if weights.dtype == compute or (weights.is_cuda and _mm_out_dtype):
        return weights
    return weights.to(compute)


def _product(a: Tensor, b: Tensor, out: Tensor, add=None, scale=None) -> None:
    """out = a @ b (* scale) (+ add) with `out` in the compute dtype: for 16-bit data the
    products reach the gate math as cuBLAS's float32 sums, not rounded to 16 bits first."""
    global _mm_out_dtype
    if a.dtype == b.dtype == out.dtype and scale is None:
        if add is None:
            torch.mm(a, b, out=out)
        else:
            torch.addmm(add, a, b, out=out)
        return
    done = False
    if a.dtype == b.dtype != out.dtype and a.is_cuda and _mm_out_dtype:
        try:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
            done = True
        except (RuntimeError, TypeError):  # a torch without mm's out_dtype: widen instead
            _mm_out_dtype = False
    if not done:
        torch.mm(a.to(out.dtype), b.to(out.dtype), out=out)
    if scale is not None:
        out.mul_(scale)
    if add is not None:
        out += add


class _Steps:
    """The stepwise strategy's loop over one call's processed steps, for every cell and variant:
    per step, stages in order, each a kernel launch or the step's products by cuBLAS for every
    direction (or any function of the step k)."""

    def __init__(self, launch: _Launch, batch_sizes: np.ndarray, h0: Tensor):
        self.launch, self.count = launch, len(batch_sizes)
        self.directions, self.batch = h0.shape[0], h0.shape[1]
        self.rows, self.firsts, self.sizes, self.offsets = _step_arrays(
            launch, batch_sizes, self.directions
        )

    def spans(self, k: int) -> list[tuple[int, int, int]]:
        """(direction, rows, first packed row) of every direction's k-th processed step."""
        return [(d, int(self.rows[d, k]), int(self.firsts[d, k])) for d in range(self.directions)]

    def kernel(self, kernel, width: int, *args):
        """A stage: `kernel` launched with (k, *args), a thread per (direction, row, unit <
        width)."""
        threads = self.launch.threads
        blocks = max(1, math.ceil(self.directions * self.batch * width / threads))
        return lambda k: self.launch.run(kernel, blocks, threads, 0, k, *args)

    def products(self, a: Tensor, b: Tensor, out: Tensor, packed=False, a_scale=None, **kwargs):
        """A stage: out[d, :n] = a_d @ b[d] by `_product` (kwargs: its scale and add, each
        taken [d, :n]) for every direction d with n rows at the step; a_d = a[d]'s rows of the
        step (its packed rows with `packed`, else the first n), times a_scale[d, :n] if given."""
        given = [(key, t) for key, t in kwargs.items() if t is not None]

        def run(k: int) -> None:
            for d, n, first in self.spans(k):
                rows = a[d, first : first + n] if packed else a[d, :n]
                if a_scale is not None:
                    rows = rows * a_scale[d, :n]
                _product(rows, b[d], out[d, :n], **{key: t[d, :n] for key, t in given})

        return run

    def run(self, stages: list, backward: bool = False) -> None:
        """Forward: every stage at steps 0..T-1. Backward: at steps T-1..0, then the first stage
        alone at k = -1 (it hands the gradients carried out of the first processed step to
        dh0)."""
        for k in range(self.count - 1, -1, -1) if backward else range(self.count):
            for stage in stages:
                stage(k)
        if backward:
            stages[0](-1)


def _masked_args(launch: _Launch, masks: tuple, h_cache: Tensor | None) -> list:
    """The masked kernels' zone_h, zone_c and h_cache (stand-ins where None) and their flags."""
    tensors = (masks[1], masks[2], h_cache)
    return [*map(launch.array, tensors), *(t is not None for t in tensors)]


def recurrence_forward(
    cell: int, relu: bool, batch_sizes: np.ndarray, W_hh: Tensor, W_hr: Tensor | None,
    b_hh: Tensor | None, h0: Tensor, c0: Tensor | None, inputs: Tensor, gate_cache: Tensor,
    cell_cache: Tensor | None, y: Tensor, h_n: Tensor, c_n: Tensor | None,
    masks: tuple | None = None, h_cache: Tensor | None = None,
) -> str:  # fmt: skip
    """Run the forward recurrence of any cell (layouts in `kernels/cuda/cells.py`); returns the
    strategy that ran. masks: recurrent dropout and zoneout, (h_mask (D, B, P), zone_h
    (D, N, P), zone_c (D, N, H)), each None when off: always stepwise, float32 / float64 data;
    h_cache (D, N, H): the RNN's states before zoneout, for a backward, or None."""
    global _last_strategy
    kernels = _cuda_modules()
    launch, hidden, strategy, plan = _setup(cell, W_hh, W_hr, h0, masks is not None)
    _last_strategy = strategy
    if h0.shape[1] == 0:  # an empty batch: nothing to launch (and no memory to hand to a kernel)
        return strategy
    steps = _Steps(launch, batch_sizes, h0)
    c_state = _cell_state_buffer(c_n, cell_cache)
    arr = launch.array
    caches = [arr(gate_cache), arr(cell_cache, compute=True), arr(c_state, compute=True)]
    if strategy == "persistent":
        args = [steps.sizes, steps.offsets, arr(W_hh), arr(b_hh, ndim=2), arr(h0), arr(c0)]
        args += [arr(inputs), *caches, arr(y), arr(h_n), launch.one]
        kernel = kernels.persistent.persistent_forward
        if _run_persistent(launch, kernel, plan, launch.threads, False, W_hh, h0, cell, relu, args):
            if c_state is not c_n:
                c_n.copy_(c_state)
            return strategy
        strategy = _last_strategy = "stepwise"

    h_n.copy_(h0)
    if c_n is not None:
        c_state.copy_(c0)
    h_mask, zone_h, _ = masks or (None, None, None)
    shape = (steps.directions, steps.batch)
    # the recurrent products in the compute dtype (float32 for 16-bit data)
    rec = torch.empty((*shape, W_hh.shape[1]), dtype=launch.compute, device=h0.device)
    h_raw = torch.empty((*shape, hidden), dtype=h0.dtype, device=h0.device)
    args = [cell, relu, hidden, steps.sizes, steps.offsets, W_hr is not None, arr(rec)]
    args += [arr(inputs), *caches, arr(b_hh, ndim=2), arr(h_n), arr(h_raw), arr(y), launch.one]
    kernel = kernels.stepwise.step_forward
    if masks is not None:
        kernel = kernels.stepwise.step_forward_masked
        args += _masked_args(launch, masks, h_cache)

    def project(k: int) -> None:  # h' = h_raw @ W_hr^T (zoned out with zone_h) into h_n and y
        for d, n, first in steps.spans(k):
            h = h_n[d, :n]
            if zone_h is None:
                torch.mm(h_raw[d, :n], W_hr[d].t(), out=h)
            else:
                keep = zone_h[d, first : first + n]
                h.copy_(keep * h + (1 - keep) * (h_raw[d, :n] @ W_hr[d].t()))
            y[d, first : first + n].copy_(h)

    weights = _product_operand(W_hh, launch.compute).transpose(1, 2)
    stages = [
        steps.products(h_n, weights, rec, a_scale=h_mask),
        steps.kernel(kernel, hidden, *args),
    ]
    steps.run(stages + ([project] if W_hr is not None else []))
    if c_state is not c_n:
        c_n.copy_(c_state)
    return strategy


def recurrence_backward(
    cell: int, relu: bool, batch_sizes: np.ndarray, W_hh: Tensor, W_hr: Tensor | None,
    h0: Tensor, c0: Tensor | None, y: Tensor, gate_cache: Tensor, cell_cache: Tensor | None,
    dy: Tensor, dh_n: Tensor, dc_n: Tensor | None, d_input: Tensor, d_recurrent: Tensor,
    dh_total: Tensor | None, dh0: Tensor, dc0: Tensor | None, masks: tuple | None = None,
    h_cache: Tensor | None = None,
) -> None:  # fmt: skip
    """Backward of `recurrence_forward`: the gate pre-activation gradients d_input (and for GRU
    d_recurrent; the same tensor otherwise), dh0, dc0, and with a projection dh_total (D, N, P),
    dL/dh of every row. With masks: dL/dh_prev = h_mask * (d_recurrent @ W_hh) + the kernel's
    direct part (+ zone_h dL/dh' with a projection, taken here before dL/dh' meets W_hr)."""
    kernels = _cuda_modules()
    launch, hidden, strategy, plan = _setup(cell, W_hh, W_hr, h0, masks is not None)
    if h0.shape[1] == 0:
        return
    steps = _Steps(launch, batch_sizes, h0)
    dc_state = _cell_state_buffer(dc0, cell_cache)  # dc runs from dc_n to dc0
    if dc_state is not None:
        dc_state.copy_(dc_n)
    shape = (steps.directions, steps.batch)
    # dL/dh_prev's parts in the compute dtype (float32 for 16-bit data), as the forward's products
    dh_direct = torch.zeros((*shape, hidden), dtype=launch.compute, device=h0.device)
    arr = launch.array
    grads = [arr(gate_cache), arr(cell_cache, compute=True), arr(dc_state, compute=True)]
    grads += [*map(arr, (d_input, d_recurrent, dh_direct, dh0)), launch.one]
    if strategy == "persistent":
        args = [steps.sizes, steps.offsets, *map(arr, (W_hh, h0, c0, dy, dh_n, y)), *grads]
        kernel = kernels.persistent.persistent_backward
        if _run_persistent(launch, kernel, plan, launch.threads, True, W_hh, h0, cell, relu, args):
            if dc_state is not dc0:
                dc0.copy_(dc_state)
            return

    h_mask, zone_h, _ = masks or (None, None, None)
    width = h0.shape[2]
    dh_rec = torch.empty((*shape, width), dtype=launch.compute, device=h0.device)
    dh_raw = torch.empty((*shape, hidden), dtype=launch.compute, device=h0.device)
    args = [cell, relu, hidden, steps.sizes, steps.offsets, W_hr is not None]
    args += [*map(arr, (dy, dh_n, dh_rec, dh_raw, h0, c0, y)), *grads]
    kernel = kernels.stepwise.step_backward
    if masks is not None:
        kernel = kernels.stepwise.step_backward_masked
        args += _masked_args(launch, masks, h_cache)
    # what dL/dh_prev has besides d_recurrent @ W_hh (the GRU's z * dh, zoneout's share)
    add = dh_direct if cell == _GRU or zone_h is not None else None
    stages = []
    if W_hr is not None:
        hidden_args = [steps.sizes, steps.offsets, *map(arr, (dy, dh_n, dh_rec, dh_total, dh0))]
        hidden_args.append(launch.one)
        projection = _product_operand(W_hr, launch.compute)
        add = None if zone_h is None else torch.zeros_like(dh_rec)

        def project(k: int) -> None:  # dh_raw = dL/dh' @ W_hr; zoneout's share set apart first
            for d, n, first in steps.spans(k):
                total = dh_total[d, first : first + n]
                if zone_h is not None:
                    keep = zone_h[d, first : first + n]
                    add[d, :n] = keep * total
                    total.mul_(1 - keep)
                _product(total, projection[d], dh_raw[d, :n])

        stages = [steps.kernel(kernels.stepwise.hidden_grad_step, width, *hidden_args), project]
    weights = _product_operand(W_hh, launch.compute)
    stages.append(steps.kernel(kernel, hidden, *args))
    stages.append(steps.products(d_recurrent, weights, dh_rec, packed=True, scale=h_mask, add=add))
    steps.run(stages, backward=True)
    if dc_state is not dc0:
        dc0.copy_(dc_state)


def _row_in_step(batch_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first row of every step, step of every packed row, its row within the step)."""
    offsets = np.concatenate(([0], np.cumsum(batch_sizes)[:-1])).astype(np.int64)
    step_of_row = np.repeat(np.arange(len(batch_sizes)), batch_sizes)
    return offsets, step_of_row, np.arange(int(batch_sizes.sum())) - offsets[step_of_row]


def previous_hidden(batch_sizes: np.ndarray, y: Tensor, h0: Tensor) -> Tensor:
    """h_prev (D, N, P): the hidden state each packed row consumed (the previous processed
    step's output of that row, or h0), gathered on the device for dW_hh = d^T h_prev."""
    directions, rows_total = y.shape[0], y.shape[1]
    steps = len(batch_sizes)
    batch = h0.shape[1]
    if steps and bool((batch_sizes == batch).all()):  # dense: whole steps shift by one
        forward = torch.cat([h0[0], y[0, : rows_total - batch]])
        if directions == 1:
            return forward.unsqueeze(0)
        return torch.stack([forward, torch.cat([y[1, batch:], h0[1]])])
    offsets, step_of_row, row_in_step = _row_in_step(batch_sizes)
    index = np.empty((directions, rows_total), dtype=np.int64)
    # direction 0 consumed step t - 1's output, direction 1 step t + 1's; h0's rows follow y's
    for d, shift in ((0, -1), (1, 1))[:directions]:
        source = step_of_row + shift
        clipped = np.clip(source, 0, steps - 1)
        valid = (source >= 0) & (source < steps) & (row_in_step < batch_sizes[clipped])
        index[d] = np.where(valid, offsets[clipped] + row_in_step, rows_total + row_in_step)
    index_t = _to_device(index, y.device) if y.is_cuda else torch.from_numpy(index)
    both = torch.cat([y, h0], dim=1)
    return torch.stack([both[d].index_select(0, index_t[d]) for d in range(directions)])


def _previous_states(h_prev: Tensor, batch_sizes, y: Tensor, h0: Tensor, masks) -> None:
    """h_prev = the states each row consumed (`previous_hidden`), as W_hh read them: times
    the recurrent dropout mask (D, B, P) of each row's sequence when there is one."""
    states = previous_hidden(batch_sizes, y, h0)
    if masks is not None and masks[0] is not None:
        row_in_step = torch.from_numpy(_row_in_step(batch_sizes)[2])
        states = states * masks[0].index_select(1, row_in_step.to(masks[0].device))
    h_prev.copy_(states)


# The per-cell entry points, with the same arguments as `recurrence_cpu`'s.


def fuses_input_projection(batch_sizes, x: Tensor, W_hh: Tensor, h0: Tensor) -> bool:
    """Never on the GPU: the input projection is one cuBLAS GEMM over all steps."""
    return False


def lstm_forward(
    batch_sizes, W_hh, W_hr, h0, c0, y, h_n, c_n, gate_cache, cell_cache, x=None, W_ih=None,
    bias=None, masks=None,
) -> None:  # fmt: skip
    """`recurrence_cpu.lstm_forward`'s arguments; x, W_ih and bias (a fused input projection)
    never come here (`fuses_input_projection` is False). masks: `recurrence_forward`'s."""
    recurrence_forward(
        _LSTM, False, batch_sizes, W_hh, W_hr, None, h0, c0, gate_cache, gate_cache,
        cell_cache, y, h_n, c_n, masks,
    )  # fmt: skip


def lstm_backward(
    batch_sizes, W_hh, W_hr, h0, c0, y, gate_cache, cell_cache, dy, dh_n, dc_n, d_gates, h_prev,
    dh_total, h_raw, dh0, dc0, masks=None,
) -> None:  # fmt: skip
    projected = W_hr is not None
    recurrence_backward(
        _LSTM, False, batch_sizes, W_hh, W_hr, h0, c0, y, gate_cache, cell_cache, dy, dh_n,
        dc_n, d_gates, d_gates, dh_total if projected else None, dh0, dc0, masks,
    )  # fmt: skip
    hidden = c0.shape[2]
    _previous_states(h_prev, batch_sizes, y, h0, masks)
    if projected:
        cells = cell_cache
        if masks is not None and masks[2] is not None:  # the cache holds c'; tanh reads c_new
            gates = gate_cache
            c_prev = previous_hidden(batch_sizes, cell_cache, c0)
            i, f, g = (gates[:, :, q * hidden : (q + 1) * hidden] for q in range(3))
            cells = f * c_prev + i * g
        torch.mul(gate_cache[:, :, 3 * hidden :], torch.tanh(cells), out=h_raw)


def gru_forward(
    batch_sizes, W_hh, b_hh, h0, projected, y, h_n, gate_cache, x=None, W_ih=None, bias=None,
    reset_before=False, masks=None,
) -> None:  # fmt: skip
    """`recurrence_cpu.gru_forward`'s arguments; reset_before: the "reset before" cell
    (`_gated_forward`)."""
    if b_hh is None:  # the kernel adds b_hn inside r * (W_hn h + b_hn)
        b_hh = W_hh.new_zeros((W_hh.shape[0], W_hh.shape[1]))
    if reset_before:
        _gated_forward(batch_sizes, W_hh, b_hh, h0, projected, gate_cache, y, h_n)
        return
    recurrence_forward(
        _GRU, False, batch_sizes, W_hh, None, b_hh, h0, None, projected, gate_cache, None, y,
        h_n, None, masks,
    )  # fmt: skip


def gru_backward(
    batch_sizes, W_hh, h0, y, gate_cache, dy, dh_n, h_prev, d_input, d_recurrent, dh0,
    reset_before=False, masks=None,
) -> None:  # fmt: skip
    """`recurrence_cpu.gru_backward`'s arguments; reset_before: the "reset before" cell, whose
    d_recurrent isn't written (`_gated_backward`)."""
    if reset_before:
        _gated_backward(batch_sizes, W_hh, h0, y, gate_cache, dy, dh_n, d_input, dh0)
        if h_prev.shape[1] > 0:
            h_prev.copy_(previous_hidden(batch_sizes, y, h0))
        return
    recurrence_backward(
        _GRU, False, batch_sizes, W_hh, None, h0, None, y, gate_cache, None, dy, dh_n, None,
        d_input, d_recurrent, None, dh0, None, masks,
    )  # fmt: skip
    _previous_states(h_prev, batch_sizes, y, h0, masks)


def _gated_forward(batch_sizes, W_hh, b_hh, h0, inputs, gate_cache, y, h_n) -> None:
    """The "reset before" GRU's forward (`kernels/cuda/stepwise.py`'s gated_* kernels), always
    stepwise: W_hn multiplies r * h, which needs this step's r, so each step has two products
    (no persistent kernel for it yet). Layouts as `recurrence_forward`'s for the GRU; gate_cache
    (D, N, 4H) out: r, z, n, r * h."""
    stepwise = _cuda_modules().stepwise
    launch, hidden, _, _ = _setup(_GRU, W_hh, None, h0, stepwise_only=True)
    if h0.shape[1] == 0:
        return
    steps = _Steps(launch, batch_sizes, h0)
    h_n.copy_(h0)
    shape, compute = (steps.directions, steps.batch), launch.compute
    rec = torch.empty((*shape, 2 * hidden), dtype=compute, device=h0.device)
    product = torch.empty((*shape, hidden), dtype=compute, device=h0.device)
    gated = torch.empty((*shape, hidden), dtype=h0.dtype, device=h0.device)
    weights = _product_operand(W_hh, compute).transpose(1, 2)
    arr = launch.array
    common = [hidden, steps.sizes, steps.offsets]
    shared = [arr(inputs), arr(gate_cache), arr(b_hh, ndim=2), arr(h_n)]
    steps.run([
        steps.products(h_n, weights[:, :, : 2 * hidden], rec),
        steps.kernel(stepwise.gated_step_gates, hidden, *common, arr(rec), *shared, arr(gated),
                     launch.one),
        steps.products(gated, weights[:, :, 2 * hidden :], product),
        steps.kernel(stepwise.gated_step_output, hidden, *common, arr(product), *shared, arr(y),
                     launch.one),
    ])  # fmt: skip


def _gated_backward(batch_sizes, W_hh, h0, y, gate_cache, dy, dh_n, d_input, dh0) -> None:
    """Backward of `_gated_forward`: d_input (D, N, 3H), the pre-activation gradients of both
    sides, and dh0."""
    stepwise = _cuda_modules().stepwise
    launch, hidden, _, _ = _setup(_GRU, W_hh, None, h0, stepwise_only=True)
    if h0.shape[1] == 0:
        return
    steps = _Steps(launch, batch_sizes, h0)
    shape = (steps.directions, steps.batch, hidden)
    dh_rec, gated_grads, through = (
        torch.empty(shape, dtype=launch.compute, device=h0.device) for _ in range(3)
    )
    dh_direct = torch.zeros(shape, dtype=launch.compute, device=h0.device)
    weights = _product_operand(W_hh, launch.compute)
    arr = launch.array
    common = [hidden, steps.sizes, steps.offsets]
    cache, inputs_grad, direct = arr(gate_cache), arr(d_input), arr(dh_direct)
    steps.run([
        steps.kernel(
            stepwise.gated_step_backward_output, hidden, *common,
            *map(arr, (dy, dh_n, dh_rec, h0, y)), cache, inputs_grad, arr(gated_grads), direct,
            arr(dh0), launch.one,
        ),
        steps.products(gated_grads, weights[:, 2 * hidden :], through),
        steps.kernel(stepwise.gated_step_backward_gates, hidden, *common, arr(through), cache,
                     inputs_grad, direct, launch.one),
        steps.products(d_input[:, :, : 2 * hidden], weights[:, : 2 * hidden], dh_rec, packed=True,
                       add=dh_direct),
    ], backward=True)  # fmt: skip


def rnn_forward(
    batch_sizes, relu, W_hh, h0, y, h_n, x=None, W_ih=None, bias=None, masks=None, gate_cache=None
) -> None:
    """masks and gate_cache: as `recurrence_cpu.rnn_forward`'s (`recurrence_forward`'s masks
    and h_cache)."""
    cache = gate_cache if gate_cache is not None and gate_cache.shape[1] > 0 else None
    recurrence_forward(
        _RNN, relu, batch_sizes, W_hh, None, None, h0, None, y, y, None, y, h_n, None, masks,
        cache,
    )  # fmt: skip


def rnn_backward(
    batch_sizes, relu, W_hh, h0, y, dy, dh_n, d_pre, h_prev, dh0, masks=None, gate_cache=None
) -> None:
    recurrence_backward(
        _RNN, relu, batch_sizes, W_hh, None, h0, None, y, y, None, dy, dh_n, None, d_pre, d_pre,
        None, dh0, None, masks, gate_cache,
    )  # fmt: skip
    _previous_states(h_prev, batch_sizes, y, h0, masks)


def layernorm_lstm_forward(
    batch_sizes, W_hh, consts, h0, c0, pre, y, h_n, c_n, gate_cache, cell_cache
) -> None:
    """`recurrence_cpu.layernorm_lstm_forward`'s arguments (float32 / float64; the caches
    always have their rows here: SKIPS_INFERENCE_CACHES is False). Stepwise: per step the
    recurrent products by cuBLAS, then one kernel with a thread per row
    (`kernels/cuda/layernorm_lstm`)."""
    global _last_strategy
    from .cells import LAYERNORM_EPS

    launch = _Launch(h0)
    _last_strategy = "stepwise"
    h_n.copy_(h0)
    c_n.copy_(c0)
    if h0.shape[1] == 0:
        return
    steps = _Steps(launch, batch_sizes, h0)
    hidden = h0.shape[2]
    rec = torch.empty((steps.directions, steps.batch, 4 * hidden), dtype=h0.dtype, device=h0.device)
    arr = launch.array
    args = [hidden, launch.one.dtype.type(LAYERNORM_EPS), steps.sizes, steps.offsets, arr(rec)]
    args += [arr(pre), arr(consts, ndim=2), *map(arr, (gate_cache, cell_cache, c_n, h_n, y))]
    kernel = _cuda_modules().layernorm_lstm.layernorm_lstm_step_forward
    steps.run(
        [steps.products(h_n, W_hh.transpose(1, 2), rec), steps.kernel(kernel, 1, *args, launch.one)]
    )


def layernorm_lstm_backward(
    batch_sizes, W_hh, h0, c0, y, gate_cache, cell_cache, dy, dh_n, dc_n, d_input, d_recurrent,
    h_prev, d_cell_norm, dh0, dc0,
) -> None:  # fmt: skip
    """`recurrence_cpu.layernorm_lstm_backward`'s arguments; per step (in reverse) one kernel
    launch, then dL/dh of the previous step = d_recurrent @ W_hh by cuBLAS."""
    launch = _Launch(h0)
    dc0.copy_(dc_n)  # dc runs from dc_n to dc0
    if h0.shape[1] > 0:
        steps = _Steps(launch, batch_sizes, h0)
        dh_rec = torch.zeros(h0.shape, dtype=h0.dtype, device=h0.device)
        arr = launch.array
        tensors = (dy, dh_n, dh_rec, c0, gate_cache, cell_cache, dc0, d_input, d_recurrent)
        args = [h0.shape[2], steps.sizes, steps.offsets, *map(arr, (*tensors, d_cell_norm, dh0))]
        kernel = _cuda_modules().layernorm_lstm.layernorm_lstm_step_backward
        stages = [steps.kernel(kernel, 1, *args, launch.one)]
        steps.run(stages + [steps.products(d_recurrent, W_hh, dh_rec, packed=True)], backward=True)
    h_prev.copy_(previous_hidden(batch_sizes, y, h0))
