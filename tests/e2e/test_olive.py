"""sq-onnx as a step of an Olive workflow: `olive run --package-config` loads the SqOnnxQuantization pass,
whose options are the Recipe's, and its output is the model sq-onnx convert writes."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest

import tiny_models

pytest.importorskip("olive", reason="olive-ai is not installed (pip install olive-ai)")

from sq_onnx.olive_pass import PASS_NAME, SqOnnxQuantization, package_config, write_package_config  # noqa: E402
from sq_onnx.recipe import Recipe  # noqa: E402


def test_the_pass_offers_every_recipe_option_with_its_default():
    from olive.hardware import DEFAULT_CPU_ACCELERATOR

    params = SqOnnxQuantization._default_config(DEFAULT_CPU_ACCELERATOR)
    defaults = Recipe().to_dict()
    assert set(defaults) <= set(params) and {"calibration", "tokenizer", "progress"} <= set(params)
    assert all(params[name].default_value == value for name, value in defaults.items())
    assert PASS_NAME in package_config()["passes"] and "OnnxQuantization" in package_config()["passes"]


def test_an_olive_workflow_runs_the_conversion(llama_dir, tmp_path):
    calib = tmp_path / "calib.npz"
    np.savez(calib, input_ids=tiny_models.random_ids(8, 32))
    workflow = {
        "input_model": {"type": "ONNXModel", "model_path": str(llama_dir / "model.onnx")},
        "passes": {
            "quantize": {"type": PASS_NAME, "scheme": "w8a8", "samples": 4, "calibration": str(calib)}
        },
        "output_dir": str(tmp_path / "out"),
        "log_severity_level": 3,
    }
    (tmp_path / "workflow.json").write_text(json.dumps(workflow))
    packages = write_package_config(tmp_path / "packages.json")
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "olive",
            "run",
            "--config",
            str(tmp_path / "workflow.json"),
            "--package-config",
            str(packages),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    assert "sq-onnx: calibrating: 0/" in run.stderr  # a long conversion is not silent in Olive's log
    models = sorted((tmp_path / "out").rglob("*.onnx"))
    assert models, f"no model in {sorted(p.name for p in (tmp_path / 'out').rglob('*'))}"
    proto = onnx.load(str(models[0]))
    assert "MatMulIntegerToFloat" in {n.op_type for n in proto.graph.node}
    assert json.loads({p.key: p.value for p in proto.metadata_props}["sq_onnx.recipe"])["samples"] == 4
