"""Many-to-one classification of variable-length sequences: a bidirectional GRU or LSTM reads a
`PackedSequence` (unsorted lengths, `enforce_sorted=False`) and a linear layer classifies the
final states of both directions.

The default data is synthetic, drawn from the seed: sequences of lengths 5-200 whose label is
the sign of their sum (values uniform in [-1, 1]) or, with `--problem parity`, the parity of
their count of ones (values 0/1; much harder for an RNN). `--data FILE` reads your own: one
`label<TAB>v1 v2 v3 ...` a line (an integer class and one number per time step), a tenth held
out. torch.nn's model and fastrnn's start from the same seed and see the same batches; the run
prints samples per second for both, held-out accuracy, and whether the losses agree step by step.

    python -m bench.task classify                         # sign of a sum, under a minute
    python -m bench.task classify --cell lstm --steps 2000 --hidden 128
    python -m bench.task classify --problem parity --min-len 5 --max-len 20 --steps 3000
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import PackedSequence, pack_sequence

from . import common


class Classifier(nn.Module):
    """PackedSequence of (L_i, features) sequences -> logits (B, classes), from the final hidden
    state of each direction of a one-layer bidirectional GRU/LSTM."""

    def __init__(self, features: int, hidden: int, classes: int, cell: str) -> None:
        super().__init__()
        rnn_cls = {"gru": nn.GRU, "lstm": nn.LSTM}[cell]
        self.rnn = rnn_cls(features, hidden, bidirectional=True)
        self.head = nn.Linear(2 * hidden, classes)

    def forward(self, packed: PackedSequence) -> torch.Tensor:
        _, state = self.rnn(packed)
        h_n = state[0] if isinstance(state, tuple) else state  # (2, B, H), in input order
        return self.head(torch.cat([h_n[0], h_n[1]], dim=-1))


def synthetic(
    n: int, min_len: int, max_len: int, problem: str, generator: torch.Generator
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`n` sequences (L_i, 1) of unsorted lengths min_len..max_len and their labels (n,)."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator).tolist()
    sequences, labels = [], []
    for length in lengths:
        if problem == "parity":
            x = torch.randint(0, 2, (length, 1), generator=generator).float()
            labels.append(int(x.sum()) % 2)
        else:
            x = torch.rand(length, 1, generator=generator) * 2 - 1
            labels.append(int(x.sum() > 0))
        sequences.append(x)
    return sequences, torch.tensor(labels)


def from_file(path: Path) -> tuple[list[torch.Tensor], torch.Tensor]:
    sequences, labels = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            label, values = line.split("\t", 1)
            sequences.append(torch.tensor([float(v) for v in values.split()]).view(-1, 1))
            labels.append(int(label))
        except ValueError as exc:
            raise SystemExit(f"{path}:{number}: expected 'label<TAB>v1 v2 ...' ({exc})") from None
    return sequences, torch.tensor(labels)


@torch.no_grad()
def accuracy(model: nn.Module, sequences: list[torch.Tensor], labels: torch.Tensor) -> float:
    model.eval()
    predictions = model(pack_sequence(sequences, enforce_sorted=False)).argmax(dim=-1)
    return float((predictions == labels).float().mean())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser, steps=150, batch=64)
    group = parser.add_argument_group("classification")
    group.add_argument("--cell", choices=("gru", "lstm"), default="gru")
    group.add_argument("--hidden", type=int, default=64)
    group.add_argument("--problem", choices=("sign", "parity"), default="sign")
    group.add_argument("--min-len", type=int, default=5, help="shortest sequence (5)")
    group.add_argument("--max-len", type=int, default=200, help="longest sequence (200)")
    group.add_argument("--test-size", type=int, default=500, help="held-out sequences (500)")
    group.add_argument("--data", type=Path, help="label<TAB>values lines (default: synthetic)")


def run(args: argparse.Namespace) -> int:
    if args.data is not None:
        sequences, labels = from_file(args.data)
        n_test = max(1, len(sequences) // 10)
        test = sequences[:n_test], labels[:n_test]
        train_set = sequences[n_test:], labels[n_test:]
        source_name = f"{args.data} ({len(train_set[0])} training sequences)"
    else:
        train_set = None
        generator = torch.Generator().manual_seed(args.seed + 1)
        test = synthetic(args.test_size, args.min_len, args.max_len, args.problem, generator)
        source_name = f"{args.problem} of lengths {args.min_len}-{args.max_len}"
    classes = int(test[1].max()) + 1 if train_set is None else int(train_set[1].max()) + 1
    classes = max(classes, 2)

    def batch_fn(step: int) -> tuple[PackedSequence, torch.Tensor, int]:
        generator = torch.Generator().manual_seed(common.step_seed(args.seed + 2, step))
        if train_set is None:
            xs, ys = synthetic(args.batch, args.min_len, args.max_len, args.problem, generator)
        else:
            picks = torch.randint(0, len(train_set[0]), (args.batch,), generator=generator)
            xs = [train_set[0][i] for i in picks.tolist()]
            ys = train_set[1][picks]
        return pack_sequence(xs, enforce_sorted=False), ys, sum(len(x) for x in xs)

    def loss_fn(model: nn.Module, state: None, batch: tuple[PackedSequence, torch.Tensor, int]):
        packed, labels, _ = batch
        model.train()
        return F.cross_entropy(model(packed), labels), None

    sides = common.make_sides(
        lambda: Classifier(1, args.hidden, classes, args.cell), args.seed, args.lr
    )
    steps_seen: list[int] = []

    def counted_batch(step: int) -> tuple[PackedSequence, torch.Tensor, int]:
        batch = batch_fn(step)
        steps_seen.append(batch[2])
        return batch

    checks = common.train(
        sides,
        range(args.steps),
        counted_batch,
        loss_fn,
        args,
        description=f"classify {args.cell}",
    )
    for side in sides:
        side.metrics["held-out accuracy"] = accuracy(side.model, *test)
    rates = [common.throughput(side, steps_seen, args.warmup) for side in sides]
    extra = [f"{'time steps/s':24}{rates[0]:>14,.0f}{rates[1]:>14,.0f}"]
    described = {
        "model": f"bidirectional {args.cell.upper()}",
        "hidden": args.hidden,
        "batch": args.batch,
        "steps": args.steps,
        "data": f"{source_name}, packed, unsorted",
    }
    return common.report(
        "classify",
        args,
        sides,
        checks,
        [args.batch] * args.steps,
        "samples",
        described,
        extra_lines=extra,
    )
