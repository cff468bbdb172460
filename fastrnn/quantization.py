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

from .modules import GRU, LSTM, RNN, GRUCell, LSTMCell, RNNCell

# Each fastrnn class -> the torch class it subclasses, found through the class hierarchy once at
# import, so a script that patches `torch.nn.LSTM` to fastrnn's doesn't change the answer.
_TORCH_BASES = (
    nn.modules.rnn.LSTM,
    nn.modules.rnn.GRU,
    nn.modules.rnn.RNN,
    nn.modules.rnn.LSTMCell,
    nn.modules.rnn.GRUCell,
    nn.modules.rnn.RNNCell,
)
TORCH_CLASS: dict[type, type] = {
    fast: next(base for base in fast.__mro__ if base in _TORCH_BASES)
    for fast in (LSTM, GRU, RNN, LSTMCell, GRUCell, RNNCell)
}


def _swap_classes(
    model: nn.Module, classes: dict[type, type], swapped: dict[int, tuple[nn.Module, type]]
) -> nn.Module:
    """Replace, in place, each module of `model` whose exact type is a key of `classes` (the model
    itself included) by an instance of the value class sharing its state (Parameter objects,
    buffers, hooks); records each new module's id with its old class in `swapped`."""
    for name, child in list(model.named_children()):
        new_child = _swap_classes(child, classes, swapped)
        if new_child is not child:
            setattr(model, name, new_child)
    target = classes.get(type(model))
    if target is None:
        return model
    new = target.__new__(target)
    new.__dict__.update(model.__dict__)
    swapped[id(new)] = (new, type(model))  # held, so no other module reuses the id
    return new


def as_torch_modules(model: nn.Module) -> nn.Module:
    """Turn every fastrnn module in `model` (the model itself included) back into its torch.nn
    class, in place, sharing the same Parameter objects: the inverse of `fastrnn.convert`.

    Only exact fastrnn classes are turned back; subclasses (which may override `forward`) are
    left alone, as `convert` leaves torch subclasses alone. Returns the (possibly new) model.
    """
    return _swap_classes(model, TORCH_CLASS, {})


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
    model = _swap_classes(model, TORCH_CLASS, was_fastrnn)
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
    return _restore(model, was_fastrnn)


def _restore(model: nn.Module, was_fastrnn: dict[int, tuple[nn.Module, type]]) -> nn.Module:
    for name, child in list(model.named_children()):
        new_child = _restore(child, was_fastrnn)
        if new_child is not child:
            setattr(model, name, new_child)
    module, fast = was_fastrnn.get(id(model), (None, None))
    if module is not model or fast is None:
        return model
    new = fast.__new__(fast)
    new.__dict__.update(model.__dict__)
    return new
