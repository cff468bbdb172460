"""fastrnn: fused LSTM, GRU and Elman-RNN kernels (Numba) as drop-in replacements of torch.nn.

import fastrnn
model = fastrnn.convert(model)          # every nn.LSTM/GRU/RNN (and cell) inside, swapped
lstm = fastrnn.LSTM(64, 128, num_layers=2, batch_first=True)   # or construct directly
"""

from __future__ import annotations

import importlib.util
import os
import sys


def _ensure_kernels_package() -> None:
    """Make `fastrnn.kernels` the kernels of this very fastrnn.

    A wheel holds them as the subpackage `fastrnn/kernels`. A source checkout holds them as the
    top-level `kernels/` beside `fastrnn/`, which is mapped here; this comes before asking the
    import system, because an editable install's finder would map another checkout's kernels
    when this copy is imported through PYTHONPATH (a read-only copy of the package, say).
    """
    if "fastrnn.kernels" in sys.modules:
        return
    here = os.path.dirname(os.path.abspath(__file__))
    if os.path.isdir(os.path.join(here, "kernels")):
        return  # a wheel: the subpackage imports as it is
    source = os.path.join(os.path.dirname(here), "kernels")
    if not os.path.isfile(os.path.join(source, "__init__.py")):
        try:
            if importlib.util.find_spec("fastrnn.kernels") is not None:
                return
        except ModuleNotFoundError:
            pass
        raise ImportError("fastrnn.kernels is missing: reinstall fastrnn")
    spec = importlib.util.spec_from_file_location(
        "fastrnn.kernels", os.path.join(source, "__init__.py"), submodule_search_locations=[source]
    )
    if spec is None or spec.loader is None:
        raise ImportError("fastrnn.kernels is missing: reinstall fastrnn")
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastrnn.kernels"] = module
    spec.loader.exec_module(module)


_ensure_kernels_package()

from . import functional  # noqa: E402
from . import quantization as quantization  # noqa: E402 - fastrnn.quantization.quantize_dynamic
from ._version import __version__  # noqa: E402
from .layernorm_lstm import LayerNormLSTM, LayerNormLSTMCell  # noqa: E402
from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell, convert  # noqa: E402
from .recurrence_cuda import (  # noqa: E402
    get_cuda_strategy,
    last_cuda_strategy,
    set_cuda_strategy,
)
from .scratch import release_scratch_buffers  # noqa: E402

__all__ = [
    "LSTM",
    "GRU",
    "RNN",
    "LSTMCell",
    "GRUCell",
    "RNNCell",
    "LayerNormLSTM",
    "LayerNormLSTMCell",
    "convert",
    "set_cuda_strategy",
    "get_cuda_strategy",
    "last_cuda_strategy",
    "release_scratch_buffers",
    "functional",
    "__version__",
]
