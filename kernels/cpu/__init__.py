"""CPU kernels (Numba ``@njit``): the recurrence of one layer-direction, forward and backward."""
