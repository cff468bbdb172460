"""Lets torch.compile trace into fastrnn's sequence modules.

Dynamo refuses every instance of `torch.nn.RNN / GRU / LSTM` ("Attempted to wrap RNN, GRU, or
LSTM") unless `torch._dynamo.config.allow_rnn` is set, and fastrnn's modules are such instances
(they subclass torch's, so `isinstance` and everything built on it keep working). Setting that
flag globally would also change how dynamo treats torch.nn's own RNNs in the user's model, so
fastrnn sets it only while dynamo wraps one of fastrnn's modules, by wrapping the one method
that checks it (`VariableBuilder.wrap_module`). Dynamo then traces the module's forward, which
under compilation records each layer as one `fastrnn::layer` op (`ops`, `functional`).

`torch._dynamo` takes ~1 s to import, so fastrnn doesn't import it: the wrapper is installed when
something else imports dynamo's builder module (or at once if it is loaded already). If dynamo's
internals move, nothing is installed and dynamo keeps refusing the modules as before (compiled
models then run fastrnn eagerly between graphs, as without this module).
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import sys

_BUILDER = "torch._dynamo.variables.builder"
_module_classes: tuple[type, ...] = ()


def _install(builder) -> None:
    variable_builder = getattr(builder, "VariableBuilder", None)
    original = getattr(variable_builder, "wrap_module", None)
    if original is None or getattr(original, "_fastrnn_wrapped", False):
        return
    from torch._dynamo import config

    def wrap_module(self, value):
        if isinstance(value, _module_classes):
            with config.patch(allow_rnn=True):
                return original(self, value)
        return original(self, value)

    wrap_module._fastrnn_wrapped = True  # type: ignore[attr-defined]
    variable_builder.wrap_module = wrap_module


class _AfterBuilderImport(importlib.abc.MetaPathFinder):
    """Runs `_install` right after dynamo's builder module is first imported."""

    def find_spec(self, name, path, target=None):
        if name != _BUILDER:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        execute = loader.exec_module

        def exec_module(module):
            execute(module)
            with contextlib.suppress(Exception):
                _install(module)

        loader.exec_module = exec_module  # type: ignore[method-assign]
        return spec


def allow_modules(*classes: type) -> None:
    """Let dynamo trace into instances of `classes` (fastrnn's LSTM, GRU and RNN)."""
    global _module_classes
    _module_classes = (*_module_classes, *classes)
    builder = sys.modules.get(_BUILDER)
    if builder is not None:
        with contextlib.suppress(Exception):
            _install(builder)
    elif not any(isinstance(f, _AfterBuilderImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterBuilderImport())
