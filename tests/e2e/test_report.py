"""``convert --report``: files, fields, embedded plots; and the layer-error emulation checked against ORT."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.cli import main
from sq_onnx.passes.linears import find_linears
from sq_onnx.passes.quantize_w4 import replace_with_matmulnbits
from sq_onnx.passes.quantize_w8a8 import quantize_w8a8
from sq_onnx.reporting.layer_error import emulate

from conftest import rel_error

GROUP_FIELDS = {
    "tensor",
    "kind",
    "alpha",
    "consumers",
    "modules",
    "act_absmax_before",
    "act_absmax_after",
    "scales",
    "weight_absmax_before",
    "weight_absmax_after",
    "top_channels",
}
TOP_FIELDS = {
    "version",
    "model",
    "output",
    "scheme",
    "alpha",
    "recipe",
    "calibration",
    "verify",
    "smoothing_check",
    "alpha_search",
    "sizes",
    "groups",
    "layers",
    "plots",
}


def _one_matmul(k: int, n: int, seed: int = 0) -> ir.Model:
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(k, n)).astype(np.float32)
    w[3] *= 20.0  # an outlier row, so the grids are not trivially exact
    tape = ir.tape.Tape()
    x = ir.Value(name="x", shape=ir.Shape(["r", k]), type=ir.TensorType(ir.DataType.FLOAT))
    y = tape.op("MatMul", [x, tape.initializer(ir.tensor(w, name="w"))])
    y.name, y.type = "y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [y], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 18})
    graph.node(0).name = "mm"
    return ir.Model(graph, ir_version=10)


def _quantize(model: ir.Model, kind: str, x: np.ndarray) -> None:
    graph = model.graph
    linear = find_linears(graph)[0]
    model.opset_imports["com.microsoft"] = 1
    if kind.startswith("w4") or kind == "w8":
        bits = 8 if kind == "w8" else 4
        replace_with_matmulnbits(graph, linear, bits, 32, kind == "w4-sym", 0, clip_search=True)
    else:
        act = kind.split(":")[1]
        kernels = "sq_onnx" if act == "sq_onnx" else "ort"
        act = "per-token" if act == "sq_onnx" else act
        quantize_w8a8(graph, [linear], 18, act, {"x": float(np.abs(x).max())}, kernels=kernels)


@pytest.mark.parametrize(
    "kind", ["w4", "w4-sym", "w8", "w8a8:per-token", "w8a8:per-tensor", "w8a8:static", "w8a8:sq_onnx"]
)
@pytest.mark.parametrize("k", [64, 100])
def test_layer_error_emulation_matches_ort(kind, k):
    """The report's numbers come from unpacking the saved graph; they must be what ORT computes."""
    from sq_onnx.runtime import custom_ops
    from sq_onnx.runtime.ort_session import session_options

    if kind.endswith("sq_onnx") and not custom_ops.available():
        pytest.skip("custom-op library not built")
    x = np.random.default_rng(1).normal(size=(37, k)).astype(np.float32)
    model = _one_matmul(k, 24)
    _quantize(model, kind, x)
    so = session_options(custom_ops=kind.endswith("sq_onnx"))
    sess = ort.InferenceSession(
        ir.to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    got_ort = sess.run(None, {"x": x})[0]
    node = next(n for n in model.graph if n.name == "mm")
    got_numpy = emulate(node, x)
    assert got_numpy is not None
    assert rel_error(got_ort, got_numpy) < 1e-5


@pytest.mark.parametrize(
    "scheme,alpha",
    [("w4", "0.4"), ("w8a8", "auto")],
)
def test_report_files_fields_and_plots(scheme, alpha, llama_dir, calib_ids, tmp_path):
    np.savez(tmp_path / "calib.npz", **calib_ids)
    folder = tmp_path / "report"
    out = tmp_path / "q.onnx"
    args = ["convert", str(llama_dir / "model.onnx"), "-o", str(out), "--scheme", scheme]
    args += ["--alpha", alpha, "--calib", str(tmp_path / "calib.npz"), "--report", str(folder), "--quiet"]
    assert main(args) == 0
    report = json.loads((folder / "report.json").read_text())
    page = (folder / "report.html").read_text()

    assert set(report) >= TOP_FIELDS
    assert report["sizes"]["output_bytes"] == out.stat().st_size
    assert report["groups"], "the tiny Llama has smoothable groups"
    # Every field against values taken here, from the original graph, ORT and the saved graph
    calibrated = report["calibration"]["samples"]
    act = _act_absmax(
        llama_dir / "model.onnx", [g["tensor"] for g in report["groups"]], calib_ids, calibrated
    )
    weights = {lin.name: lin.weight_kn() for lin in find_linears(ir.load(llama_dir / "model.onnx").graph)}
    saved = [
        v.const_value.numpy() for v in ir.load(out).graph.initializers.values() if v.const_value is not None
    ]
    original = {
        v.name: v.const_value.numpy() for v in ir.load(llama_dir / "model.onnx").graph.initializers.values()
    }
    for group in report["groups"]:
        assert set(group) >= GROUP_FIELDS
        before = act[group["tensor"]]
        w_before = np.max([np.abs(weights[c]).max(axis=1) for c in group["consumers"]], axis=0)
        s = before ** group["alpha"] / w_before ** (1 - group["alpha"])  # SmoothQuant's s, written here
        if group["kind"].startswith("attention values"):  # W8A8 folds v -> o: one s per KV-head column
            heads, kv_heads = 4, 2  # tiny_models: o_proj channel h*D + d reads v_proj column (h // 2)*D + d
            d = before.size // heads
            columns = np.array([(h // (heads // kv_heads)) * d + j for h in range(heads) for j in range(d)])
            act_cols, w_cols = np.zeros(kv_heads * d), np.zeros(kv_heads * d)
            np.maximum.at(act_cols, columns, before)
            np.maximum.at(w_cols, columns, w_before)
            s = (act_cols ** group["alpha"] / w_cols ** (1 - group["alpha"]))[columns]
        np.testing.assert_allclose(group["act_absmax_before"], before, rtol=1e-5)
        np.testing.assert_allclose(group["weight_absmax_before"], w_before, rtol=1e-6)
        np.testing.assert_allclose(group["scales"], s, rtol=1e-4)
        np.testing.assert_allclose(group["act_absmax_after"], before / s, rtol=1e-4)
        np.testing.assert_allclose(group["weight_absmax_after"], w_before * s, rtol=1e-4)
        assert group["top_channels"][0] == int(np.argmax(before))
        if "(" in group["kind"]:  # folded into a linear producer's columns, not into a norm's γ
            continue
        # the norm's γ in the saved graph is the original γ divided by those scales
        gammas = [g for g in original.values() if g.shape == s.shape and not np.allclose(g, 0)]
        assert any(np.allclose(x, g / s, rtol=1e-5) for g in gammas for x in saved if x.shape == s.shape)
    errors = [layer["relative_error"] for layer in report["layers"]]
    assert errors == sorted(errors, reverse=True)
    assert {layer["name"] for layer in report["layers"]} == _quantized_linears(out, report["joined_linears"])
    assert bool(report["joined_linears"]) == (scheme == "w4")
    assert all(0 < e < 0.5 for e in errors)
    # Every plot named in the JSON is embedded, and nothing links outside the file.
    images = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(images) == len(report["plots"]) == len(report["groups"]) + 1 + (alpha == "auto")
    assert ("alpha_search" in report["plots"]) == (alpha == "auto")
    assert "http" not in page.replace("http-equiv", "")


def _act_absmax(path, tensors: list[str], calib: dict, samples: int) -> dict[str, np.ndarray]:
    """Per-channel abs-max of each tensor over the first ``samples`` calibration samples, by ORT on the
    original model with those tensors made outputs (not through sq-onnx's calibration)."""
    model = ir.load(path)
    values = {v.name: v for node in model.graph for v in node.outputs}
    model.graph.outputs.extend(values[t] for t in tensors)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    best = {t: 0.0 for t in tensors}
    for i in range(samples):
        ids = calib["input_ids"][i : i + 1]
        outs = sess.run(tensors, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        for t, o in zip(tensors, outs, strict=True):
            best[t] = np.maximum(best[t], np.abs(o).reshape(-1, o.shape[-1]).max(axis=0))
    return best


def _quantized_linears(path, joined: list[list[str]]) -> set[str]:
    """The quantized nodes of the file, a joined MatMulNBits counted as the linears it holds."""
    ops = {"MatMulNBits", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"}
    names = {n.name for n in ir.load(path).graph if n.op_type in ops}
    for linears in joined:
        names.remove(f"{linears[0]}.joined")
        names.update(linears)
    return names


def test_report_refuses_existing_files_and_keeps_them(llama_dir, calib_ids, tmp_path):
    folder = tmp_path / "rep"
    folder.mkdir()
    (folder / "report.json").write_text("mine")
    with pytest.raises(Exception, match="already exists"):
        convert(llama_dir / "model.onnx", tmp_path / "q.onnx", Recipe(), calib_ids, report=folder)
    assert (folder / "report.json").read_text() == "mine"
    assert not (tmp_path / "q.onnx").exists(), "a bad report path fails before any work"
    (tmp_path / "file").write_text("x")
    with pytest.raises(Exception, match="not a folder"):
        convert(llama_dir / "model.onnx", tmp_path / "q.onnx", Recipe(), calib_ids, report=tmp_path / "file")
