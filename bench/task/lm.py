"""Character-level language model: embedding -> multi-layer LSTM or GRU -> linear, softmax
cross-entropy, trained with teacher forcing and truncated backpropagation through time (the
hidden state carried across batches, detached), gradient-norm clipping and Adam.

The default text is Python's own standard library source (every machine has it); `--text FILE`
trains on a file of your own. torch.nn's model and fastrnn's start from the same seed and see the
same batches; the run prints tokens per second for both, validation perplexity, a text sample
from a prompt, and whether the losses agree step by step. It saves a checkpoint of both models
(weights, optimizer, carried hidden state) that `--resume` continues from.

    python -m bench.task lm                                # 300 steps, under a minute
    python -m bench.task lm --cell gru --steps 2000 --hidden 512
    python -m bench.task lm --text my.txt --prompt "Once upon" --temperature 0.8
    python -m bench.task lm --steps 400 --resume bench/results/task/lm-checkpoint.pt
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from . import common


@dataclass
class LMConfig:
    """Model and data settings; saved in the checkpoint and taken from it on `--resume`."""

    cell: str = "lstm"
    layers: int = 2
    embed: int = 32
    hidden: int = 128
    dropout: float = 0.1
    batch: int = 32
    bptt: int = 50
    clip: float = 1.0
    lr: float = 3e-3
    text: str | None = None  # a file, or None for the standard library's source
    chars: int = 300_000
    valid_chars: int = 20_000


class CharLM(nn.Module):
    """tokens (B, T) int64 -> logits (B, T, vocab), plus the recurrent state (batch_first)."""

    def __init__(self, vocab: int, config: LMConfig) -> None:
        super().__init__()
        rnn_cls = {"lstm": nn.LSTM, "gru": nn.GRU}[config.cell]
        self.embed = nn.Embedding(vocab, config.embed)
        self.drop = nn.Dropout(config.dropout)
        self.rnn = rnn_cls(
            config.embed,
            config.hidden,
            config.layers,
            dropout=config.dropout if config.layers > 1 else 0.0,
            batch_first=True,
        )
        self.head = nn.Linear(config.hidden, vocab)

    def forward(self, tokens: torch.Tensor, hidden: Any = None) -> tuple[torch.Tensor, Any]:
        output, hidden = self.rnn(self.drop(self.embed(tokens)), hidden)
        return self.head(self.drop(output)), hidden


def stdlib_text(chars: int) -> str:
    """The first `chars` characters of the standard library's top-level modules, in file-name
    order: the same text on every machine with the same Python version."""
    root = Path(os.__file__).resolve().parent
    pieces, total = [], 0
    for path in sorted(root.glob("*.py")):
        piece = path.read_text(encoding="utf-8", errors="replace")
        pieces.append(piece)
        total += len(piece)
        if total >= chars:
            break
    return "".join(pieces)[:chars]


def load_text(config: LMConfig) -> str:
    if config.text is None:
        return stdlib_text(config.chars)
    return Path(config.text).read_text(encoding="utf-8", errors="replace")[: config.chars]


def batchify(ids: torch.Tensor, batch: int) -> torch.Tensor:
    """A 1-D token stream -> (batch, N): `batch` contiguous streams side by side, so that step
    k's window continues step k-1's in every row (what carrying the hidden state needs)."""
    n = ids.numel() // batch
    return ids[: n * batch].view(batch, n)


def make_step(data: torch.Tensor, config: LMConfig):
    """The batch of each step (window `step mod windows` of `data` (B, N)) and the loss on it,
    from the carried state, or from zero states when the windows wrap around to the start."""
    windows = (data.shape[1] - 1) // config.bptt
    if windows < 1:
        raise ValueError(f"text too short for batch {config.batch} and bptt {config.bptt}")

    def batch_fn(step: int) -> tuple[bool, torch.Tensor, torch.Tensor]:
        start = (step % windows) * config.bptt
        tokens = data[:, start : start + config.bptt]
        targets = data[:, start + 1 : start + 1 + config.bptt]
        return start == 0, tokens, targets

    def loss_fn(model: nn.Module, state: Any, batch: tuple[bool, torch.Tensor, torch.Tensor]):
        restart, tokens, targets = batch
        model.train()
        logits, hidden = model(tokens, None if restart else state)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, hidden  # detached by the caller: truncated BPTT

    return batch_fn, loss_fn


@torch.no_grad()
def perplexity(model: nn.Module, data: torch.Tensor, bptt: int) -> float:
    """exp(mean cross-entropy) over `data` (B, N), in windows carrying the state."""
    model.eval()
    hidden, total, count = None, 0.0, 0
    for start in range(0, data.shape[1] - 1, bptt):
        tokens = data[:, start : start + bptt]
        targets = data[:, start + 1 : start + 1 + bptt]
        tokens = tokens[:, : targets.shape[1]]
        logits, hidden = model(tokens, hidden)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += targets.numel()
    return math.exp(total / count)


@torch.no_grad()
def sample(
    model: nn.Module,
    vocab: str,
    prompt: str,
    length: int,
    temperature: float,
    seed: int,
) -> str:
    """Feed `prompt` (characters outside the vocabulary skipped), then draw `length` characters
    one at a time from softmax(logits / temperature) (argmax at temperature 0)."""
    model.eval()
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = [index[ch] for ch in prompt if ch in index] or [0]
    generator = torch.Generator().manual_seed(seed)
    logits, hidden = model(torch.tensor([ids]), None)
    out = []
    for _ in range(length):
        last = logits[0, -1]
        if temperature <= 0:
            nxt = int(last.argmax())
        else:
            probs = torch.softmax(last.double() / temperature, dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=generator))
        out.append(vocab[nxt])
        logits, hidden = model(torch.tensor([[nxt]]), hidden)
    return prompt + "".join(out)


def save_checkpoint(
    path: Path, step: int, seed: int, config: LMConfig, vocab: str, sides: list[common.Side]
) -> None:
    """Both models, optimizers and carried states at the start of `step`, and the seed (which
    sets each step's dropout masks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "step": step,
            "seed": seed,
            "config": asdict(config),
            "vocab": vocab,
            "sides": {
                side.name: {
                    "model": side.model.state_dict(),
                    "optimizer": side.optimizer.state_dict(),
                    "state": side.state,
                }
                for side in sides
            },
        },
        path,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = LMConfig()
    common.add_common_arguments(parser, steps=300, batch=defaults.batch)
    group = parser.add_argument_group("language model")
    group.add_argument("--cell", choices=("lstm", "gru"), default=defaults.cell)
    group.add_argument("--layers", type=int, default=defaults.layers)
    group.add_argument("--embed", type=int, default=defaults.embed)
    group.add_argument("--hidden", type=int, default=defaults.hidden)
    group.add_argument("--dropout", type=float, default=defaults.dropout)
    group.add_argument("--bptt", type=int, default=defaults.bptt, help="window length")
    group.add_argument("--text", type=Path, help="train on this UTF-8 file (default: stdlib)")
    group.add_argument("--chars", type=int, default=defaults.chars, help="characters of text")
    group.add_argument("--valid-chars", type=int, default=defaults.valid_chars)
    group.add_argument("--prompt", default="def ", help="sampling prompt ('def ')")
    group.add_argument("--sample-chars", type=int, default=200)
    group.add_argument("--temperature", type=float, default=0.7)
    group.add_argument("--save", type=Path, help="checkpoint path (default <out>/lm-checkpoint.pt)")
    group.add_argument("--resume", type=Path, help="continue from this checkpoint to --steps")


def run(args: argparse.Namespace) -> int:
    checkpoint = None
    if args.resume is not None:
        checkpoint = torch.load(args.resume, weights_only=False)
        config = LMConfig(**checkpoint["config"])
        args.seed = checkpoint["seed"]
    else:
        config = LMConfig(
            cell=args.cell,
            layers=args.layers,
            embed=args.embed,
            hidden=args.hidden,
            dropout=args.dropout,
            batch=args.batch,
            bptt=args.bptt,
            clip=args.clip,
            lr=args.lr,
            text=None if args.text is None else str(args.text),
            chars=args.chars,
            valid_chars=args.valid_chars,
        )
    text = load_text(config)
    vocab = checkpoint["vocab"] if checkpoint else "".join(sorted(set(text)))
    index = {ch: i for i, ch in enumerate(vocab)}
    ids = torch.tensor([index.get(ch, 0) for ch in text], dtype=torch.int64)
    n_valid = min(config.valid_chars, ids.numel() // 10)
    train_data = batchify(ids[: ids.numel() - n_valid], config.batch)
    valid_data = batchify(ids[ids.numel() - n_valid :], min(config.batch, 8))

    sides = common.make_sides(lambda: CharLM(len(vocab), config), args.seed, config.lr)
    first = 0
    if checkpoint is not None:
        first = checkpoint["step"]
        for side in sides:
            saved = checkpoint["sides"][side.name]
            side.model.load_state_dict(saved["model"])
            side.optimizer.load_state_dict(saved["optimizer"])
            side.state = saved["state"]
    if args.steps <= first:
        raise SystemExit(f"--steps {args.steps}: the checkpoint is already at step {first}")

    args.clip = config.clip
    checks = common.train(
        sides,
        range(first, args.steps),
        *make_step(train_data, config),
        args,
        description=f"lm {config.cell}",
    )
    save_path = args.save or args.out / "lm-checkpoint.pt"
    save_checkpoint(save_path, args.steps, args.seed, config, vocab, sides)

    samples = {}
    for side in sides:
        side.metrics["valid perplexity"] = perplexity(side.model, valid_data, config.bptt)
        samples[side.name] = sample(
            side.model, vocab, args.prompt, args.sample_chars, args.temperature, args.seed
        )
    same = samples["torch.nn"] == samples["fastrnn"]
    extra = [
        f"sample from fastrnn's model (prompt {args.prompt!r}, temperature {args.temperature}):",
        *("    " + line for line in samples["fastrnn"].splitlines()),
        "torch.nn's model, same seed: " + ("the same text" if same else "a different text"),
        f"checkpoint (step {args.steps}): {save_path}",
    ]
    source = config.text or f"Python {sys.version.split()[0]} stdlib source"
    described = {
        "cell": config.cell.upper(),
        "layers": config.layers,
        "hidden": config.hidden,
        "batch": config.batch,
        "bptt": config.bptt,
        "steps": f"{first}-{args.steps}",
        "text": f"{source} ({len(text):,} chars, vocab {len(vocab)})",
    }
    return common.report(
        "lm", args, sides, checks, [config.batch * config.bptt] * len(sides[0].losses), "tokens",
        described, first_step=first, extra_lines=extra,
    )  # fmt: skip
