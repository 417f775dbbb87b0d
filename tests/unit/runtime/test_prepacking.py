"""A conversion's session on a large float model runs on the weights as they are: ORT's pre-packed copies would
hold the weights twice while the session loads (tools/RESULTS.md: 5.99 -> 5.55 GB at the peak for Llama-3.2-1B's
4.9 GB of weights, 5.2 -> 1.4 GB of anonymous memory), for runs about 10% faster, and constant folding would copy
a transposed weight (a tied lm_head's embedding: 1 GB at Llama-3.2-1B). A model whose ops need packed weights
(MatMulNBits at accuracy_level 4) keeps them."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest

from sq_onnx.runtime import ort_session

K, N = 1024, 8192  # 32 MB of float32 weight


@pytest.fixture(scope="module")
def external_matmul(tmp_path_factory):
    """Y = X @ Transpose(W) with W in an external-data file (as a large model's weights are; a tied lm_head's
    embedding is read through a Transpose)."""
    folder = tmp_path_factory.mktemp("prepack")
    tape = ir.tape.Tape()
    x = ir.Value(name="X", shape=ir.Shape(["m", K]), type=ir.TensorType(ir.DataType.FLOAT))
    w = tape.initializer(
        ir.tensor(np.random.default_rng(0).normal(0, 1, (N, K)).astype(np.float32), name="W")
    )
    y = tape.op("MatMul", [x, tape.op("Transpose", [w], attributes={"perm": [1, 0]})])
    y.name, y.shape, y.type = "Y", ir.Shape(["m", N]), ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph([x], [y], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 17})
    ir.save(ir.Model(graph, ir_version=8), folder / "model.onnx", external_data="model.onnx.data")
    return folder / "model.onnx"


_IN_A_FRESH_PROCESS = """
import json, sys
import numpy as np
import onnx_ir as ir
from sq_onnx.runtime import ort_session
from sq_onnx.runtime.peak_memory import current_rss_bytes
ort_session.LEAN_LIMIT = int(sys.argv[2])
model = ir.load(sys.argv[1])
before = current_rss_bytes("RssAnon")
with ort_session.in_memory_session(model) as sess:
    grown = current_rss_bytes("RssAnon") - before
    entries = {}
    for key in ("session.disable_prepacking", "optimization.disable_specified_optimizers"):
        try:
            entries[key] = sess.get_session_options().get_session_config_entry(key)
        except RuntimeError:  # ORT raises for a key never set
            entries[key] = None
    x = np.ones((3, model.graph.inputs[0].shape[1]), np.float32)
    y = sess.run(None, {"X": x})[0]
error = float(np.abs(y - x @ model.graph.initializers["W"].const_value.numpy().T).max())
print(json.dumps({"grown": grown, "entries": entries, "error": error}))
"""


@pytest.mark.parametrize("limit, packed", [(1 << 40, True), (1 << 20, False)])
def test_large_models_run_without_prepacked_weights(external_matmul, limit, packed):
    """In a fresh process: in a long-lived test worker the allocator hands back memory it already holds, and the
    packed copy would not show as growth."""
    run = subprocess.run(
        [sys.executable, "-c", _IN_A_FRESH_PROCESS, str(external_matmul), str(limit)],
        capture_output=True,
        text=True,
        check=True,
    )
    seen = json.loads(run.stdout.splitlines()[-1])
    assert seen["error"] < 1e-2
    lean = {"session.disable_prepacking": "1", "optimization.disable_specified_optimizers": "ConstantFolding"}
    assert (seen["entries"] != lean) == packed
    weight = K * N * 4
    assert (seen["grown"] > weight * 3 // 4) == packed, f"{seen['grown'] / 2**20:.0f} MB of anonymous memory"


def _matmul_nbits_model() -> ir.Model:
    tape = ir.tape.Tape()
    x = ir.Value(name="X", shape=ir.Shape(["m", 64]), type=ir.TensorType(ir.DataType.FLOAT))
    b = tape.initializer(ir.tensor(np.zeros((8, 2, 16), np.uint8), name="B"))
    scales = tape.initializer(ir.tensor(np.ones(16, np.float32), name="scales"))
    attributes = {"K": 64, "N": 8, "bits": 4, "block_size": 32, "accuracy_level": 4}
    y = tape.op("MatMulNBits", [x, b, scales], attributes=attributes, domain="com.microsoft")
    y.name = "Y"
    graph = ir.Graph(
        [x], [y], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 17, "com.microsoft": 1}
    )
    return ir.Model(graph, ir_version=8)


def test_models_that_run_on_packed_weights_are_never_lean(monkeypatch, tmp_path):
    """MatMulNBits computes at accuracy_level 4 only on weights packed at load: a large W4 model run lean would be
    verified in float."""
    model = _matmul_nbits_model()
    ir.save(model, tmp_path / "w4.onnx", external_data="w4.onnx.data", size_threshold_bytes=0)
    chosen = []
    monkeypatch.setattr(ort_session, "LEAN_LIMIT", 0)
    monkeypatch.setattr(ort_session, "_checked_session", lambda *args: chosen.append(args[-1]))
    with ort_session.in_memory_session(ir.load(tmp_path / "w4.onnx")):
        pass
    assert chosen == [False]
    assert ort_session.runs_on_packed_weights(model)


def _weight_matmul(qdq: bool) -> ir.Model:
    """Y = X @ W, W an int8 initializer behind DequantizeLinear (QDQ) or a float one."""
    tape = ir.tape.Tape()
    x = ir.Value(name="X", shape=ir.Shape(["m", 8]), type=ir.TensorType(ir.DataType.FLOAT))
    if qdq:
        q = tape.initializer(ir.tensor(np.zeros((8, 4), np.int8), name="Wq"))
        w = tape.op("DequantizeLinear", [q, tape.initializer(ir.tensor(np.float32(0.1), name="scale"))])
    else:
        w = tape.initializer(ir.tensor(np.zeros((8, 4), np.float32), name="W"))
    y = tape.op("MatMul", [x, w])
    graph = ir.Graph([x], [y], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_qdq_weights_need_packing_too():
    """ORT fuses DequantizeLinear -> MatMul into MatMulNBits (level 4 by default for QDQ) or int8 ops."""
    assert ort_session.runs_on_packed_weights(_weight_matmul(qdq=True))
    assert not ort_session.runs_on_packed_weights(_weight_matmul(qdq=False))
