"""Sequence to sequence: an encoder GRU or LSTM (packed, variable-length input) and a decoder
built on the cell (`GRUCell` / `LSTMCell` stepped in a Python loop), teacher forcing in training
and greedy decoding at inference, on digit strings to reverse or to sort.

The default data is synthetic, drawn from the seed (fresh pairs every step, a fixed held-out
set); `--data FILE` trains on your own pairs instead: one `source<TAB>target` a line, characters
as tokens, a tenth held out. torch.nn's model and fastrnn's start from the same seed and see the
same batches; the run prints samples per second for both, exact-match accuracy of greedy
decoding on the held-out pairs, and whether the losses agree step by step.

    python -m bench.task seq2seq                          # reverse 3-6 digits, under a minute
    python -m bench.task seq2seq --problem sort --steps 3000 --max-len 12 --cell lstm
    python -m bench.task seq2seq --data pairs.tsv --hidden 256
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from . import common

PAD, BOS, EOS = 0, 1, 2
SPECIALS = 3  # token ids below this are PAD, BOS, EOS; characters follow
DIGITS = "0123456789"


class Seq2Seq(nn.Module):
    """Encoder: embedding -> GRU/LSTM over the packed source (B, S). Decoder: the matching cell,
    one call per target step, from the encoder's final state, then a linear layer to the
    vocabulary. Teacher forcing in `forward`, greedy decoding in `greedy`."""

    def __init__(self, vocab: int, embed: int, hidden: int, cell: str) -> None:
        super().__init__()
        self.cell = cell
        self.embed = nn.Embedding(vocab, embed, padding_idx=PAD)
        encoder_cls, decoder_cls = {"gru": (nn.GRU, nn.GRUCell), "lstm": (nn.LSTM, nn.LSTMCell)}[
            cell
        ]
        self.encoder = encoder_cls(embed, hidden, batch_first=True)
        self.decoder = decoder_cls(embed, hidden)
        self.head = nn.Linear(hidden, vocab)

    def encode(self, source: torch.Tensor, lengths: torch.Tensor) -> Any:
        """source (B, S) padded, lengths (B,) unsorted -> the decoder's initial state: h (B, H),
        or (h, c) for the LSTM."""
        packed = pack_padded_sequence(
            self.embed(source), lengths, batch_first=True, enforce_sorted=False
        )
        _, state = self.encoder(packed)
        if isinstance(state, tuple):
            return state[0][0], state[1][0]
        return state[0]

    def _step(self, tokens: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        state = self.decoder(self.embed(tokens), state)
        hidden = state[0] if isinstance(state, tuple) else state
        return self.head(hidden), state

    def forward(
        self, source: torch.Tensor, lengths: torch.Tensor, target_in: torch.Tensor
    ) -> torch.Tensor:
        """Teacher forcing: target_in (B, T) starts with BOS; returns logits (B, T, vocab)."""
        state = self.encode(source, lengths)
        logits = []
        for t in range(target_in.shape[1]):
            step_logits, state = self._step(target_in[:, t], state)
            logits.append(step_logits)
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def greedy(self, source: torch.Tensor, lengths: torch.Tensor, max_len: int) -> torch.Tensor:
        """Greedy decoding from BOS, each step's argmax fed back: (B, max_len) token ids."""
        state = self.encode(source, lengths)
        tokens = torch.full((source.shape[0],), BOS, dtype=torch.int64)
        out = []
        for _ in range(max_len):
            step_logits, state = self._step(tokens, state)
            tokens = step_logits.argmax(dim=-1)
            out.append(tokens)
            if bool((torch.stack(out, 1) == EOS).any(1).all()):
                break
        return torch.stack(out, dim=1)


def synthetic_pairs(
    n: int, min_len: int, max_len: int, problem: str, generator: torch.Generator
) -> list[tuple[str, str]]:
    """`n` random digit strings of lengths min_len..max_len and their reversal (or sort)."""
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator).tolist()
    pairs = []
    for length in lengths:
        digits = "".join(DIGITS[d] for d in torch.randint(0, 10, (length,), generator=generator))
        target = digits[::-1] if problem == "reverse" else "".join(sorted(digits))
        pairs.append((digits, target))
    return pairs


def file_pairs(path: Path) -> list[tuple[str, str]]:
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if "\t" not in line:
            raise SystemExit(f"{path}:{number}: expected 'source<TAB>target'")
        source, target = line.split("\t", 1)
        pairs.append((source, target))
    return pairs


def encode_batch(
    pairs: list[tuple[str, str]], index: dict[str, int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> source (B, S) padded, lengths (B,), target_in (B, T) = BOS + target, target_out
    (B, T) = target + EOS (PAD beyond)."""
    sources = [[index[ch] for ch in s] for s, _ in pairs]
    targets = [[index[ch] for ch in t] for _, t in pairs]
    batch = len(pairs)
    source = torch.full((batch, max(map(len, sources))), PAD, dtype=torch.int64)
    t_len = max(map(len, targets)) + 1
    target_in = torch.full((batch, t_len), PAD, dtype=torch.int64)
    target_out = torch.full((batch, t_len), PAD, dtype=torch.int64)
    for i, (s, t) in enumerate(zip(sources, targets, strict=True)):
        source[i, : len(s)] = torch.tensor(s)
        target_in[i, : len(t) + 1] = torch.tensor([BOS, *t])
        target_out[i, : len(t) + 1] = torch.tensor([*t, EOS])
    lengths = torch.tensor([max(len(s), 1) for s in sources])
    return source, lengths, target_in, target_out


def decode(ids: torch.Tensor, vocab: str) -> str:
    """Token ids up to the first EOS -> text."""
    out = []
    for token in ids.tolist():
        if token == EOS:
            break
        out.append(vocab[token - SPECIALS] if token >= SPECIALS else "?")
    return "".join(out)


def accuracy(
    model: Seq2Seq, pairs: list[tuple[str, str]], index: dict[str, int], vocab: str
) -> tuple[float, list[str]]:
    """Exact-match accuracy of greedy decoding, and its outputs."""
    model.eval()
    source, lengths, _, _ = encode_batch(pairs, index)
    max_len = max(len(t) for _, t in pairs) + 2
    predictions = [decode(row, vocab) for row in model.greedy(source, lengths, max_len)]
    hits = sum(p == t for p, (_, t) in zip(predictions, pairs, strict=True))
    return hits / len(pairs), predictions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    common.add_common_arguments(parser, steps=400, batch=64)
    group = parser.add_argument_group("sequence to sequence")
    group.add_argument("--cell", choices=("gru", "lstm"), default="gru")
    group.add_argument("--embed", type=int, default=32)
    group.add_argument("--hidden", type=int, default=128)
    group.add_argument("--problem", choices=("reverse", "sort"), default="reverse")
    group.add_argument("--min-len", type=int, default=3, help="shortest digit string (3)")
    group.add_argument("--max-len", type=int, default=6, help="longest digit string (6)")
    group.add_argument("--test-size", type=int, default=500, help="held-out pairs (500)")
    group.add_argument("--data", type=Path, help="source<TAB>target lines (default: synthetic)")


def run(args: argparse.Namespace) -> int:
    if args.data is not None:
        pairs = file_pairs(args.data)
        n_test = max(1, len(pairs) // 10)
        train_pairs, test_pairs = pairs[n_test:], pairs[:n_test]
        chars = sorted({ch for s, t in pairs for ch in s + t})
        source_name = f"{args.data} ({len(train_pairs)} training pairs)"
    else:
        train_pairs = None
        test_pairs = synthetic_pairs(
            args.test_size,
            args.min_len,
            args.max_len,
            args.problem,
            torch.Generator().manual_seed(args.seed + 1),
        )
        chars = list(DIGITS)
        source_name = f"{args.problem} {args.min_len}-{args.max_len} digits"
    vocab = "".join(chars)
    index = {ch: SPECIALS + i for i, ch in enumerate(vocab)}

    def batch_for(step: int) -> list[tuple[str, str]]:
        generator = torch.Generator().manual_seed(common.step_seed(args.seed + 2, step))
        if train_pairs is None:
            return synthetic_pairs(args.batch, args.min_len, args.max_len, args.problem, generator)
        picks = torch.randint(0, len(train_pairs), (args.batch,), generator=generator)
        return [train_pairs[i] for i in picks.tolist()]

    def loss_fn(model: nn.Module, state: None, batch: tuple[torch.Tensor, ...]):
        source, lengths, target_in, target_out = batch
        model.train()
        logits = model(source, lengths, target_in)
        loss = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), target_out.reshape(-1), ignore_index=PAD
        )
        return loss, None

    sides = common.make_sides(
        lambda: Seq2Seq(SPECIALS + len(vocab), args.embed, args.hidden, args.cell),
        args.seed,
        args.lr,
    )
    checks = common.train(
        sides,
        range(args.steps),
        lambda step: encode_batch(batch_for(step), index),
        loss_fn,
        args,
        description=f"seq2seq {args.cell}",
    )
    outputs = {}
    for side in sides:
        side.metrics["exact-match accuracy"], outputs[side.name] = accuracy(
            side.model, test_pairs, index, vocab
        )
    same = outputs["torch.nn"] == outputs["fastrnn"]
    extra = ["fastrnn's greedy decoding of the first held-out pairs (source -> output | target):"]
    for (source, target), out in list(zip(test_pairs, outputs["fastrnn"], strict=True))[:3]:
        extra.append(f"    {source} -> {out} | {target}")
    extra.append(
        "torch.nn's model decodes the held-out set "
        + ("to the same outputs" if same else "to different outputs")
    )
    described = {
        "encoder": args.cell.upper(),
        "decoder": ("GRUCell" if args.cell == "gru" else "LSTMCell") + " loop",
        "hidden": args.hidden,
        "batch": args.batch,
        "steps": args.steps,
        "data": source_name,
    }
    return common.report(
        "seq2seq",
        args,
        sides,
        checks,
        [args.batch] * args.steps,
        "samples",
        described,
        extra_lines=extra,
    )
