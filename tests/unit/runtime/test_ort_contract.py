"""Pin the undocumented ORT contrib-op behaviour that the W8A8 stock-op path relies on."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort


def _mitf_model(k: int, n: int, wq: np.ndarray, ws: np.ndarray, with_bias: bool) -> bytes:
    tape = ir.tape.Tape()
    xq = ir.Value(name="xq", shape=ir.Shape(["b", "s", k]), type=ir.TensorType(ir.DataType.INT8))
    sc = ir.Value(name="sc", shape=ir.Shape(["b", "s", 1]), type=ir.TensorType(ir.DataType.FLOAT))
    inputs = [xq, tape.initializer(ir.tensor(wq, name="wq")), sc, tape.initializer(ir.tensor(ws, name="ws"))]
    if with_bias:
        inputs += [None, None, tape.initializer(ir.tensor(np.arange(n, dtype=np.float32), name="bias"))]
    y = tape.op("MatMulIntegerToFloat", inputs, domain="com.microsoft")
    y.name, y.type = "Y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph(
        [xq, sc],
        [y],
        nodes=tape.nodes,
        initializers=tape.initializers,
        opset_imports={"": 18, "com.microsoft": 1},
    )
    return ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString()


def _data(k=64, n=32, seed=0):
    rng = np.random.default_rng(seed)
    wq = rng.integers(-127, 128, (k, n)).astype(np.int8)
    ws = rng.uniform(0.001, 0.01, n).astype(np.float32)
    xq = rng.integers(-127, 128, (2, 5, k)).astype(np.int8)
    sc = rng.uniform(0.5, 2.0, (2, 5, 1)).astype(np.float32)
    return wq, ws, xq, sc


def test_matmulintegertofloat_takes_per_token_activation_scales():
    """s8 x s8 with a_scale [..., 1] and b_scale [N]: exact integer accumulation (no int16 saturation)."""
    wq, ws, xq, sc = _data()
    sess = ort.InferenceSession(_mitf_model(64, 32, wq, ws, False), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"xq": xq, "sc": sc})[0]
    exact = (xq.astype(np.float64) @ wq.astype(np.float64)) * sc * ws
    np.testing.assert_allclose(y, exact, rtol=1e-5, atol=1e-3)


def test_matmulintegertofloat_fused_bias_with_per_token_scales_is_not_trusted():
    """Documents why the W8A8 pass adds biases with a separate Add: with per-token scales the fused bias
    input has given wrong results (ORT 1.32 CPU). If this starts failing, ORT fixed it and the Add can go."""
    wq, ws, xq, sc = _data()
    sess = ort.InferenceSession(_mitf_model(64, 32, wq, ws, True), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"xq": xq, "sc": sc})[0]
    exact = (xq.astype(np.float64) @ wq.astype(np.float64)) * sc * ws + np.arange(32)
    assert not np.allclose(y, exact, rtol=1e-5, atol=1e-3)
