"""The CLI: --json output, inspect, and every user-error path (one sentence, exit 2, no traceback)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sq_onnx.cli import main

from conftest import tiny_models


def _text(tmp_path, text: str) -> str:
    path = tmp_path / "calib.txt"
    path.write_text(text)
    return str(path)


def _npz(tmp_path, **arrays):
    path = tmp_path / "c.npz"
    np.savez(path, **arrays)
    return str(path)


def test_convert_json(llama_dir, tmp_path, capsys):
    calib = _npz(tmp_path, input_ids=tiny_models.random_ids(6, 32))
    out = tmp_path / "w8.onnx"
    code = main(
        [
            "convert",
            str(llama_dir / "model.onnx"),
            "-o",
            str(out),
            "--scheme",
            "w8a8",
            "--calib",
            calib,
            "--samples",
            "4",
            "--json",
        ]
    )
    assert code == 0
    data = json.loads(capsys.readouterr().out)
    for key in (
        "output",
        "scheme",
        "alpha",
        "smoothed_groups",
        "quantized_matmuls",
        "skipped",
        "verify",
        "seconds",
    ):
        assert key in data
    # W8A8 folds into the linear producers by default: 5 norm groups, and up -> down, v -> o per layer
    assert data["scheme"] == "w8a8" and data["alpha"] == 0.5 and len(data["smoothed_groups"]) == 9
    assert all(s["reason"] for s in data["skipped"])


def test_convert_gptq_by_default_with_its_own_sample_count(llama_dir, tmp_path, capsys):
    calib = _npz(tmp_path, input_ids=tiny_models.random_ids(6, 32))
    out = tmp_path / "w4.onnx"
    args = ["convert", str(llama_dir / "model.onnx"), "-o", str(out), "--calib", calib, "--json"]
    assert (
        main([*args, "--samples", "2", "--gptq-samples", "4", "--block-size", "32", "--gptq-refine", "2"])
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert data["recipe"]["gptq"] is True and data["recipe"]["act_order"] is True
    assert data["recipe"]["gptq_refine"] == 2
    assert data["calibration"]["samples"] == 2 and data["calibration"]["hessian_samples"] == 4
    assert data["quantized_matmuls"] and data["verify"]["top1_agreement"] > 0.5


def test_convert_summary_and_quiet(llama_dir, tmp_path, capsys):
    calib = _npz(tmp_path, input_ids=tiny_models.random_ids(4, 16))
    assert (
        main(["convert", str(llama_dir / "model.onnx"), "-o", str(tmp_path / "a.onnx"), "--calib", calib])
        == 0
    )
    got = capsys.readouterr()
    out = got.out
    assert "verify on" in out
    # stderr is not a terminal here (a log, a CI job): progress comes as lines, each loop started and finished
    progress = got.err.splitlines()
    assert progress[0].startswith("sq-onnx: calibrating: 0/") and "sq-onnx: quantizing: 0/" in got.err
    assert any(line.startswith("sq-onnx: quantizing: ") and " done in " in line for line in progress)
    # where the time went, every stage in order (the scale benchmark, tools/bench_scale.py, reads them too)
    stages = out.split("time: ")[1].splitlines()[0]
    names = [part.rsplit(" ", 1)[0] for part in stages.split(", ")]
    assert names == [
        "load and analyze",
        "samples",
        "calibrate",
        "choose alpha",
        "smooth",
        "choose 8-bit",
        "quantize",
        "verify",
        "save",
    ]
    assert (
        main(
            [
                "convert",
                str(llama_dir / "model.onnx"),
                "-o",
                str(tmp_path / "b.onnx"),
                "--calib",
                calib,
                "--quiet",
            ]
        )
        == 0
    )
    assert capsys.readouterr() == ("", "")  # --quiet: no progress either


def test_inspect(llama_fused, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    assert main(["inspect", str(llama_fused / "model.onnx"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert len(info["groups"]) == 5 and info["schemes"]["w4"]["counts"]["MatMulNBits 4-bit"] == 14
    # each layer's two norms feed only W8A8 linears, so --kernels sq_onnx fuses them; the final norm feeds
    # the lm_head, which W8A8 quantizes weight-only (8-bit MatMulNBits), so there is nothing to fuse with
    assert info["fusions"] == {"fused": 4, "not_fused": []}
    assert main(["inspect", str(llama_fused / "model.onnx")]) == 0
    out = capsys.readouterr().out
    assert "SkipSimplifiedLayerNormalization" in out and "4 norm(s) fused" in out


def test_inspect_calib_ranks_outlier_channels(llama_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "250")
    calib = _npz(tmp_path, input_ids=tiny_models.random_ids(4, 16))
    assert main(["inspect", str(llama_dir / "model.onnx"), "--calib", calib, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    outliers = info["outliers"]
    assert outliers["samples"] == 4
    assert set(outliers["groups"]) == {g["tensor"] for g in info["groups"]}
    for data in outliers["groups"].values():
        values = [t["absmax"] for t in data["top"]]
        assert values == sorted(values, reverse=True) and values[0] >= data["median_absmax"] > 0
    # tiny_models injects outlier channels into γ; the calibrated ranking must find them at the top.
    hits = [d["top"][0]["channel"] in tiny_models.OUTLIER_CHANNELS for d in outliers["groups"].values()]
    assert sum(hits) >= 4, "both norms of both layers have injected outlier channels"
    assert main(["inspect", str(llama_dir / "model.onnx"), "--calib"]) == 0
    out = capsys.readouterr().out
    assert "Activation outliers" in out and "built-in mix" in out and "self_attn" in out


def _no_quant_model(tmp_path):
    import onnx_ir as ir

    x = ir.Value(name="X", shape=ir.Shape([2]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Relu", [x])
    node.outputs[0].name = "Y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": 18})
    path = tmp_path / "relu.onnx"
    ir.save(ir.Model(graph, ir_version=10), path)
    return path


@pytest.mark.parametrize(
    "case",
    [
        "missing",
        "directory",
        "not_onnx",
        "empty",
        "nothing",
        "bad_alpha",
        "bad_scheme",
        "bad_gptq_samples",
        "bad_gptq_refine",
        "exists",
        "same_as_input",
        "no_tokenizer",
        "bad_calib_name",
        "bad_calib_dtype",
        "missing_calib",
        "empty_calib_text",
        "short_calib_text",
        "empty_calib_npz",
        "no_calib_samples",
        "bad_calib_rank",
        "output_parent_is_file",
        "output_folder_unwritable",
    ],
)
def test_user_errors_exit_2_with_one_sentence(case, llama_dir, tmp_path, capsys):
    model = str(llama_dir / "model.onnx")
    out = str(tmp_path / "o.onnx")
    calib = _npz(tmp_path, input_ids=tiny_models.random_ids(3, 16))
    args = {
        "missing": ["convert", str(tmp_path / "nope.onnx"), "-o", out],
        "directory": ["convert", str(tmp_path), "-o", out],
        "not_onnx": ["convert", str(tmp_path / "junk.onnx"), "-o", out],
        "empty": ["convert", str(tmp_path / "empty.onnx"), "-o", out],
        "nothing": ["convert", "RELU", "-o", out],
        "bad_alpha": ["convert", model, "-o", out, "--alpha", "1.5"],
        "bad_scheme": ["convert", model, "-o", out, "--scheme", "w3"],
        "bad_gptq_samples": ["convert", model, "-o", out, "--gptq-samples", "0", "--calib", calib],
        "bad_gptq_refine": ["convert", model, "-o", out, "--gptq-refine", "-1", "--calib", calib],
        "exists": ["convert", model, "-o", str(tmp_path / "exists.onnx"), "--calib", calib],
        "same_as_input": ["convert", model, "-o", model, "--overwrite"],
        "no_tokenizer": ["convert", "COPY", "-o", out],
        "bad_calib_name": [
            "convert",
            model,
            "-o",
            out,
            "--calib",
            _npz(tmp_path, tokens=np.zeros((2, 8), np.int64)),
        ],
        "bad_calib_dtype": [
            "convert",
            model,
            "-o",
            out,
            "--calib",
            _npz(tmp_path, input_ids=np.zeros((2, 8), np.float32)),
        ],
        "missing_calib": ["convert", model, "-o", out, "--calib", str(tmp_path / "none.txt")],
        "empty_calib_text": ["convert", model, "-o", out, "--calib", _text(tmp_path, "")],
        "short_calib_text": ["convert", model, "-o", out, "--calib", _text(tmp_path, "two words")],
        "empty_calib_npz": ["convert", model, "-o", out, "--calib", _npz(tmp_path)],
        "no_calib_samples": [
            "convert",
            model,
            "-o",
            out,
            "--calib",
            _npz(tmp_path, input_ids=np.zeros((0, 8), np.int64)),
        ],
        "bad_calib_rank": [
            "convert",
            model,
            "-o",
            out,
            "--calib",
            _npz(tmp_path, input_ids=np.zeros(3, np.int64)),
        ],
        "output_parent_is_file": ["convert", model, "-o", str(tmp_path / "exists.onnx" / "o.onnx")],
        # procfs refuses new folders even to root, so this holds in containers that run tests as root.
        "output_folder_unwritable": ["convert", model, "-o", "/proc/sq-onnx-test/o.onnx"],
    }[case]
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage that is not a protobuf" * 10)
    (tmp_path / "empty.onnx").write_bytes(b"")
    (tmp_path / "exists.onnx").write_bytes(b"x")
    if "RELU" in args:
        args[args.index("RELU")] = str(_no_quant_model(tmp_path))
    if "COPY" in args:
        copy = tmp_path / "copy" / "model.onnx"
        copy.parent.mkdir()
        copy.write_bytes((llama_dir / "model.onnx").read_bytes())
        args[args.index("COPY")] = str(copy)
    with pytest.raises(SystemExit) if case in ("bad_alpha", "bad_scheme") else _nullcontext() as exc:
        code = main(args)
    if case in ("bad_alpha", "bad_scheme"):
        code = exc.value.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and err.startswith("sq-onnx: error:"), err


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_a_graph_with_nothing_to_smooth_converts_unsmoothed_and_says_why(tmp_path, capsys):
    """MatMul -> Tanh -> MatMul from a graph input: no producer can absorb a scale, so nothing is smoothed;
    both linears are still quantized and the summary says why each input was left as it is."""
    import onnx_ir as ir

    rng = np.random.default_rng(0)
    tape = ir.tape.Tape()
    x = ir.Value(name="x", shape=ir.Shape(["b", 64]), type=ir.TensorType(ir.DataType.FLOAT))
    w1 = tape.initializer(ir.tensor(rng.normal(size=(64, 128)).astype(np.float32), name="w1"))
    w2 = tape.initializer(ir.tensor(rng.normal(size=(128, 32)).astype(np.float32), name="w2"))
    y = tape.op("MatMul", [tape.op("Tanh", [tape.op("MatMul", [x, w1])]), w2])
    y.name, y.type, y.shape = "y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["b", 32])
    graph = ir.Graph([x], [y], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 18})
    ir.save(ir.Model(graph, ir_version=10), tmp_path / "plain.onnx")
    calib = _npz(tmp_path, x=rng.normal(size=(8, 4, 64)).astype(np.float32))
    args = ["convert", str(tmp_path / "plain.onnx"), "-o", str(tmp_path / "q.onnx"), "--calib", calib]
    assert main([*args, "--scheme", "w8a8"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "no group to smooth" in out and "2 linears quantized" in out
    assert "not smoothed: x" in out and "graph input" in out and "cannot absorb a per-channel scale" in out
