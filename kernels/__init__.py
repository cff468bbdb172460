"""fastrnn's kernels: pure Numba, no torch. Installed as ``fastrnn.kernels``."""
