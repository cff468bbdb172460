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

    def record(dtype, device):
        calls.append((recurrence_cpu._serial, recurrence_cpu._rnn_forward.__name__))

    monkeypatch.setattr(module, "_run_cells", record)
    assert main(["--forked"]) == 0
    assert calls == [(False, "rnn_forward"), (True, "rnn_forward_serial")]
    assert recurrence_cpu._rnn_forward.__name__ == "rnn_forward"  # restored
    calls.clear()
    assert main([]) == 0
    assert calls == [(False, "rnn_forward")]
    assert "ready" in capsys.readouterr().out
