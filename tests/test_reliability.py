"""Never break quietly: already-quantized input, a failing write, determinism, SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import onnx_ir as ir
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.errors import OutputError, SqOnnxError


def test_already_quantized_model_is_refused(llama_dir, tmp_path, calib_ids):
    w4 = tmp_path / "w4.onnx"
    convert(llama_dir / "model.onnx", w4, Recipe(samples=2), calibration=calib_ids)
    with pytest.raises(SqOnnxError, match="already quantized"):
        convert(w4, tmp_path / "again.onnx", Recipe(samples=2), calibration=calib_ids)


def test_failed_write_keeps_previous_output_and_leaves_no_partial_file(
    llama_dir, tmp_path, calib_ids, monkeypatch
):
    out = tmp_path / "o.onnx"
    convert(llama_dir / "model.onnx", out, Recipe(samples=2), calibration=calib_ids)
    before = out.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ir, "save", full_disk)
    with pytest.raises(OutputError, match="No space left"):
        convert(
            llama_dir / "model.onnx",
            out,
            Recipe(scheme="w8a8", samples=2),
            calibration=calib_ids,
            overwrite=True,
        )
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.onnx"]


@pytest.mark.parametrize("scheme", ["w4", "w8a8"])
def test_same_input_and_recipe_give_identical_bytes(scheme, llama_dir, tmp_path, calib_ids):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    recipe = Recipe(scheme=scheme, samples=3, alpha_search="layer", search_rows=64)
    convert(llama_dir / "model.onnx", a, recipe, calibration=calib_ids)
    convert(llama_dir / "model.onnx", b, recipe, calibration=calib_ids)
    assert a.read_bytes() == b.read_bytes()


def test_sigterm_during_convert_leaves_no_output(llama_dir, tmp_path):
    out = tmp_path / "t.onnx"
    cmd = [
        sys.executable,
        "-m",
        "sq_onnx",
        "convert",
        str(llama_dir / "model.onnx"),
        "-o",
        str(out),
        "--alpha",
        "auto",
        "--alpha-step",
        "0.001",
        "--seq-len",
        "32",
    ]
    proc = subprocess.Popen(
        cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}
    )
    time.sleep(8)  # well into the α search (1001 candidates: minutes of work)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-1] == "sq-onnx: interrupted; no output was written."
    assert list(tmp_path.iterdir()) == []
