"""Benchmark harness for fastrnn: parity + timing against torch.nn.

Run ``python -m bench --help``. The default run (``python -m bench``) checks parity and times
forward (no grad) and forward+backward of LSTM, GRU and RNN at the two small standard sizes
against torch's own implementation on the same tensors, prints a table and saves JSON, markdown
and (with matplotlib) a PNG plot under ``bench/results/``.

Modules:

- :mod:`bench.cases`   -- sizes, presets, case configuration, module and input construction, FLOPs
- :mod:`bench.parity`  -- output / state / gradient comparison between torch and fastrnn
- :mod:`bench.timing`  -- warm-up, interleaved (ABAB...) timing, adaptive repetitions, statistics
- :mod:`bench.report`  -- machine metadata, console / markdown tables, JSON and the plot
- :mod:`bench.cli`     -- the command line (``python -m bench``)
- :mod:`bench.sweep`   -- a random parity sweep against torch.nn (``python -m bench.sweep``)
"""

__all__ = ["main"]


def main(argv=None):
    """Entry point of ``python -m bench``; returns the process exit code."""
    from bench.cli import main as _main

    return _main(argv)
