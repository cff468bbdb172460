"""LSTM: fastrnn.LSTM against torch.nn.LSTM with identical weights over its parity grid (layers,
directions, batch_first, bias, proj_size, unbatched input, hx given or not, float32 and float64,
dense and packed with sorted and unsorted lengths); the layer Function against the plain-torch
reference is in test_kernels.py, the op under torch.compile in test_compile.py."""

from __future__ import annotations

import pytest
from parity_grid import (
    LSTM_PROJ_GRID,
    LSTM_PROJ_PACKED,
    check_module_parity,
    check_packed_parity,
    module_grid,
    packed_grid,
)


@pytest.mark.parametrize("c", module_grid("LSTM") + LSTM_PROJ_GRID)
def test_lstm_matches_torch(c):
    check_module_parity(c)


@pytest.mark.parametrize("c", packed_grid("LSTM") + LSTM_PROJ_PACKED)
def test_packed_lstm_matches_torch(c):
    check_packed_parity(c)
