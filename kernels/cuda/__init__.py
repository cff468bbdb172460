"""CUDA kernels (numba-cuda): the recurrence of one layer, all its directions, forward and backward.

Importing this package needs numba-cuda (the `cuda` extra) but no GPU: with
NUMBA_ENABLE_CUDASIM=1 the same kernels run under Numba's simulator.
"""
