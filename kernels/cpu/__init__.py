"""CPU kernels (Numba ``@njit``): forward and backward over a whole sequence, one layer-direction."""
