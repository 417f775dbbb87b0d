"""`--format`: the same quantization written as ORT contrib ops, as standard QDQ ops for execution providers, or
as the QOperator form's MatMulInteger. Every format runs on ORT's CPU provider; QDQ models pass the full onnx checker with standard
ops only and ORT's optimizer fuses them into its integer kernels; QDQ W4 computes what MatMulNBits W4 does."""

from __future__ import annotations

import onnx
import onnxruntime as ort
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.cli import main
from sq_onnx.errors import RecipeError
from sq_onnx.runtime.cpu_info import cpu_features

from conftest import ids_feed, rel_error

# RTN with the clip search: the codes do not depend on how ORT runs the layers already quantized (sequential
# GPTQ reads them through ORT, which fuses blocked DequantizeLinear + MatMul into its level-4 MatMulNBits)
W4_LEVEL0 = dict(
    scheme="w4", samples=4, gptq=False, accuracy_level=0, lm_head_accuracy_level=0, embedding="fp"
)


def _run(path, feed, optimize=True, optimized_to=None):
    so = ort.SessionOptions()
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if optimized_to is not None:
        so.optimized_model_filepath = str(optimized_to)
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def _has_vnni() -> bool:
    """Whether ONNX Runtime's uint8 x int8 kernels can use AVX-512 VNNI (no int16 intermediate sums); numpy's
    CPU features name no AVX-VNNI (256-bit), so those CPUs get the AVX2 bound."""
    return bool(cpu_features().get("AVX512VNNI"))


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _standard_only(path) -> None:
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    assert {n.domain for n in proto.graph.node} <= {""}
    assert {o.domain for o in proto.opset_import} <= {"", "ai.onnx"}


def test_qdq_w8a8_is_standard_onnx_that_ort_fuses_into_integer_ops(llama_dir, calib_ids, tmp_path):
    src = llama_dir / "model.onnx"
    qdq, static = tmp_path / "qdq.onnx", tmp_path / "static.onnx"
    result = convert(src, qdq, Recipe(scheme="w8a8", act="static", format="qdq", samples=4), calib_ids)
    # static activations fold into the linear producers by default: down_proj and o_proj are smoothed too
    kinds = [g["kind"].split(" (")[0] for g in result.smoothed_groups]
    assert kinds.count("gated product") == kinds.count("attention values") == 2
    # the contrib form with its embedding in float too, as --format qdq keeps it
    convert(
        src, static, Recipe(scheme="w8a8", act="static", samples=4, embedding="fp"), calibration=calib_ids
    )
    _standard_only(qdq)
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul"} <= _ops(qdq)
    feed = ids_feed()
    fused = tmp_path / "fused.onnx"
    out = _run(qdq, feed, optimized_to=fused)
    # ORT's CPU optimizer turns the Q/DQ + MatMul units into its integer kernels
    assert _ops(fused) & {"QLinearMatMul", "MatMulIntegerToFloat", "MatMulInteger"}
    ref = _run(src, feed)
    # same scales and codes as the contrib static form: the two agree far closer than either to float. Without
    # VNNI, ORT runs the fused form as uint8 x int8 (its QDQS8ToU8 transform), whose AVX2 kernel sums pairs of
    # products in int16 with saturation (vpmaddubsw): on this outlier-injected model that moves the output by half
    # the quantization error (SmolLM2's static QDQ: KL 0.078 -> 0.080, tools/RESULTS.md).
    agree = 0.1 if _has_vnni() else 0.75
    assert rel_error(out, _run(static, feed)) < agree * rel_error(ref, out) + 1e-4
    assert rel_error(ref, out) < 0.3


def test_qoperator_w8a8_is_the_static_contrib_form_in_standard_ops(llama_dir, calib_ids, tmp_path):
    """QuantizeLinear -> MatMulInteger -> Cast -> Mul: the same int8 activations and weights as the contrib
    static form (MatMulIntegerToFloat), so the same outputs; no QLinearMatMul, whose int8 output (one scale
    per tensor) LLMs' massive activations break (tests/unit/passes/test_quantize_qdq.py)."""
    src, out, static = llama_dir / "model.onnx", tmp_path / "qop.onnx", tmp_path / "static.onnx"
    recipe = Recipe(scheme="w8a8", act="static", format="qoperator", samples=4)
    result = convert(src, out, recipe, calibration=calib_ids)
    convert(
        src, static, Recipe(scheme="w8a8", act="static", samples=4, embedding="fp"), calibration=calib_ids
    )
    _standard_only(out)
    ops = _ops(out)
    assert "MatMulInteger" in ops and "QLinearMatMul" not in ops and len(result.quantized_matmuls) > 0
    feed = ids_feed()
    ref, got = _run(src, feed), _run(out, feed)
    assert rel_error(_run(static, feed), got) < 1e-4 < rel_error(ref, got) < 0.35
    assert result.verify["top1_agreement"] > 0.5


def test_qdq_w4_computes_what_matmulnbits_does(llama_dir, calib_ids, tmp_path):
    src, qdq, nbits = llama_dir / "model.onnx", tmp_path / "qdq.onnx", tmp_path / "nbits.onnx"
    convert(src, qdq, Recipe(**W4_LEVEL0, format="qdq"), calibration=calib_ids)
    convert(src, nbits, Recipe(**W4_LEVEL0), calibration=calib_ids)
    _standard_only(qdq)
    assert "MatMulNBits" in _ops(nbits) and "MatMulNBits" not in _ops(qdq)
    feed = ids_feed()
    # dequantized weights times float activations (no fusion) against MatMulNBits at accuracy level 0:
    # the same codes and grid, so float rounding apart
    assert rel_error(_run(nbits, feed), _run(qdq, feed, optimize=False)) < 1e-5
    fused = tmp_path / "fused.onnx"
    _run(qdq, feed, optimized_to=fused)
    assert "MatMulNBits" in _ops(fused)  # what ORT's CPU optimizer makes of the blocked DequantizeLinear


@pytest.mark.parametrize(
    "flags,said",
    [
        (["--scheme", "w8a8", "--format", "qdq"], "--act static"),
        (["--scheme", "w4", "--format", "qoperator"], "MatMulInteger"),
        (["--scheme", "w8a8", "--kernels", "sq_onnx", "--format", "qdq"], "--kernels ort"),
        (["--scheme", "w8a8", "--act", "static", "--act16", "down_proj"], "--format qdq"),
        (
            ["--scheme", "w8a8", "--act", "static", "--format", "qdq", "--act16", "no_such_layer"],
            "matches no",
        ),
    ],
)
def test_formats_a_scheme_cannot_write_are_refused(flags, said, llama_dir, tmp_path, capsys):
    out = tmp_path / "m.onnx"
    assert main(["convert", str(llama_dir / "model.onnx"), "-o", str(out), "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and not out.exists()
    with pytest.raises(RecipeError):
        Recipe(scheme="w4", format="qoperator")


def test_an_onnxruntime_too_old_for_the_format_is_refused_before_any_work(
    llama_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(ort, "__version__", "1.19.2")
    out = tmp_path / "m.onnx"
    flags = ["--scheme", "w4", "--format", "qdq", "--quiet"]
    assert main(["convert", str(llama_dir / "model.onnx"), "-o", str(out), *flags]) == 2
    err = capsys.readouterr().err
    assert "onnxruntime >= 1.20" in err and "1.19.2" in err and not out.exists()


def test_exclude_by_module_survives_the_opset_upgrade(llama_dir, calib_ids, tmp_path):
    """QDQ needs opset 21, and onnx's version converter drops the nodes' metadata, where torch.onnx records
    the module paths that --exclude (and the report) read: they are copied back by node name."""
    out = tmp_path / "qdq.onnx"
    recipe = Recipe(scheme="w8a8", act="static", format="qdq", samples=4, exclude=(r"o_proj$",))
    result = convert(llama_dir / "model.onnx", out, recipe, calibration=calib_ids)
    assert result.opset_upgrade is not None
    kept = [k for k in result.kept_float if "o_proj" in k["reason"]]
    assert len(kept) == 2  # one per layer
    graph = onnx.load(str(out)).graph
    weights = {i.name for i in graph.initializer}
    names = {k["node"] for k in kept}
    float_matmuls = [
        n for n in graph.node if n.op_type == "MatMul" and n.name in names and n.input[1] in weights
    ]
    assert len(float_matmuls) == 2  # float weights, no DequantizeLinear in front


def test_act16_writes_int16_activations_for_the_matching_linears(llama_dir, calib_ids, tmp_path):
    """A16W8: the down_proj inputs get int16 Q/DQ (standard ONNX, opset 21), every other input stays int8,
    and the model is closer to float than the all-int8 one with the same scales elsewhere."""
    src, a8, a16 = llama_dir / "model.onnx", tmp_path / "a8.onnx", tmp_path / "a16.onnx"
    recipe = Recipe(scheme="w8a8", act="static", format="qdq", samples=4)
    convert(src, a8, recipe, calibration=calib_ids)
    result = convert(
        src, a16, Recipe.from_dict({**recipe.to_dict(), "act16": ["down_proj"]}), calibration=calib_ids
    )
    # down_proj's input needs no smoothing at 16 bits: its group (the fold into up_proj) is left out
    kinds = [g["kind"].split(" (")[0] for g in result.smoothed_groups]
    assert "gated product" not in kinds and kinds.count("attention values") == 2
    assert sum("--act16" in s["reason"] for s in result.skipped) == 2
    _standard_only(a16)
    graph = onnx.load(str(a16)).graph
    zero_types = {i.name: i.data_type for i in graph.initializer}
    wide = [
        n
        for n in graph.node
        if n.op_type == "QuantizeLinear" and zero_types[n.input[2]] == onnx.TensorProto.INT16
    ]
    narrow = [
        n
        for n in graph.node
        if n.op_type == "QuantizeLinear" and zero_types[n.input[2]] == onnx.TensorProto.INT8
    ]
    assert len(wide) == 2 and len(narrow) == 3 * 2  # per layer: one down_proj input; qkv, o, gate/up inputs
    feed = ids_feed()
    ref = _run(src, feed)
    assert rel_error(ref, _run(a16, feed)) < rel_error(ref, _run(a8, feed))
