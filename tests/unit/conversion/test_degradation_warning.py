"""`sq-onnx convert` never converts silently: when verification finds the converted model far from the float
one (the QLinearMatMul form that broke SmolLM2 read relative error 0.99, top-1 29%), it says so on stderr in
every output mode; a usual conversion (0.05-0.15) prints no warning."""

from __future__ import annotations

import json

import pytest

import sq_onnx.pipeline
from sq_onnx.cli import main
from sq_onnx.verify import degradation_warning


class _Result:
    def __init__(self, verify: dict) -> None:
        self.verify = verify

    def to_dict(self) -> dict:
        return {"verify": self.verify}


def _verify(error: float) -> dict:
    top1 = 0.29 if error > 0.5 else 0.88
    return {
        "samples": 16,
        "relative_error": error,
        "cosine": 0.3,
        "top1_agreement": top1,
        "max_abs_error": 50.0,
    }


@pytest.mark.parametrize("mode", ["--json", "--quiet"])
@pytest.mark.parametrize(("error", "warned"), [(0.99, True), (0.12, False)])
def test_convert_warns_when_verification_finds_the_model_broken(monkeypatch, capsys, mode, error, warned):
    monkeypatch.setattr(sq_onnx.pipeline, "convert", lambda *a, **k: _Result(_verify(error)))
    assert main(["convert", "m.onnx", "-o", "out.onnx", mode]) == 0
    out, err = capsys.readouterr()
    if mode == "--json":
        assert json.loads(out)["verify"]["relative_error"] == error
    assert ("warning" in err) is warned
    if warned:
        assert "relative error 0.99, top-1 agreement 29%" in err and "--exclude" in err


def test_no_verification_no_warning() -> None:
    assert degradation_warning(None) is None
    assert degradation_warning({"samples": 2, "relative_error": 0.6, "top1_agreement": None}) is not None
