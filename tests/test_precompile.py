"""`python -m fastrnn.precompile` compiles (or loads) every float32 kernel and says so."""

from __future__ import annotations

from fastrnn.precompile import main, precompile


def test_precompile_reports_each_dtype(capsys):
    assert set(precompile(("float32",))) == {"float32"}
    assert main(["float32"]) == 0
    assert "fastrnn kernels for float32: ready" in capsys.readouterr().out
