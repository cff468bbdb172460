"""The GRU cell with recurrent dropout and zoneout (`recurrence`'s masks): kernels
`gru_masked_forward` / `gru_masked_backward`, whose arguments are `gru`'s plus the masks
(h_mask (D, B, H), zone_h (D, N, H), zone_c (D, N, 0)).

The skeleton applies both masks; the gate math is `gru`'s as it is: its backward reads the
state each row consumed from y, which with zoneout holds the zoned-out states, and the
recurrent side's product reads h_mask * h, so r * (W_hn (h_mask * h) + b_hn).
"""

from __future__ import annotations

import sys

from .gru import (
    GATES,
    JOINT_INPUT,
    SEPARATE_RECURRENT_GRADIENT,
    SPLITS_UNITS,
    backward_rows,
    forward_rows,
)
from .recurrence import instantiate

__all__ = [
    "GATES", "JOINT_INPUT", "SEPARATE_RECURRENT_GRADIENT", "SPLITS_UNITS", "backward_rows",
    "forward_rows",
]  # fmt: skip

MASKED = True

_kernels = instantiate(sys.modules[__name__])
gru_masked_forward = _kernels["gru_masked_forward"]
gru_masked_backward = _kernels["gru_masked_backward"]
gru_masked_forward_serial = _kernels["gru_masked_forward_serial"]
gru_masked_backward_serial = _kernels["gru_masked_backward_serial"]
