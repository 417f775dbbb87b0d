"""The norm + per-token quantization fusions (passes/fuse_norm_quant.py): every norm kind and every spelling
of a decomposed RMSNorm that exporters emit becomes its fused op with the norm's x, γ, β and epsilon; near
misses are left alone, and each refusal says why."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from sq_onnx.passes.fuse_norm_quant import FuseNormQuantPass
from sq_onnx.passes.graph_edit import SQ
from sq_onnx.passes.linears import find_linears
from sq_onnx.passes.quantize_w8a8 import QuantizeW8A8Pass

from ir_graphs import build_norm_graph

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
    eps_first=False,
    x_second=False,
    leak=None,
    two=2.0,
    cast_to=None,
    shape_reader=False,
):
    """x -> decomposed RMSNorm -> QuantizePerToken; ``leak`` names an intermediate given a second user."""
    tape = ir.tape.Tape()
    x = ir.Value(name="x", shape=ir.Shape(["b", "s", C]), type=ir.TensorType(ir.DataType.FLOAT))
    gamma = _const(
        tape, "gamma", np.linspace(0.5, 1.5, int(np.prod(gamma_shape))).reshape(gamma_shape).astype("f4")
    )
    eps = _const(tape, "eps", np.float32(1e-6))
    sq = (
        tape.op("Pow", [x, _const(tape, "two", np.float32(two))])
        if square == "Pow"
        else tape.op("Mul", [x, x])
    )
    mean = tape.op("ReduceMean", [sq, _const(tape, "axes", np.array(axes, np.int64))], {"keepdims": keepdims})
    root = tape.op("Sqrt", [tape.op("Add", [eps, mean] if eps_first else [mean, eps])])
    if inverse == "Reciprocal":
        inv = tape.op("Reciprocal", [root])
    else:
        inv = tape.op("Div", [_const(tape, "one", np.float32(1)), root])
    scaled = tape.op("Mul", [inv, x] if x_second else [x, inv])
    if cast_to is not None:  # TorchScript: Cast(x * inv, to=x's type) before γ
        scaled = tape.op("Cast", [scaled], {"to": ir.AttrInt64("to", cast_to)})
    out = tape.op("Mul", [gamma, scaled] if gamma_first else [scaled, gamma])
    xq, xs = tape.op_multi_out("QuantizePerToken", [out], num_outputs=2, domain=SQ)
    named = {"mean": mean, "inv": inv, "scaled": scaled, "out": out}
    outputs = [xq, xs] + ([tape.op("Relu", [named[leak]])] if leak else [])
    if shape_reader:  # TorchScript attention reads the normed value's shape
        outputs.append(tape.op("Shape", [out]))
    graph = ir.Graph(
        [x], outputs, nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 18, SQ: 1}
    )
    return ir.Model(graph, ir_version=10), x, gamma


def _fuse(model: ir.Model) -> FuseNormQuantPass:
    fuse = FuseNormQuantPass()
    fuse(model)
    return fuse


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"square": "Mul"},
        {"inverse": "Div"},
        {"gamma_first": False},
        {"axes": (2,)},
        {"eps_first": True, "x_second": True},
        {"inverse": "Div", "cast_to": ir.DataType.FLOAT.value},
    ],
    ids=[
        "torch-export",
        "x-times-x",
        "div",
        "gamma-second",
        "axis-2",
        "operands-swapped",
        "torchscript-cast",
    ],
)
def test_spellings_of_rmsnorm_fuse(kwargs):
    model, x, gamma = _build(**kwargs)
    fuse = _fuse(model)
    (fused,) = [n for n in model.graph if n.op_type == "RMSNormQuant"]
    assert fuse.fused == 1 and not fuse.refused
    assert fused.inputs[0] is x and fused.inputs[1] is gamma
    assert fused.attributes["epsilon"].value == pytest.approx(1e-6)
    assert list(model.graph.outputs[:2]) == list(fused.outputs)


@pytest.mark.parametrize(
    "kwargs,reason",
    [
        ({"axes": (1,)}, "not over the last axis"),
        ({"keepdims": 0}, "keepdims=1"),
        ({"gamma_shape": (1, C)}, "not a constant float vector"),
        ({"two": 3.0}, "other than the constant 2"),
        ({"leak": "mean"}, "also read by Relu"),
        ({"leak": "inv"}, "also read by Relu"),
        ({"leak": "scaled"}, "also read by Relu"),
        ({"leak": "out"}, "output"),
        ({"cast_to": ir.DataType.FLOAT16.value}, "cast to another type"),
    ],
    ids=[
        "other-axis",
        "no-keepdims",
        "gamma-not-a-vector",
        "cube",
        "mean-used-elsewhere",
        "inv-used",
        "scaled-used",
        "output-used",
        "cast-to-fp16",
    ],
)
def test_near_misses_are_refused_with_a_reason(kwargs, reason):
    model, _, _ = _build(**kwargs)
    fuse = _fuse(model)
    assert fuse.fused == 0 and "RMSNormQuant" not in [n.op_type for n in model.graph]
    (refusal,) = fuse.refused
    assert reason in refusal.reason and refusal.tensor


def test_a_plain_mul_by_gamma_is_not_a_norm():
    tape = ir.tape.Tape()
    x = ir.Value(name="x", shape=ir.Shape(["b", C]), type=ir.TensorType(ir.DataType.FLOAT))
    out = tape.op("Mul", [x, _const(tape, "gamma", np.ones(C, np.float32))])
    xq, xs = tape.op_multi_out("QuantizePerToken", [out], num_outputs=2, domain=SQ)
    graph = ir.Graph(
        [x], [xq, xs], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 18, SQ: 1}
    )
    fuse = _fuse(ir.Model(graph, ir_version=10))
    assert fuse.fused == 0 and fuse.refused == []  # nothing recognised, so nothing refused


def _quantized(kind: str, **kwargs) -> ir.Model:
    model = build_norm_graph(kind, **kwargs)
    QuantizeW8A8Pass(find_linears(model.graph), kernels="sq_onnx")(model)
    return model


@pytest.mark.parametrize(
    "kind,fused_op,inputs",
    [
        ("SimplifiedLayerNormalization", "RMSNormQuant", 2),
        ("RMSNormalization", "RMSNormQuant", 2),
        ("SkipSimplifiedLayerNormalization", "SkipRMSNormQuant", 3),
        ("LayerNormalization", "LayerNormQuant", 3),
    ],
)
def test_norm_kinds_fuse_with_their_parameters(kind, fused_op, inputs):
    model = _quantized(kind)
    (norm,) = [n for n in model.graph if n.op_type == kind]
    norm_inputs, norm_eps, sum_value = list(norm.inputs), norm.attributes.get("epsilon"), norm.outputs[-1]
    fuse = _fuse(model)
    (fused,) = [n for n in model.graph if n.op_type == fused_op]
    assert fuse.fused == 1 and not fuse.refused
    assert list(fused.inputs) == norm_inputs[:inputs] and len(norm_inputs) <= inputs + 1
    assert norm_eps is None or fused.attributes["epsilon"].value == pytest.approx(norm_eps.value)
    # the one quantization of the norm's output is gone; every int8 matmul reads the fused op
    assert "QuantizePerToken" not in [n.op_type for n in model.graph if n.outputs[0].uses()]
    assert all(n.inputs[0].producer() is fused for n in model.graph if n.op_type == "Int8MatMulDequant")
    if kind.startswith("Skip"):  # the residual sum is now the fused op's third output
        assert not sum_value.uses() and fused.outputs[2].uses()


def test_a_norm_with_a_float_reader_is_refused_with_the_reason():
    model = _quantized("LayerNormalization", consumers=2, extra_consumer="Relu")
    fuse = _fuse(model)
    assert fuse.fused == 0
    (refusal,) = fuse.refused
    assert "also read by Relu" in refusal.reason


def test_a_shape_reader_of_the_norm_reads_its_input_instead():
    """torch.onnx's TorchScript attention reads the input norm's output shape: the norm still fuses, and the
    Shape reads x (the same shape) so the decomposed norm is not kept computed for it."""
    model, x, _ = _build(inverse="Div", cast_to=ir.DataType.FLOAT.value, shape_reader=True)
    fuse = _fuse(model)
    assert fuse.fused == 1 and not fuse.refused
    (shape,) = [n for n in model.graph if n.op_type == "Shape"]
    assert shape.inputs[0] is x
    assert "ReduceMean" not in [n.op_type for n in model.graph]
