"""GRU (reset after, gates r, z, n): fastrnn.GRU against torch.nn.GRU with identical weights over
its parity grid (layers, directions, batch_first, bias, unbatched input, hx given or not,
float32 and float64, dense and packed with sorted and unsorted lengths); the layer Function
against the plain-torch reference is in test_kernels.py, the op under torch.compile in
test_compile.py."""

from __future__ import annotations

import pytest
from parity_grid import check_module_parity, check_packed_parity, module_grid, packed_grid


@pytest.mark.parametrize("c", module_grid("GRU"))
def test_gru_matches_torch(c):
    check_module_parity(c)


@pytest.mark.parametrize("c", packed_grid("GRU"))
def test_packed_gru_matches_torch(c):
    check_packed_parity(c)
