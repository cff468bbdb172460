"""End-to-end workloads that recurrent networks are used for, torch.nn vs fastrnn.

    python -m bench.task lm          # character-level language model (truncated BPTT)
    python -m bench.task seq2seq     # encoder + cell-loop decoder on digit strings
    python -m bench.task classify    # bidirectional many-to-one on packed sequences

Each trains torch.nn's model and fastrnn's from the same seed on the same batches (an embedded
default dataset, or a file of your own), then prints throughput for both and the speed-up, the
task's metric, and whether the losses agree step by step; it writes `<task>.json` and a PNG of
both loss curves under `--out` (default `bench/results/task/`). `--help` on each lists its flags.

Modules: :mod:`bench.task.common` (lockstep training, timing, agreement, report),
:mod:`bench.task.lm`, :mod:`bench.task.seq2seq`, :mod:`bench.task.classify`.
"""

from __future__ import annotations

import argparse
import importlib

TASKS = {
    "lm": "character-level language model, truncated BPTT, perplexity and sampling",
    "seq2seq": "encoder + LSTMCell/GRUCell decoder reversing or sorting digit strings",
    "classify": "bidirectional many-to-one classifier on packed variable-length sequences",
}


def main(argv: list[str] | None = None) -> int:
    """`python -m bench.task <task> [flags]`; returns the exit code (0: losses agree)."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.task",
        description="Train torch.nn and fastrnn side by side on a real workload.",
    )
    tasks = parser.add_subparsers(dest="task", required=True, metavar="task")
    for name, help_text in TASKS.items():
        module = importlib.import_module(f"bench.task.{name}")
        sub = tasks.add_parser(
            name,
            help=help_text,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
    args = parser.parse_args(argv)
    return importlib.import_module(f"bench.task.{args.task}").run(args)
