"""Dynamic quantization of models holding fastrnn modules, as torch quantizes torch.nn's.

`torch.ao.quantization.quantize_dynamic` matches exact types twice: its qconfig spec
(`{nn.LSTM, nn.Linear}`) is looked up by `type(module)`, and the quantized modules'
`from_float` refuse anything but `torch.nn.LSTM` / `GRU` / the cells. So a `fastrnn.LSTM`
(a subclass) would stay float. Registering fastrnn's classes in torch's mappings can't fix the
second check, so instead this module hands torch the model with each fastrnn module turned back
into its torch class (same parameters), and torch quantizes it as it would have quantized the
model before `fastrnn.convert`:

    qmodel = fastrnn.quantization.quantize_dynamic(model, {nn.LSTM, nn.GRU, nn.Linear})

The quantized recurrent modules are torch's (`torch.ao.nn.quantized.dynamic.LSTM`, ...); fastrnn
has no int8 kernels. Nothing in torch's global state changes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from .modules import _TORCH_CLASSES, swap_classes

# Each fastrnn class -> the torch class it subclasses (as torch.nn had them at import, so a
# script that patches `torch.nn.LSTM` to fastrnn's doesn't change the answer).
TORCH_CLASS: dict[type, type] = _TORCH_CLASSES


def _torch_class(module: nn.Module) -> type | None:
    return TORCH_CLASS.get(type(module))


def as_torch_modules(model: nn.Module) -> nn.Module:
    """Turn every fastrnn module in `model` (the model itself included) back into its torch.nn
    class, in place, sharing the same Parameter objects: the inverse of `fastrnn.convert`.

    Only exact fastrnn classes are turned back; subclasses (which may override `forward`) are
    left alone, as `convert` leaves torch subclasses alone. Returns the (possibly new) model.
    """
    return swap_classes(model, _torch_class)


def _torch_key(key: Any) -> Any:
    return TORCH_CLASS.get(key, key) if isinstance(key, type) else key


def quantize_dynamic(
    model: nn.Module,
    qconfig_spec: set | dict | None = None,
    dtype: torch.dtype = torch.qint8,
    mapping: dict[type, type] | None = None,
    inplace: bool = False,
) -> nn.Module:
    """`torch.ao.quantization.quantize_dynamic` for a model that may hold fastrnn modules.

    Arguments are torch's. fastrnn classes in `qconfig_spec` or `mapping` count as their torch
    classes (`{fastrnn.LSTM}` means `{nn.LSTM}`). The result is exactly what torch returns for
    the same model built from torch.nn modules: fastrnn's recurrent modules come out as torch's
    dynamically quantized ones; those the spec doesn't name stay float fastrnn modules.
    """
    if not inplace:
        model = copy.deepcopy(model)
    was_fastrnn: dict[int, tuple[nn.Module, type]] = {}
    model = swap_classes(model, _torch_class, was_fastrnn)
    if isinstance(qconfig_spec, set):
        qconfig_spec = {_torch_key(key) for key in qconfig_spec}
    elif isinstance(qconfig_spec, dict):
        qconfig_spec = {_torch_key(key): value for key, value in qconfig_spec.items()}
    if mapping is not None:
        mapping = {_torch_key(key): value for key, value in mapping.items()}
    model = torch.ao.quantization.quantize_dynamic(
        model, qconfig_spec, dtype=dtype, mapping=mapping, inplace=True
    )

    # The modules torch left float become fastrnn's again (the same objects torch was given).
    def fastrnn_class(module: nn.Module) -> type | None:
        given, fast = was_fastrnn.get(id(module), (None, None))
        return fast if given is module else None

    return swap_classes(model, fastrnn_class)
