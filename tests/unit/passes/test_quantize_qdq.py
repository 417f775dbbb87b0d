"""QuantizeW8A8QDQPass's QOperator form: QuantizeLinear -> MatMulInteger -> Cast -> Mul computes int8
activations (one calibrated scale) times per-channel int8 weights, with a float output. An output with a
massive channel (LLMs' massive activations: SmolLM2's down_proj outputs reach 25,000 beside channels below 50)
loses nothing there; QLinearMatMul's int8 output, one scale per tensor, would round the other channels to 0."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort

from sq_onnx.passes.linears import find_linears
from sq_onnx.passes.quantize_qdq import QuantizeW8A8QDQPass
from sq_onnx.quant.int8 import fake_per_channel, fake_static

K, N = 64, 48


def _linear_model(w: np.ndarray) -> ir.Model:
    x = ir.Value(name="X", shape=ir.Shape(["rows", K]), type=ir.TensorType(ir.DataType.FLOAT))
    weight = ir.Value(name="W", shape=ir.Shape([K, N]), type=ir.TensorType(ir.DataType.FLOAT))
    weight.const_value = ir.tensor(w, name="W")
    node = ir.Node("", "MatMul", [x, weight], name="linear")
    node.outputs[0].name = "Y"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], node.outputs, nodes=[node], initializers=[weight], opset_imports={"": 18})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, x: np.ndarray, optimize: bool) -> np.ndarray:
    so = ort.SessionOptions()
    if not optimize:  # MatMulInteger itself, not ORT's MatMulIntegerToFloat fusion
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    proto = ir.serde.serialize_model(model).SerializeToString()
    return ort.InferenceSession(proto, so, providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]


def test_qoperator_form_is_int8_by_int8_with_a_float_output() -> None:
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.1, (K, N)).astype(np.float32)
    w[:, 0] *= 3000.0  # a massive output channel
    x = rng.normal(0, 1, (32, K)).astype(np.float32)
    x_absmax = float(np.abs(x).max())
    model = _linear_model(w)
    QuantizeW8A8QDQPass(find_linears(model.graph), {"X": x_absmax}, qoperator=True)(model)
    ops = [n.op_type for n in model.graph]
    assert ops == ["QuantizeLinear", "MatMulInteger", "Cast", "Mul"]
    expected = fake_static(x, np.float32(x_absmax / 127.0)) @ fake_per_channel(w)
    for optimize in (False, True):
        got = _run(model, x, optimize)
        scale = np.abs(expected).max(axis=0)  # per channel: the massive one is 3000x the others
        assert np.all(np.abs(got - expected).max(axis=0) <= 1e-5 * scale)
    ref = x @ w
    rest = np.linalg.norm(got[:, 1:] - ref[:, 1:]) / np.linalg.norm(ref[:, 1:])
    assert rest < 0.03  # beside the massive channel, only the int8 rounding of X and W
