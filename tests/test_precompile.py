"""`python -m fastrnn.precompile` compiles (or loads) every float32 kernel and says so."""

from __future__ import annotations

import pytest

from fastrnn.precompile import main, precompile


def test_precompile_reports_each_dtype(capsys):
    assert set(precompile(("float32",))) == {"float32"}
    assert main(["float32"]) == 0
    assert "fastrnn cpu kernels for float32: ready" in capsys.readouterr().out


def test_precompile_refuses_what_has_no_kernel():
    with pytest.raises(ValueError, match="no float16 CPU kernels"):
        precompile(("float16",))
