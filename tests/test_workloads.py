"""`python -m bench.task` end to end at tiny sizes: each workload trains torch.nn and fastrnn,
finds their losses equal on the same weights, reports its metric, writes its JSON and plot; the
language model resumes from its checkpoint exactly; a fastrnn model made wrong on purpose is
caught. Speed is not judged here."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastrnn
from bench.task import main

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "lm": "--hidden 16 --embed 8 --batch 4 --bptt 8 --chars 20000 --valid-chars 800 "
    "--sample-chars 10",
    "seq2seq": "--hidden 16 --embed 8 --batch 8 --test-size 20 --max-len 4",
    "classify": "--hidden 8 --batch 8 --test-size 16 --max-len 30",
}


def run_task(task: str, out: Path, *flags: str, steps: int = 4) -> tuple[int, dict]:
    argv = [task, *TINY[task].split(), "--steps", str(steps), "--check-every", "1"]
    argv += ["--no-progress", "--out", str(out), *flags]
    code = main(argv)
    return code, json.loads((out / f"{task}.json").read_text())


def assert_agreeing_run(code: int, record: dict, steps: int) -> None:
    assert code == 0
    agreement = record["agreement"]
    assert agreement["agree"] and agreement["checked"] == steps
    assert agreement["worst"] <= 1e-5
    for side in ("torch.nn", "fastrnn"):
        data = record["sides"][side]
        assert len(data["losses"]) == steps and all(math.isfinite(x) for x in data["losses"])
        assert data["items_per_second"] > 0
    # a single step can't drift: the first losses are equal to float rounding
    first = [record["sides"][s]["losses"][0] for s in ("torch.nn", "fastrnn")]
    assert abs(first[0] - first[1]) <= 1e-5 * max(1.0, abs(first[0]))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lm(tmp_path, capsys, cell):
    code, record = run_task("lm", tmp_path, "--cell", cell, "--prompt", "import ")
    assert_agreeing_run(code, record, 4)
    out = capsys.readouterr().out
    assert "import " in out  # the sample starts from the prompt
    for side in record["sides"].values():
        ppl = side["metrics"]["valid perplexity"]
        assert 1.0 < ppl < 200  # at most the vocabulary's size, barely trained
    assert (tmp_path / "lm-checkpoint.pt").exists()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "lm-loss.png").stat().st_size > 0


def test_lm_resumes_from_its_checkpoint_exactly(tmp_path):
    checkpoint = tmp_path / "first" / "checkpoint.pt"
    code, _ = run_task("lm", tmp_path / "first", "--save", str(checkpoint), "--no-plot", steps=3)
    assert code == 0
    code, resumed = run_task("lm", tmp_path / "resumed", "--resume", str(checkpoint), steps=6)
    assert code == 0 and resumed["first_step"] == 3
    _, straight = run_task("lm", tmp_path / "straight", "--no-plot", steps=6)
    for side in ("torch.nn", "fastrnn"):
        assert resumed["sides"][side]["losses"] == straight["sides"][side]["losses"][3:]


def test_seq2seq(tmp_path):
    # LSTM encoder, LSTMCell decoder (the GRU pair runs in test_own_data_files)
    code, record = run_task("seq2seq", tmp_path, "--cell", "lstm", "--no-plot")
    assert_agreeing_run(code, record, 4)
    for side in record["sides"].values():
        assert 0.0 <= side["metrics"]["exact-match accuracy"] <= 1.0


def test_classify(tmp_path):
    # bidirectional LSTM (the GRU runs in test_own_data_files and test_command_line)
    code, record = run_task("classify", tmp_path, "--cell", "lstm", "--no-plot")
    assert_agreeing_run(code, record, 4)
    for side in record["sides"].values():
        assert 0.0 <= side["metrics"]["held-out accuracy"] <= 1.0


def test_own_data_files(tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{w}\t{w.upper()}\n" for w in ["abc", "hello", "xyz", "rnn"] * 10))
    series = tmp_path / "series.tsv"
    series.write_text("".join(f"{i % 3}\t{' '.join(['0.5'] * (3 + i % 7))}\n" for i in range(40)))
    for task, flag, path in (
        ("lm", "--text", text),
        ("seq2seq", "--data", pairs),
        ("classify", "--data", series),
    ):
        code, record = run_task(task, tmp_path / task, flag, str(path), "--no-plot", steps=2)
        assert_agreeing_run(code, record, 2)
        assert str(path) in json.dumps(record["config"])


def test_a_wrong_kernel_is_caught(tmp_path, monkeypatch, capsys):
    forward = fastrnn.GRU.forward

    def skewed(self, input, hx=None):
        output, h = forward(self, input, hx)
        return output, h + 1e-3  # the final state, as classify reads it, off by 1e-3

    monkeypatch.setattr(fastrnn.GRU, "forward", skewed)
    code, record = run_task("classify", tmp_path, "--no-plot", steps=2)
    assert code == 1 and not record["agreement"]["agree"]
    assert "losses DIFFER" in capsys.readouterr().out


def test_command_line(tmp_path):
    """`python -m bench.task` as a user runs it (the README's commands, at a tiny size)."""
    cmd = [sys.executable, "-m", "bench.task", "classify", *TINY["classify"].split()]
    cmd += ["--steps", "2", "--no-progress", "--out", str(tmp_path)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "speed-up" in done.stdout and "losses agree" in done.stdout
    assert torch.isfinite(
        torch.tensor(json.loads((tmp_path / "classify.json").read_text())["speedup"])
    )
