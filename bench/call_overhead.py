"""The Python a module call costs: a T1 B1 I8 H8 forward of each fastrnn module, whose kernel
work is a few microseconds, timed against the same call of its cell Function alone (what is
left below the module boundary). Their difference is the module layer's own cost: argument
handling, validation and dispatch.

    python -m bench.call_overhead [--calls 500] [--blocks 40]

Prints microseconds of CPU time per call (the minimum over blocks, which a busy machine
disturbs least).
"""

from __future__ import annotations

import argparse
import time

import torch

import fastrnn
from fastrnn.autograd import apply_layer
from fastrnn.cell_functions import CellFunction

MODULES = {
    "LSTM": ("lstm", fastrnn.LSTM),
    "GRU": ("gru", fastrnn.GRU),
    "RNN": ("rnn_tanh", fastrnn.RNN),
    "LSTMCell": ("lstm", fastrnn.LSTMCell),
    "GRUCell": ("gru", fastrnn.GRUCell),
    "RNNCell": ("rnn_tanh", fastrnn.RNNCell),
}


def _per_call(call, calls: int, blocks: int) -> float:
    """Microseconds of this process's CPU time per call, the minimum over blocks: CPU time
    leaves out the time other processes held the core."""
    best = float("inf")
    for _ in range(blocks):
        start = time.process_time()
        for _ in range(calls):
            call()
        best = min(best, (time.process_time() - start) / calls)
    return best * 1e6


def _calls(name: str, size: int):
    """(module call, the cell Function's call on the same tensors) for one module."""
    kind, cls = MODULES[name]
    module = cls(size, size)
    if name.endswith("Cell"):
        x = torch.randn(1, size)
        weights = [module.weight_ih, module.weight_hh, module.bias_ih, module.bias_hh]
        states = [torch.zeros(1, size)] * (2 if kind == "lstm" else 1)
        x_step = x
    else:
        x = torch.randn(1, 1, size)
        weights = [getattr(module, n) for n in module._flat_weights_names]
        states = [torch.zeros(1, size)] * (2 if kind == "lstm" else 1)
        x_step = x[0]
    c0 = states[1] if kind == "lstm" else None

    def cell():
        return apply_layer(CellFunction, kind, x_step, states[0], c0, *weights)

    return (lambda: module(x)), cell


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--size", type=int, default=8, help="input and hidden size")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'module':10} {'mode':8} {'call us':>8} {'kernel us':>9} {'module layer us':>15}")
    for name in MODULES:
        module_call, cell_call = _calls(name, args.size)
        for mode in ("no_grad", "grad"):
            with torch.set_grad_enabled(mode == "grad"):
                module_call(), cell_call()  # compile / warm
                whole = _per_call(module_call, args.calls, args.blocks)
                below = _per_call(cell_call, args.calls, args.blocks)
            print(f"{name:10} {mode:8} {whole:8.1f} {below:9.1f} {whole - below:15.1f}")


if __name__ == "__main__":
    main()
