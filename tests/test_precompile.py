"""`python -m fastrnn.precompile` compiles (or loads) every float32 kernel and says so."""

from __future__ import annotations

import pytest

from fastrnn.precompile import main, precompile


def test_precompile_reports_each_dtype(capsys):
    assert set(precompile(("float32",))) == {"float32"}
    assert main(["float32"]) == 0
    assert "fastrnn cpu kernels for float32: ready" in capsys.readouterr().out


def test_precompile_without_arguments_does_float32(capsys):
    """The README's `python -m fastrnn.precompile`, no argument: float32."""
    assert main([]) == 0
    out = capsys.readouterr().out
    assert "fastrnn cpu kernels for float32: ready" in out
    assert "float64" not in out


def test_precompile_names_an_unknown_dtype(capsys):
    with pytest.raises(SystemExit):
        main(["float8"])
    assert "unknown dtype 'float8'" in capsys.readouterr().err


def test_precompile_refuses_what_has_no_kernel():
    with pytest.raises(ValueError, match="no float16 CPU kernels"):
        precompile(("float16",))


def test_precompile_forked_also_runs_the_serial_twins(monkeypatch, capsys):
    """`--forked` runs the cells a second time inside `serial_kernels` (the twins on one
    thread, what a forked child calls); without it only the parallel kernels run."""
    from fastrnn import precompile as module
    from fastrnn import recurrence_cpu

    calls = []

    def record(dtype, device, parts):
        calls.append((recurrence_cpu._serial, recurrence_cpu._rnn_forward.__name__))

    monkeypatch.setattr(module, "_run_cells", record)
    assert main(["--forked", "--jobs", "1"]) == 0
    assert calls == [(False, "rnn_forward"), (True, "rnn_forward_serial")]
    assert recurrence_cpu._rnn_forward.__name__ == "rnn_forward"  # restored
    calls.clear()
    assert main(["--jobs", "1"]) == 0
    assert calls == [(False, "rnn_forward")]
    assert "ready" in capsys.readouterr().out


def test_precompile_in_processes(capsys):
    """`--jobs 2`: each part compiles (or loads its cache) in a process of its own; a part
    that fails says so with the process's output."""
    assert main(["--jobs", "2", "--parts", "rnn,cells", "float32"]) == 0  # two groups
    assert "fastrnn cpu kernels for float32: ready" in capsys.readouterr().out
    from fastrnn import precompile as module

    with pytest.raises(RuntimeError, match="precompiling rnn failed"):
        module.precompile_in_processes(("float16",), ("rnn",), jobs=2)


def test_precompile_names_an_unknown_part(capsys):
    with pytest.raises(SystemExit):
        main(["--parts", "lstm,transformer"])
    assert "choose parts from lstm,gru,rnn,cells" in capsys.readouterr().err


def test_part_groups():
    from fastrnn.precompile import PARTS, part_groups

    assert part_groups(PARTS, 1) == [PARTS]
    assert part_groups(PARTS, 2) == [("lstm", "cells"), ("gru", "rnn")]
    assert part_groups(("gru", "rnn"), 2) == [("gru", "rnn")]  # one process then
    assert part_groups(("rnn", "lstm"), 8) == [("lstm",), ("rnn",)]
    assert sorted(p for group in part_groups(PARTS, 3) for p in group) == sorted(PARTS)
