"""GRU recurrence (PyTorch/cuDNN "reset after" form), one layer and one direction.

Gate order r, z, n (torch's):
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
    h' = (1 - z) * n + z * h
The kernels `gru_forward` / `gru_backward` are `recurrence.layer_forward` / `layer_backward`
for this cell, with (shapes there): c0, c_n, dc_n, dc0 (D, B, 0); pre (D, N, 3H) =
x @ W_ih^T + b_ih (not read when fused: the input projection is then a product of its own each
step, with b_ih (D, 3H)); b_hh (D, 3H) (zeros without bias); cell_cache (D, 0, 0);
gate_cache (D, N, 4H) out: r, z, n and W_hn h + b_hn of every row (backward needs the last),
with no rows in inference (not written). Backward: d_input (D, N, 3H) the input side's
pre-activation gradients, dn_recurrent (D, N, H) the n block of the recurrent side's (dn scaled
by r; its r and z blocks are d_input's). So, per direction, dW_ih = d_input^T x,
db_ih = sum(d_input), dx = d_input W_ih, and with d_recurrent = d_input whose n block is
replaced by dn_recurrent, dW_hh = d_recurrent^T h_prev and db_hh = sum(d_recurrent). (A full
recurrent-side copy cost N x 2H floats more: 26 MB of a T100 B64 H512 fwd+bwd.)
"""

from __future__ import annotations

import sys

from numba import njit

from ..math import sigmoid, tanh
from .common import ROW_JIT_OPTIONS, STEP_JIT_OPTIONS, consumed_row, copy_row, scalar
from .recurrence import instantiate

_STEP = STEP_JIT_OPTIONS
_ROW = ROW_JIT_OPTIONS

# The cell's traits (see `recurrence`): the n gate needs the input and recurrent sides apart, so
# a fused input projection is a product of its own, and W_hh sees r * dn, not dn.
GATES = 3
JOINT_INPUT = False
SPLITS_UNITS = False
SEPARATE_RECURRENT_GRADIENT = True


@njit(**_ROW)
def gru_forward_row(xp, rec, b_hh, cache, h_row, hidden, one, keep_cache):
    """One row's gate math. xp (3H): x W_ih^T + b_ih; rec (3H): W_hh h (no bias); b_hh (3H);
    cache (4H) out: r, z, n, W_hn h + b_hn, written only with keep_cache (inference needs no
    cache); h_row (H): h in, h' out. Callers pass keep_cache as a literal True or False: each
    compiled form then has no branch in the loop (a runtime branch there stopped LLVM from
    vectorising it: 2x slower)."""
    for j in range(hidden):
        reset = sigmoid(xp[j] + rec[j] + b_hh[j])
        update = sigmoid(xp[hidden + j] + rec[hidden + j] + b_hh[hidden + j])
        hn = rec[2 * hidden + j] + b_hh[2 * hidden + j]
        n = tanh(xp[2 * hidden + j] + reset * hn)
        if keep_cache:
            cache[j] = reset
            cache[hidden + j] = update
            cache[2 * hidden + j] = n
            cache[3 * hidden + j] = hn
        h_row[j] = (one - update) * n + update * h_row[j]


@njit(**_ROW)
def gru_backward_row(cache, h_prev, dh_row, d_input, d_recurrent, hidden, one):
    """Backward of `gru_forward_row`: cache (4H) as written there, h_prev (H) = h;
    dh_row (H): dL/dh' in, out the part of dL/dh that skips W_hh (z * dL/dh'); d_input and
    d_recurrent (3H) out: the pre-activation gradients on the input and the recurrent side
    (they differ in the n block, scaled by r on the recurrent side)."""
    for j in range(hidden):
        reset = cache[j]
        update = cache[hidden + j]
        n = cache[2 * hidden + j]
        hn = cache[3 * hidden + j]
        dh = dh_row[j]
        dn = dh * (one - update) * (one - n * n)
        dz = dh * (h_prev[j] - n) * update * (one - update)
        d_reset = dn * hn * reset * (one - reset)
        d_input[j] = d_reset
        d_input[hidden + j] = dz
        d_input[2 * hidden + j] = dn
        d_recurrent[j] = d_reset
        d_recurrent[hidden + j] = dz
        d_recurrent[2 * hidden + j] = dn * reset
        dh_row[j] = dh * update


@njit(**_STEP)
def forward_rows(a, off, first, end, unit, end_unit, fused, variant):
    """One step's rows first..end-1 at row offset `off` (`recurrence.Forward` a): the input
    side from pre (fused: x_side, this step's own product), the recurrent side from
    `a.recurrent` and b_hh; h' into h_n and y, the cache unless inference."""
    hidden = a.h_n.shape[1]
    one = scalar(a.y, 1)
    keep_cache = a.gate_cache.shape[0] > 0  # no rows: inference, nothing kept for a backward
    for r in range(first, end):
        h_row = a.h_n[r]
        pre = a.x_side[r] if fused else a.pre[off + r]
        if keep_cache:
            cache = a.gate_cache[off + r]
            gru_forward_row(pre, a.recurrent[r], a.b_hh, cache, h_row, hidden, one, True)
        else:  # no cache to write: b_hh stands in for the unused cache row
            gru_forward_row(pre, a.recurrent[r], a.b_hh, a.b_hh, h_row, hidden, one, False)
        copy_row(a.y[off + r], h_row)


@njit(**_STEP)
def backward_rows(a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant):
    """One step's gate gradients for rows first..end-1 (`recurrence.Backward` a) from dh
    (= dh0, dL/dh'): d_input, the recurrent side's rows (rec_grads, for the product with W_hh)
    and their n block (dn_recurrent); dh keeps z * dL/dh', the part that skips W_hh."""
    hidden = a.h0.shape[1]
    one = scalar(a.y, 1)
    for r in range(first, end):
        consumed = consumed_row(a.y, a.h0, offsets, prev, prev_rows, r)
        rec = a.rec_grads[r]
        gru_backward_row(
            a.gate_cache[off + r], consumed, dh[r], a.d_input[off + r], rec, hidden, one
        )
        copy_row(a.dn_recurrent[off + r], rec[2 * hidden :])


# The kernels, and their twins without a parallel region for forked processes
# (`runtime.serial_twin`).
_kernels = instantiate(sys.modules[__name__])
gru_forward = _kernels["gru_forward"]
gru_backward = _kernels["gru_backward"]
gru_forward_serial = _kernels["gru_forward_serial"]
gru_backward_serial = _kernels["gru_backward_serial"]
