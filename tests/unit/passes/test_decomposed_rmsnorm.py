"""Recognising an RMSNorm spelled out in ONNX ops (passes/decomposed_rmsnorm.py): the spellings exporters
emit are matched with their x, γ and epsilon; chains that are not exactly an RMSNorm, or whose pieces are
used elsewhere, are not."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from sq_onnx.passes.decomposed_rmsnorm import match_decomposed_rmsnorm

C = 8


def _const(tape: ir.tape.Tape, name: str, array) -> ir.Value:
    array = np.asarray(array)
    value = tape.initializer(ir.tensor(array, name=name), name=name)
    value.shape = ir.Shape(array.shape)
    return value


def _build(
    *,
    square="Pow",
    inverse="Reciprocal",
    axes=(-1,),
    keepdims=1,
    gamma_shape=(C,),
    gamma_first=True,
    leak=None,
):
    """x -> decomposed RMSNorm -> output; ``leak`` names an intermediate given a second user."""
    tape = ir.tape.Tape()
    x = ir.Value(name="x", shape=ir.Shape(["b", "s", C]), type=ir.TensorType(ir.DataType.FLOAT))
    gamma = _const(
        tape, "gamma", np.linspace(0.5, 1.5, int(np.prod(gamma_shape))).reshape(gamma_shape).astype("f4")
    )
    eps = _const(tape, "eps", np.float32(1e-6))
    sq = (
        tape.op("Pow", [x, _const(tape, "two", np.float32(2))]) if square == "Pow" else tape.op("Mul", [x, x])
    )
    mean = tape.op("ReduceMean", [sq, _const(tape, "axes", np.array(axes, np.int64))], {"keepdims": keepdims})
    root = tape.op("Sqrt", [tape.op("Add", [mean, eps])])
    if inverse == "Reciprocal":
        inv = tape.op("Reciprocal", [root])
    else:
        inv = tape.op("Div", [_const(tape, "one", np.float32(1)), root])
    scaled = tape.op("Mul", [x, inv])
    out = tape.op("Mul", [gamma, scaled] if gamma_first else [scaled, gamma])
    named = {"mean": mean, "inv": inv, "scaled": scaled}
    outputs = [out] + ([tape.op("Relu", [named[leak]])] if leak else [])
    graph = ir.Graph([x], outputs, nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 18})
    return graph, x, gamma, out


@pytest.mark.parametrize(
    "kwargs",
    [{}, {"square": "Mul"}, {"inverse": "Div"}, {"gamma_first": False}, {"axes": (2,)}],
    ids=["torch-export", "x-times-x", "div", "gamma-second", "axis-2"],
)
def test_spellings_of_rmsnorm_match(kwargs):
    _, x, gamma, out = _build(**kwargs)
    norm = match_decomposed_rmsnorm(out)
    assert norm is not None
    assert norm.x is x and norm.gamma is gamma and norm.output_node is out.producer()
    assert norm.epsilon == pytest.approx(1e-6)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"axes": (1,)},
        {"keepdims": 0},
        {"gamma_shape": (1, C)},
        {"leak": "mean"},
        {"leak": "inv"},
        {"leak": "scaled"},
    ],
    ids=["other-axis", "no-keepdims", "gamma-not-a-vector", "mean-used-elsewhere", "inv-used", "scaled-used"],
)
def test_near_misses_do_not_match(kwargs):
    _, _, _, out = _build(**kwargs)
    assert match_decomposed_rmsnorm(out) is None


def test_a_plain_mul_by_gamma_does_not_match():
    tape = ir.tape.Tape()
    x = ir.Value(name="x", shape=ir.Shape(["b", C]), type=ir.TensorType(ir.DataType.FLOAT))
    out = tape.op("Mul", [x, _const(tape, "gamma", np.ones(C, np.float32))])
    assert match_decomposed_rmsnorm(out) is None
