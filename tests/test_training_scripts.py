"""Training loops written the way third-party scripts write them, run once with torch.nn and
once with the torch.nn names patched to fastrnn's classes: same losses, step by step."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastrnn

PATCHES = {"LSTM": fastrnn.LSTM, "GRU": fastrnn.GRU, "RNN": fastrnn.RNN}


class WordLanguageModel(nn.Module):
    """In the style of PyTorch's word_language_model example: the class is looked up on `nn` at
    construction, hidden state from weight.new_zeros, detached between batches, tied weights."""

    def __init__(self, rnn_type: str, ntoken: int, ninp: int, nhid: int, nlayers: int) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.2)
        self.encoder = nn.Embedding(ntoken, ninp)
        if rnn_type in ("LSTM", "GRU"):
            self.rnn = getattr(nn, rnn_type)(ninp, nhid, nlayers, dropout=0.2)
        else:
            nonlinearity = {"RNN_TANH": "tanh", "RNN_RELU": "relu"}[rnn_type]
            self.rnn = nn.RNN(ninp, nhid, nlayers, nonlinearity=nonlinearity, dropout=0.2)
        self.decoder = nn.Linear(nhid, ntoken)
        self.decoder.weight = self.encoder.weight  # tied (ninp == nhid)
        self.rnn_type, self.nhid, self.nlayers = rnn_type, nhid, nlayers

    def forward(self, tokens, hidden):
        emb = self.drop(self.encoder(tokens))
        output, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(output)), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        if self.rnn_type == "LSTM":
            return (
                weight.new_zeros(self.nlayers, bsz, self.nhid),
                weight.new_zeros(self.nlayers, bsz, self.nhid),
            )
        return weight.new_zeros(self.nlayers, bsz, self.nhid)


def _repackage(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(_repackage(v) for v in h)


def _word_lm_losses(rnn_type: str) -> tuple[list[float], type]:
    torch.manual_seed(0)
    model = WordLanguageModel(rnn_type, ntoken=50, ninp=16, nhid=16, nlayers=2)
    data = torch.randint(0, 50, (41, 4))
    hidden = model.init_hidden(4)
    losses = []
    lr = 5.0
    model.train()
    for i in range(0, 40, 8):
        tokens, targets = data[i : i + 8], data[i + 1 : i + 9].reshape(-1)
        model.zero_grad()
        hidden = _repackage(hidden)
        output, hidden = model(tokens, hidden)
        loss = nn.functional.cross_entropy(output.view(-1, 50), targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)  # in place, without bumping the version counter
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        output, _ = model(data[:8], model.init_hidden(4))
        losses.append(
            nn.functional.cross_entropy(output.view(-1, 50), data[1:9].reshape(-1)).item()
        )
    return losses, type(model.rnn)


@pytest.mark.parametrize("rnn_type", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
def test_word_language_model_with_patched_names(rnn_type, monkeypatch):
    reference, reference_cls = _word_lm_losses(rnn_type)
    for name, cls in PATCHES.items():
        monkeypatch.setattr(nn, name, cls)
    patched, patched_cls = _word_lm_losses(rnn_type)
    assert (
        reference_cls.__module__.startswith("torch.")
        and patched_cls.__module__ == "fastrnn.modules"
    )
    assert all(math.isfinite(v) for v in patched)
    assert patched == pytest.approx(reference, rel=1e-4, abs=1e-5)


class Tagger(nn.Module):
    """Sequence tagger: padded batch -> pack (unsorted lengths) -> 2-layer BiGRU -> unpack."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(30, 8, padding_idx=0)
        self.rnn = nn.GRU(8, 6, num_layers=2, bidirectional=True, batch_first=True)
        self.out = nn.Linear(12, 5)

    def forward(self, tokens, lengths):
        packed = pack_padded_sequence(
            self.embed(tokens), lengths, batch_first=True, enforce_sorted=False
        )
        output, _ = self.rnn(packed)
        output, _ = pad_packed_sequence(output, batch_first=True, total_length=tokens.shape[1])
        return self.out(output)


def _tagger_losses(convert: bool) -> list[float]:
    torch.manual_seed(0)
    model = Tagger()
    if convert:
        model = fastrnn.convert(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    lengths = torch.tensor([7, 3, 5, 1, 6])
    tokens = torch.randint(1, 30, (5, 7)) * (torch.arange(7) < lengths[:, None])
    tags = torch.randint(0, 5, (5, 7))
    losses = []
    for _ in range(4):
        optimizer.zero_grad()
        logits = model(tokens, lengths)
        mask = torch.arange(7) < lengths[:, None]
        loss = nn.functional.cross_entropy(logits[mask], tags[mask])
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_packed_bidirectional_tagger_converted():
    assert _tagger_losses(True) == pytest.approx(_tagger_losses(False), rel=1e-5, abs=1e-6)


class SineSequence(nn.Module):
    """In the style of PyTorch's time_sequence_prediction example: two stacked LSTMCells in
    float64, looped over time in Python, hidden states from torch.zeros, extra steps fed with
    the model's own predictions, trained with LBFGS (several closure calls per step)."""

    def __init__(self, hidden: int = 21) -> None:
        super().__init__()
        self.cell1 = nn.LSTMCell(1, hidden)
        self.cell2 = nn.LSTMCell(hidden, hidden)
        self.head = nn.Linear(hidden, 1)
        self.hidden = hidden

    def forward(self, series: torch.Tensor, future: int = 0) -> torch.Tensor:
        batch = series.size(0)
        h1 = torch.zeros(batch, self.hidden, dtype=torch.double)
        c1 = torch.zeros(batch, self.hidden, dtype=torch.double)
        h2, c2 = h1.clone(), c1.clone()
        outputs = []
        for value in series.split(1, dim=1):
            h1, c1 = self.cell1(value, (h1, c1))
            h2, c2 = self.cell2(h1, (h2, c2))
            outputs.append(self.head(h2))
        for _ in range(future):
            h1, c1 = self.cell1(outputs[-1], (h1, c1))
            h2, c2 = self.cell2(h1, (h2, c2))
            outputs.append(self.head(h2))
        return torch.cat(outputs, dim=1)


def _train_sine(convert: bool) -> list[float]:
    torch.manual_seed(2)
    steps = torch.arange(40, dtype=torch.double)
    data = torch.sin((steps + 7 * torch.arange(4, dtype=torch.double)[:, None]) / 5.0)
    model = SineSequence().double()
    if convert:
        model = fastrnn.convert(model)
        assert isinstance(model.cell1, fastrnn.LSTMCell)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
    losses = []

    def closure():
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(data[:, :-1]), data[:, 1:])
        loss.backward()
        losses.append(loss.item())
        return loss

    for _ in range(2):
        optimizer.step(closure)
    with torch.no_grad():
        prediction = model(data[:, :-1], future=5)
    losses.append(prediction.square().sum().item())
    return losses


def test_lstm_cell_time_series_with_lbfgs_converted():
    expected = _train_sine(convert=False)
    got = _train_sine(convert=True)
    assert len(got) == len(expected) > 3
    for step, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-12), f"closure call {step}"
