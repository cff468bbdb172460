"""A small language-model training step, torch.nn vs `fastrnn.convert` of the same model.

Measures fastrnn where users run it: inside a step with torch layers around it (embedding,
linear, cross-entropy, optimizer), so thread-pool contention between torch's OpenMP pool and
fastrnn's kernels shows up here if it exists. Both models start from the same weights and see the
same batches; their losses are checked equal first, then steps are timed interleaved.

    python -m bench.training_step [--cell lstm|gru] [--steps 30] [--batch 16] [--seq 50]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import fastrnn


class TinyLanguageModel(nn.Module):
    """Embedding -> 2-layer LSTM/GRU (dropout between layers) -> Linear over the vocabulary."""

    def __init__(self, cell: str, vocab: int, embed: int, hidden: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        rnn_cls = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn_cls(embed, hidden, num_layers=2, dropout=0.1, batch_first=True)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(tokens))
        return self.head(out)


def _step(model, optimizer, tokens, targets) -> float:
    optimizer.zero_grad(set_to_none=True)
    logits = model(tokens)
    loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    optimizer.step()
    return loss.item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.training_step", description=__doc__)
    parser.add_argument("--cell", choices=("lstm", "gru"), default="lstm")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model (30)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=50)
    parser.add_argument("--vocab", type=int, default=2000)
    parser.add_argument("--embed", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=256)
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    reference = TinyLanguageModel(args.cell, args.vocab, args.embed, args.hidden)
    converted = fastrnn.convert(copy.deepcopy(reference))
    models = {"torch": reference, "fastrnn": converted}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.1) for k, m in models.items()}
    g = torch.Generator().manual_seed(1)
    batches = [
        torch.randint(0, args.vocab, (args.batch, args.seq + 1), generator=g)
        for _ in range(args.steps + 3)
    ]

    times: dict[str, list[float]] = {"torch": [], "fastrnn": []}
    worst = 0.0
    for i, batch in enumerate(batches):
        tokens, targets = batch[:, :-1], batch[:, 1:]
        losses = {}
        for name in ("torch", "fastrnn") if i % 2 == 0 else ("fastrnn", "torch"):
            torch.manual_seed(100 + i)  # same dropout masks for both
            start = time.perf_counter()
            losses[name] = _step(models[name], optimizers[name], tokens, targets)
            if i >= 3:  # the first steps warm up (and load fastrnn's compiled kernels)
                times[name].append(time.perf_counter() - start)
        worst = max(worst, abs(losses["torch"] - losses["fastrnn"]))
    torch_ms = statistics.median(times["torch"]) * 1e3
    fast_ms = statistics.median(times["fastrnn"]) * 1e3
    print(
        f"{args.cell} LM step (batch {args.batch}, seq {args.seq}, embed {args.embed}, "
        f"hidden {args.hidden}, vocab {args.vocab}, 2 layers, threads {torch.get_num_threads()}): "
        f"torch {torch_ms:.1f} ms, fastrnn {fast_ms:.1f} ms, speed-up {torch_ms / fast_ms:.2f}x; "
        f"max |loss difference| over {len(batches)} steps {worst:.2e}"
    )
    return 0 if worst < 1e-3 else 1


if __name__ == "__main__":
    raise SystemExit(main())
