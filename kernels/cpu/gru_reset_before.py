"""GRU recurrence in the "reset before" form (the original GRU paper's, Keras
`reset_after=False`), one layer and one direction.

Gate order r, z, n (torch's parameter layout):
    r = sigmoid(W_ir x + b_ir + W_hr h + b_hr)
    z = sigmoid(W_iz x + b_iz + W_hz h + b_hz)
    n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)
    h' = (1 - z) * n + z * h
W_hn multiplies r * h, which depends on this step's r: the cell asks the skeleton for a second
recurrent product per step (`recurrence`'s GATED_GATES = 1). The first covers W_hr and W_hz;
`forward_rows` computes r and z and writes r * h (`Forward.gated`); the second product gives
W_hn (r * h), and `forward_gated_rows` computes n and h'. Backward, per step: `backward_rows`
gives dz, dn and the part of dL/dh that skips every product (z * dL/dh'); the second product
gives g = W_hn^T dn (dL/d(r * h)); `backward_gated_rows` gives dr = g * h * r (1 - r) and adds
g * r to dL/dh; the first product adds W_hr^T dr + W_hz^T dz.

The kernels `gru_reset_before_forward` / `_backward` are `recurrence.layer_forward` /
`layer_backward` for this cell, with the arguments of `gru`'s (b_hh (D, 3H) apart, zeros without
bias; pre (D, N, 3H) = x @ W_ih^T + b_ih unless fused), except: gate_cache (D, N, 4H) out holds
r, z, n and r * h of every row (no rows in inference); backward's dn_recurrent is (D, 0, H) (not
written): d_input (D, N, 3H) is the pre-activation gradient of both sides, so per direction
db_hh = db_ih = sum(d_input), dW_hh's r and z rows = d_input[:, :2H]^T h_prev and its n rows
= d_input[:, 2H:]^T (r * h_prev), the cache's last block.
"""

from __future__ import annotations

import sys

from numba import njit

from ..math import sigmoid, tanh
from .common import ROW_JIT_OPTIONS, STEP_JIT_OPTIONS, consumed_row, copy_row, scalar
from .recurrence import instantiate

_STEP = STEP_JIT_OPTIONS
_ROW = ROW_JIT_OPTIONS

# The cell's traits (see `recurrence`): the input side stays apart (n's two sides meet only
# after the second product), the last gate block multiplies r * h, and W_hh's first product
# sees the r and z blocks of the gradient only.
GATES = 3
JOINT_INPUT = False
SPLITS_UNITS = False
SEPARATE_RECURRENT_GRADIENT = True
GATED_GATES = 1


@njit(**_ROW)
def gates_row(xp, rec, b_hh, h_row, gated, hidden):
    """First half of one row's step. xp (3H): x W_ih^T + b_ih; rec (3H): in W_hr h and W_hz h
    in its first 2H columns, out r and z there; b_hh (3H); h_row (H) = h; gated (H) out:
    r * h, the second product's row."""
    for j in range(hidden):
        reset = sigmoid(xp[j] + rec[j] + b_hh[j])
        update = sigmoid(xp[hidden + j] + rec[hidden + j] + b_hh[hidden + j])
        rec[j] = reset
        rec[hidden + j] = update
        gated[j] = reset * h_row[j]


@njit(**_ROW)
def output_row(xp, rec, b_hh, gated_product, gated, cache, h_row, hidden, one, keep_cache):
    """Second half of one row's step, after `gates_row`: xp, rec (r and z), b_hh (3H) as
    there; gated_product (H) = W_hn (r * h); gated (H) = r * h; h_row (H): h in, h' out;
    cache (4H) out: r, z, n, r * h, only with keep_cache (a literal True or False, see
    `gru.gru_forward_row`)."""
    for j in range(hidden):
        update = rec[hidden + j]
        n = tanh(xp[2 * hidden + j] + (gated_product[j] + b_hh[2 * hidden + j]))
        if keep_cache:
            cache[j] = rec[j]
            cache[hidden + j] = update
            cache[2 * hidden + j] = n
            cache[3 * hidden + j] = gated[j]
        h_row[j] = (one - update) * n + update * h_row[j]


@njit(**_ROW)
def backward_output_row(cache, h_prev, dh_row, d_input, gated_grads, hidden, one):
    """Backward of `output_row`: cache (4H) as written there, h_prev (H) = h; dh_row (H):
    dL/dh' in, out z * dL/dh' (the part of dL/dh that skips the products); d_input (3H) out:
    dz and dn in its z and n blocks; gated_grads (H) out: dn, the second product's row."""
    for j in range(hidden):
        update = cache[hidden + j]
        n = cache[2 * hidden + j]
        dh = dh_row[j]
        dn = dh * (one - update) * (one - n * n)
        d_input[hidden + j] = dh * (h_prev[j] - n) * update * (one - update)
        d_input[2 * hidden + j] = dn
        gated_grads[j] = dn
        dh_row[j] = dh * update


@njit(**_ROW)
def backward_gates_row(cache, through, dh_row, d_input, rec_grads, hidden, one):
    """Backward of `gates_row`, after `backward_output_row`: through (H) = W_hn^T dn, the
    gradient of r * h; dh_row (H) += through * r; d_input (3H): its r block out (dr), z block
    in; rec_grads (2H) out: dr and dz, the rows the first product takes through W_hr, W_hz."""
    for j in range(hidden):
        reset = cache[j]
        d_gated = through[j]
        d_reset = d_gated * cache[3 * hidden + j] * (one - reset)  # g * h * r (1 - r)
        d_input[j] = d_reset
        rec_grads[j] = d_reset
        rec_grads[hidden + j] = d_input[hidden + j]
        dh_row[j] += d_gated * reset


@njit(**_STEP)
def forward_rows(a, off, first, end, unit, end_unit, fused, variant):
    """One step's rows first..end-1 at row offset `off` (`recurrence.Forward` a), before the
    second product: r and z into `a.recurrent`, r * h into `a.gated`."""
    hidden = a.h_n.shape[1]
    for r in range(first, end):
        pre = a.x_side[r] if fused else a.pre[off + r]
        gates_row(pre, a.recurrent[r], a.b_hh, a.h_n[r], a.gated[r], hidden)


@njit(**_STEP)
def forward_gated_rows(a, off, first, end, unit, end_unit, fused, variant):
    """The same rows after the second product (`a.gated_product`): h' into h_n and y, the
    cache unless inference."""
    hidden = a.h_n.shape[1]
    one = scalar(a.y, 1)
    keep_cache = a.gate_cache.shape[0] > 0  # no rows: inference, nothing kept for a backward
    for r in range(first, end):
        h_row = a.h_n[r]
        pre = a.x_side[r] if fused else a.pre[off + r]
        rec, product, gated = a.recurrent[r], a.gated_product[r], a.gated[r]
        if keep_cache:
            cache = a.gate_cache[off + r]
            output_row(pre, rec, a.b_hh, product, gated, cache, h_row, hidden, one, True)
        else:  # no cache to write: b_hh stands in for the unused cache row
            output_row(pre, rec, a.b_hh, product, gated, a.b_hh, h_row, hidden, one, False)
        copy_row(a.y[off + r], h_row)


@njit(**_STEP)
def backward_rows(a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant):
    """One step's rows first..end-1 (`recurrence.Backward` a) from dh (= dh0, dL/dh'), before
    the second product: dz and dn into d_input, dn into `a.gated_grads`; dh keeps z * dL/dh'."""
    hidden = a.h0.shape[1]
    one = scalar(a.y, 1)
    for r in range(first, end):
        consumed = consumed_row(a.y, a.h0, offsets, prev, prev_rows, r)
        backward_output_row(
            a.gate_cache[off + r], consumed, dh[r], a.d_input[off + r], a.gated_grads[r],
            hidden, one,
        )  # fmt: skip


@njit(**_STEP)
def backward_gated_rows(
    a, offsets, off, prev, prev_rows, first, end, unit, end_unit, dh, variant
):  # fmt: skip
    """The same rows after the second product (`a.gated_through` = dn @ W_hn): dr into
    d_input, dr and dz into `a.rec_grads` for the first product; dh gains the part through
    r * h."""
    hidden = a.h0.shape[1]
    one = scalar(a.y, 1)
    for r in range(first, end):
        backward_gates_row(
            a.gate_cache[off + r], a.gated_through[r], dh[r], a.d_input[off + r],
            a.rec_grads[r], hidden, one,
        )  # fmt: skip


# The kernels, and their twins without a parallel region for forked processes
# (`runtime.serial_twin`).
_kernels = instantiate(sys.modules[__name__])
gru_reset_before_forward = _kernels["gru_reset_before_forward"]
gru_reset_before_backward = _kernels["gru_reset_before_backward"]
gru_reset_before_forward_serial = _kernels["gru_reset_before_forward_serial"]
gru_reset_before_backward_serial = _kernels["gru_reset_before_backward_serial"]
