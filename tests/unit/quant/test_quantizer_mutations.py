"""Quantizer mutations that must fail: each deliberate fault turns at least one honest check red.

The checks compare sq-onnx's output with references written here in plain numpy from ONNX Runtime's
contrib-op spec (MatMulNBits: B uint8 [N, k_blocks, block_size * bits / 8], low nibble first; scales
[N, k_blocks]; zero points packed the same way, 2^(bits-1) when absent; y = x @ ((q - zp) * scale) + bias.
MatMulIntegerToFloat: y = (A_int8 @ B_int8) * a_scale * b_scale), never with the code under test. The
graph has an outlier LayerNorm feeding two biased linears (one smoothing group of two consumers), K = 100
(not a multiple of the block), and a biased 8-bit vocabulary projection. Every check passes unmutated.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

import sq_onnx.passes.linears as linears
import sq_onnx.passes.quantize_w8a8 as w8a8
import sq_onnx.passes.smooth as smooth
import sq_onnx.quant.blockwise as blockwise
from sq_onnx import Recipe, convert

from quant_reference import ref_per_channel, ref_per_token, ref_rtn, ref_unpack

K, HID, VOCAB, ROWS = 100, 24, 10, 6
OUTLIERS = (7, 60)
EXACT = dict(smooth=False, gptq=False, clip_search=False, accuracy_level="0", lm_head_accuracy_level=0)


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 1.5, K).astype(np.float32)
    gamma[list(OUTLIERS)] *= 30.0
    return {
        "gamma": gamma,
        "beta": rng.normal(0, 0.3, K).astype(np.float32),
        "wa": rng.normal(0, 0.2, (K, HID)).astype(np.float32),
        "ba": rng.normal(0, 0.5, HID).astype(np.float32),
        "wb": rng.normal(0, 0.2, (K, HID)).astype(np.float32),
        "bb": rng.normal(0, 0.5, HID).astype(np.float32),
        "wo": rng.normal(0, 0.3, (HID, VOCAB)).astype(np.float32),
        "bo": rng.normal(0, 0.5, VOCAB).astype(np.float32),
    }


def _model(path: Path) -> Path:
    """X -> LayerNorm -> h;  (h Wa + ba) + Relu(Gemm(h, Wbᵀ, bb, transB)) -> Gemm(., Wo, bo) -> Y.
    The MatMul's bias stays a separate Add; each Gemm carries its own (the linear's bias)."""
    w = _weights()
    tape = ir.tape.Tape()
    x = ir.Value(name="X", shape=ir.Shape(["m", K]), type=ir.TensorType(ir.DataType.FLOAT))
    arrays = {**w, "wb": np.ascontiguousarray(w["wb"].T)}  # Gemm with transB=1 holds Wb as [N, K]
    c = {k: tape.initializer(ir.tensor(v, name=k)) for k, v in arrays.items()}
    h = tape.op("LayerNormalization", [x, c["gamma"], c["beta"]], {"axis": -1, "epsilon": 1e-5})
    a = tape.op("Add", [tape.op("MatMul", [h, c["wa"]], name="mm_a"), c["ba"]])
    b = tape.op("Gemm", [h, c["wb"], c["bb"]], {"transB": 1}, name="mm_b")
    t = tape.op("Add", [a, tape.op("Relu", [b])])
    y = tape.op("Gemm", [t, c["wo"], c["bo"]], name="mm_o")
    y.name, y.type, y.shape = "Y", ir.TensorType(ir.DataType.FLOAT), ir.Shape(["m", VOCAB])
    graph = ir.Graph([x], [y], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 18})
    ir.save(ir.Model(graph, ir_version=10), path)
    return path


def _inputs(seed: int, samples: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (samples, ROWS, K)).astype(np.float32)


def _layer_norm(x: np.ndarray, w: dict) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * w["gamma"] + w["beta"]


def _forward(x: np.ndarray, w: dict, linear: Callable[[np.ndarray, str], np.ndarray]) -> np.ndarray:
    h = _layer_norm(x, w)
    t = linear(h, "a") + w["ba"] + np.maximum(linear(h, "b") + w["bb"], 0)
    return linear(t, "o") + w["bo"]


# --- the honest checks -------------------------------------------------------------------------


def _convert(tmp: Path, name: str, **recipe) -> tuple[Path, ir.Model]:
    out = tmp / f"{name}.onnx"
    convert(
        _model(tmp / "src.onnx"),
        out,
        Recipe(samples=4, **recipe),
        calibration={"X": _inputs(1, 6)},
        overwrite=True,
    )
    return out, ir.load(out)


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {"X": x})[0]


def _const(value: ir.Value | None) -> np.ndarray | None:
    return None if value is None or value.const_value is None else value.const_value.numpy()


def _nodes(model: ir.Model, op: str) -> dict[str, ir.Node]:
    return {n.name: n for n in model.graph if n.op_type == op}


def check_w4_codes_match_the_reference(tmp: Path) -> None:
    """RTN W4 (and the 8-bit head): every stored code, scale and zero point is the reference's."""
    _, model = _convert(tmp, "w4", **EXACT)
    w = _weights()
    nodes = _nodes(model, "MatMulNBits")
    assert sorted(nodes) == ["mm_a", "mm_b", "mm_o"]
    for name, node in nodes.items():
        key = name[-1]
        attrs = {a: node.attributes[a].as_int() for a in ("K", "N", "bits", "block_size")}
        codes, scales, zps = ref_rtn(w[f"w{key}"], attrs["bits"], attrs["block_size"])
        assert attrs["bits"] == (8 if key == "o" else 4)
        got = ref_unpack(
            [_const(v) for v in node.inputs], attrs["K"], attrs["N"], attrs["bits"], attrs["block_size"]
        )
        want = ((codes.astype(np.float32) - zps[..., None]) * scales[..., None]).reshape(attrs["N"], -1)
        np.testing.assert_allclose(got, want[:, : attrs["K"]].T, rtol=0, atol=1e-6)
        if key != "a":  # the Gemms' biases move into MatMulNBits, unchanged
            np.testing.assert_array_equal(_const(node.inputs[5]), w[f"b{key}"])


def check_w4_output_is_the_reference_forward(tmp: Path) -> None:
    """ORT's output of the RTN W4 model equals the numpy forward pass with the reference weights."""
    path, _ = _convert(tmp, "w4", **EXACT)
    w = _weights()
    deq = {}
    for key in "abo":
        bits = 8 if key == "o" else 4
        codes, scales, zps = ref_rtn(w[f"w{key}"], bits, 128)
        full = ((codes.astype(np.float32) - zps[..., None]) * scales[..., None]).reshape(codes.shape[0], -1)
        deq[key] = full[:, : w[f"w{key}"].shape[0]].T
    x = _inputs(2)[0]
    np.testing.assert_allclose(
        _run(path, x), _forward(x, w, lambda h, key: h @ deq[key]), rtol=1e-4, atol=1e-4
    )


def check_w8a8_weights_match_the_reference(tmp: Path) -> None:
    """W8A8: every int8 weight and weight scale is the per-channel reference of the float weight."""
    _, model = _convert(tmp, "w8a8", scheme="w8a8", **EXACT)
    w = _weights()
    nodes = _nodes(model, "MatMulIntegerToFloat")
    assert sorted(nodes) == ["mm_a", "mm_b"]
    for name, node in nodes.items():
        wq, ws = ref_per_channel(w[f"w{name[-1]}"])
        np.testing.assert_array_equal(_const(node.inputs[1]), wq)
        np.testing.assert_allclose(_const(node.inputs[3]), ws, rtol=1e-6)


def check_w8a8_output_is_the_per_token_reference(tmp: Path) -> None:
    """ORT's output of the W8A8 model equals numpy's per-token int8 x per-channel int8 forward pass."""
    path, _ = _convert(tmp, "w8a8", scheme="w8a8", **EXACT)
    w = _weights()
    codes, scales, zps = ref_rtn(w["wo"], 8, 128)
    head = ((codes.astype(np.float32) - zps[..., None]) * scales[..., None]).reshape(VOCAB, -1)[:, :HID].T

    def linear(h: np.ndarray, key: str) -> np.ndarray:
        if key == "o":
            return h @ head
        hq, hs = ref_per_token(h)
        wq, ws = ref_per_channel(w[f"w{key}"])
        return (hq @ wq.astype(np.float32)) * hs * ws

    x = _inputs(3)[0]
    np.testing.assert_allclose(_run(path, x), _forward(x, w, linear), rtol=1e-4, atol=1e-4)


def check_smoothing_keeps_the_function(tmp: Path) -> None:
    """--scheme smooth: γ and β really change (by 1/s), the output does not."""
    path, model = _convert(tmp, "smooth", scheme="smooth")
    x = _inputs(4)[0]
    gamma = next(n for n in model.graph if n.op_type == "LayerNormalization").inputs[1]
    assert not np.allclose(_const(gamma), _weights()["gamma"])
    np.testing.assert_allclose(_run(path, x), _run(tmp / "src.onnx", x), rtol=1e-4, atol=1e-4)


CHECKS = [
    check_w4_codes_match_the_reference,
    check_w4_output_is_the_reference_forward,
    check_w8a8_weights_match_the_reference,
    check_w8a8_output_is_the_per_token_reference,
    check_smoothing_keeps_the_function,
]


# --- the mutations -----------------------------------------------------------------------------


def _half_levels(mp):
    grid = blockwise._grid

    def mutated(*args):
        scales, zps, q = grid(*args)
        return scales, zps, (q & 0xFE).astype(np.uint8)  # only the even codes: half the levels

    mp.setattr(blockwise, "_grid", mutated)


def _scales_x125(mp):
    pack = blockwise.pack_blocks
    mp.setattr(blockwise, "pack_blocks", lambda q, s, z, *a: pack(q, s * np.float32(1.25), z, *a))


def _zero_points_off_by_one(mp):
    pack = blockwise.pack_blocks
    mp.setattr(
        blockwise,
        "pack_blocks",
        lambda q, s, z, *a: pack(q, s, None if z is None else np.minimum(z + 1, 255), *a),
    )


def _dropped_bias(mp):
    mp.setattr(linears.Linear, "bias_array", lambda self: None)


def _six_bit_w8a8(mp):
    per_channel = w8a8.quantize_per_channel
    mp.setattr(w8a8, "quantize_per_channel", lambda w_kn, qmax=127: per_channel(w_kn, qmax=min(qmax, 31)))


def _per_tensor_scales(mp):
    def per_tensor_nodes(b, x):
        nodes = [b.node("Abs", [x]), None]
        nodes[1] = b.node("ReduceMax", [nodes[0].outputs[0]], keepdims=1)  # no axes: the whole tensor
        nodes.append(b.node("Div", [nodes[1].outputs[0], b.const("q127", np.array(127.0, np.float32))]))
        scale = nodes[-1].outputs[0]
        nodes.append(b.node("Div", [x, scale]))
        nodes.append(b.node("Round", [nodes[-1].outputs[0]]))
        nodes.append(b.node("Cast", [nodes[-1].outputs[0]], to=int(ir.DataType.INT8)))
        return nodes, nodes[-1].outputs[0], scale

    mp.setattr(w8a8, "_per_token_nodes", per_tensor_nodes)


def _skipped_fold_on_one_consumer(mp):
    set_weight = smooth.set_weight_lazy
    seen: set[int] = set()

    def mutated(graph, linear, *args):
        if linear.name.endswith("mm_b") or linear.node.name == "mm_b":
            seen.add(1)
            return None  # this consumer keeps its unscaled rows
        return set_weight(graph, linear, *args)

    mp.setattr(smooth, "set_weight_lazy", mutated)


MUTATIONS = {
    "4-bit grid uses half its levels": _half_levels,
    "stored W4 scales x 1.25": _scales_x125,
    "zero points off by one": _zero_points_off_by_one,
    "bias dropped": _dropped_bias,
    "W8A8 weights at 6 bits": _six_bit_w8a8,
    "per-token scales replaced by one per tensor": _per_tensor_scales,
    "smoothing fold skipped on one consumer": _skipped_fold_on_one_consumer,
}


def _failing(tmp: Path) -> list[str]:
    failed = []
    for check in CHECKS:
        try:
            check(tmp)
        except Exception:  # an assertion, or the pipeline refusing a broken model: both are red
            failed.append(check.__name__)
    return failed


def test_unmutated_code_passes_every_check(tmp_path):
    assert _failing(tmp_path) == []


@pytest.mark.parametrize("mutation", sorted(MUTATIONS))
def test_mutation_fails_a_check(mutation, tmp_path, monkeypatch):
    MUTATIONS[mutation](monkeypatch)
    assert _failing(tmp_path), f"no check caught: {mutation}"
