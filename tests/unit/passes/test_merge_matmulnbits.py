"""MatMulNBits nodes that share an input joined into one node and a Split (passes/merge_matmulnbits.py): ORT gives
the same outputs, only nodes that agree on K, bits, block size and level are joined, and a node whose output
is a graph output stays as it is."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from sq_onnx.passes.graph_edit import MS
from sq_onnx.passes.merge_matmulnbits import MergeSharedInputMatMulNBitsPass
from sq_onnx.quant.blockwise import quantize_blockwise

K = 96
BLOCK = 32


def _matmulnbits(
    tape: ir.tape.Tape, x: ir.Value, n: int, bits: int, level: int, symmetric: bool, bias: bool, seed: int
) -> ir.Value:
    rng = np.random.default_rng(seed)
    bq = quantize_blockwise(rng.normal(0, 1, (K, n)).astype(np.float32), bits, BLOCK, symmetric)
    name = f"w{seed}"
    inputs = [
        x,
        tape.initializer(ir.tensor(bq.packed, name=f"{name}.q")),
        tape.initializer(ir.tensor(bq.scales, name=f"{name}.scales")),
    ]
    zp = bq.packed_zero_points()
    inputs.append(tape.initializer(ir.tensor(zp, name=f"{name}.zp")) if zp is not None else None)
    if bias:
        inputs += [
            None,
            tape.initializer(ir.tensor(rng.normal(0, 1, n).astype(np.float32), name=f"{name}.b")),
        ]
    attrs = {"K": K, "N": n, "bits": bits, "block_size": BLOCK, "accuracy_level": level}
    return tape.op("MatMulNBits", inputs, attrs, domain=MS)


def _model(bits: int, level: int, symmetric: bool, bias: bool) -> ir.Model:
    """x feeds three nodes that can be joined (widths 48, 16, 16), one at another level and one whose output is
    the graph's; y feeds one more."""
    tape = ir.tape.Tape()
    x = ir.Value(name="x", shape=ir.Shape([2, 5, K]), type=ir.TensorType(ir.DataType.FLOAT))
    y = ir.Value(name="y", shape=ir.Shape([2, 5, K]), type=ir.TensorType(ir.DataType.FLOAT))
    same = [
        _matmulnbits(tape, x, n, bits, level, symmetric, bias, seed) for seed, n in enumerate((48, 16, 16))
    ]
    other_level = _matmulnbits(tape, x, 16, bits, 4 - level, symmetric, bias, 3)
    direct = _matmulnbits(tape, x, 16, bits, level, symmetric, bias, 4)
    alone = _matmulnbits(tape, y, 16, bits, level, symmetric, bias, 5)
    outputs = [tape.op("Relu", [v]) for v in (*same, other_level, alone)] + [direct]
    for i, out in enumerate(outputs):
        out.name, out.type = f"out{i}", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph(
        [x, y],
        outputs,
        nodes=tape.nodes,
        initializers=tape.initializers,
        opset_imports={"": 21, MS: 1},
        name="g",
    )
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feed: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, feed)


@pytest.mark.parametrize(
    "bits,level,symmetric,bias",
    [
        (4, 0, False, False),
        (4, 4, False, True),
        (4, 0, True, True),
        (8, 4, False, False),
        (8, 0, True, False),
    ],
)
def test_joined_nodes_give_the_same_outputs(bits, level, symmetric, bias):
    model = _model(bits, level, symmetric, bias)
    rng = np.random.default_rng(9)
    feed = {name: rng.normal(0, 1, (2, 5, K)).astype(np.float32) for name in ("x", "y")}
    feed["x"][..., 7] *= 40  # an outlier channel: level 4's per-block int8 rounding sees it the same way
    before = _run(model, feed)
    join = MergeSharedInputMatMulNBitsPass()
    assert join(model).modified
    ops = [n.op_type for n in model.graph]
    assert (
        ops.count("MatMulNBits") == 4 and ops.count("Split") == 1
    )  # 3 joined + other level + direct + alone
    assert len(join.merged) == 1 and len(join.merged[0]) == 3
    joined = next(n for n in model.graph if n.op_type == "MatMulNBits" and n.attributes["N"].value == 80)
    assert joined.attributes["accuracy_level"].value == level
    after = _run(model, feed)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_nothing_to_join_leaves_the_graph():
    model = _model(4, 0, False, False)
    first = MergeSharedInputMatMulNBitsPass()
    first(model)
    again = MergeSharedInputMatMulNBitsPass()
    assert not again(model).modified and again.merged == []
