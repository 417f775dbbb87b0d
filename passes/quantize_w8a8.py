"""W8A8: int8 per-output-channel weights, int8 activations, on stock ORT CPU contrib ops.

Precondition: ``linears`` were found on this graph (after any smoothing). Activation modes:
- ``per-token`` (default): |X| row max -> scale [..., 1], Round/Cast to int8 (one set per input tensor,
  shared by q/k/v), then ``com.microsoft::MatMulIntegerToFloat`` (s8 x s8; no int16 saturation on AVX2).
- ``per-tensor``: ``com.microsoft::DynamicQuantizeMatMul`` (u8 activations) with 7-bit weights, because
  u8 x s8 with full-range weights saturates on AVX2 CPUs without VNNI.
- ``static``: ``QuantizeLinear`` with a calibrated per-tensor scale + ``MatMulIntegerToFloat``.
A bias is added by a separate Add: MatMulIntegerToFloat's fused bias is wrong with per-token scales (ORT 1.32).

``kernels="sq_onnx"`` (per-token only) emits the sq_onnx custom ops instead (custom_ops/, fused on CUDA):
a norm whose output feeds only quantized linears becomes RMSNormQuant / SkipRMSNormQuant / LayerNormQuant,
other inputs get QuantizePerToken, and each linear an Int8MatMulDequant with its weight as [N, K] int8 and
its scales and bias in the activation type (float32 or float16), so no Casts are needed.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.graph_edit import MS, add_initializer, ensure_opset, replace_node, require_in_graph
from sq_onnx.passes.linears import Linear
from sq_onnx.passes.quantize_w8a8_custom import quantize_w8a8_custom
from sq_onnx.quant.int8 import EPS, quantize_per_channel


class _Builder:
    """Creates nodes before an anchor node and shared constants once per graph."""

    def __init__(self, graph: ir.Graph, opset: int):
        self.graph = graph
        self.opset = opset
        self._consts: dict[str, ir.Value] = {}

    def const(self, key: str, array: np.ndarray) -> ir.Value:
        if key not in self._consts:
            self._consts[key] = add_initializer(self.graph, f"sq_onnx.{key}", array)
        return self._consts[key]

    def node(self, op: str, inputs: list[ir.Value | None], domain: str = "", **attrs: object) -> ir.Node:
        attributes = []
        for k, v in attrs.items():
            if isinstance(v, float):
                attributes.append(ir.AttrFloat32(k, v))
            elif isinstance(v, (list, tuple)):
                attributes.append(ir.AttrInt64s(k, list(v)))
            else:
                attributes.append(ir.AttrInt64(k, int(v)))  # type: ignore[call-overload]
        return ir.Node(domain, op, inputs, attributes=attributes)


def _per_token_nodes(b: _Builder, x: ir.Value) -> tuple[list[ir.Node], ir.Value, ir.Value]:
    """Nodes computing (xq int8, scale float [..., 1]) from float32 X."""
    nodes = [b.node("Abs", [x])]
    if b.opset >= 18:
        nodes.append(
            b.node(
                "ReduceMax",
                [nodes[-1].outputs[0], b.const("axes_last", np.array([-1], np.int64))],
                keepdims=1,
            )
        )
    else:
        nodes.append(b.node("ReduceMax", [nodes[-1].outputs[0]], axes=[-1], keepdims=1))
    nodes.append(b.node("Max", [nodes[-1].outputs[0], b.const("eps", np.array(EPS, np.float32))]))
    nodes.append(b.node("Div", [nodes[-1].outputs[0], b.const("q127", np.array(127.0, np.float32))]))
    scale = nodes[-1].outputs[0]
    nodes.append(b.node("Div", [x, scale]))
    nodes.append(b.node("Round", [nodes[-1].outputs[0]]))
    nodes.append(b.node("Cast", [nodes[-1].outputs[0]], to=int(ir.DataType.INT8)))
    return nodes, nodes[-1].outputs[0], scale


def _static_nodes(
    b: _Builder, x: ir.Value, absmax: float, key: str
) -> tuple[list[ir.Node], ir.Value, ir.Value]:
    scale = b.const(f"{key}.act_scale", np.array(max(absmax, EPS) / 127.0, np.float32))
    zp = b.const("zero_int8", np.array(0, np.int8))
    node = b.node("QuantizeLinear", [x, scale, zp])
    return [node], node.outputs[0], scale


def quantize_w8a8(
    graph: ir.Graph,
    linears: list[Linear],
    opset: int,
    act: str = "per-token",
    static_absmax: dict[str, float] | None = None,
    kernels: str = "ort",
) -> list[str]:
    """Replace each linear by its int8 form; returns the names of the replaced nodes."""
    if kernels == "sq_onnx":
        if act != "per-token":
            raise ValueError("--kernels sq_onnx implements per-token activations only")
        return quantize_w8a8_custom(graph, linears)
    b = _Builder(graph, opset)
    act_cache: dict[int, tuple[ir.Value, ir.Value]] = {}
    done = []
    for linear in linears:
        node = linear.node
        x = linear.input
        # fp16 or bf16 activations: the integer ops take float32 in and out, so Cast around them.
        half = x.dtype if x.dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) else None
        new_nodes: list[ir.Node] = []
        if act == "per-tensor":
            wq, ws = quantize_per_channel(linear.weight_kn(), qmax=63)
            xf = x
            if half is not None:
                new_nodes.append(b.node("Cast", [x], to=int(ir.DataType.FLOAT)))
                xf = new_nodes[-1].outputs[0]
            base = linear.weight_name or linear.name
            mm = b.node(
                "DynamicQuantizeMatMul",
                [
                    xf,
                    add_initializer(graph, f"{base}.int8", wq),
                    add_initializer(graph, f"{base}.w_scale", ws),
                ],
                domain=MS,
            )
        else:
            if id(x) not in act_cache:
                pre: list[ir.Node] = []
                xf = x
                if half is not None:
                    pre.append(b.node("Cast", [x], to=int(ir.DataType.FLOAT)))
                    xf = pre[-1].outputs[0]
                if act == "per-token":
                    qnodes, xq, xs = _per_token_nodes(b, xf)
                else:
                    if static_absmax is None or x.name not in static_absmax:
                        raise KeyError(f"no calibrated activation range for {x.name}")
                    qnodes, xq, xs = _static_nodes(b, xf, static_absmax[x.name or ""], x.name or "x")
                graph.insert_before(node, pre + qnodes)
                act_cache[id(x)] = (xq, xs)
            xq, xs = act_cache[id(x)]
            wq, ws = quantize_per_channel(linear.weight_kn())
            base = linear.weight_name or linear.name
            mm = b.node(
                "MatMulIntegerToFloat",
                [
                    xq,
                    add_initializer(graph, f"{base}.int8", wq),
                    xs,
                    add_initializer(graph, f"{base}.w_scale", ws),
                ],
                domain=MS,
            )
        new_nodes.append(mm)
        mm.name = node.name
        bias = linear.bias_array()
        if bias is not None:
            new_nodes.append(
                b.node(
                    "Add",
                    [
                        new_nodes[-1].outputs[0],
                        add_initializer(
                            graph, f"{linear.weight_name or linear.name}.bias", bias.astype(np.float32)
                        ),
                    ],
                )
            )
        if half is not None:
            new_nodes.append(b.node("Cast", [new_nodes[-1].outputs[0]], to=int(half)))
        linear.release()  # before the node leaves the graph: its weight is read through it
        replace_node(graph, node, new_nodes, new_nodes[-1].outputs[0])
        done.append(node.name or "")
    return done


class QuantizeW8A8Pass(ir.passes.InPlacePass):
    """Replace ``linears`` by their W8A8 form: stock ORT contrib ops, or with ``kernels="sq_onnx"`` the
    custom ops (norms that feed only quantized linears fused with the activation quantization).

    Precondition (``requires``): every linear is a node of this graph; ``static`` activations have a
    calibrated range for every input; the sq_onnx kernels take per-token activations only. After the call,
    ``replaced`` names the replaced nodes.
    """

    def __init__(
        self,
        linears: list[Linear],
        act: str = "per-token",
        static_absmax: dict[str, float] | None = None,
        kernels: str = "ort",
    ):
        super().__init__()
        self.linears, self.act, self.static_absmax, self.kernels = linears, act, static_absmax, kernels
        self.replaced: list[str] = []

    def requires(self, model: ir.Model) -> None:
        require_in_graph(model, self.linears)
        if self.act == "static":
            ranges = self.static_absmax or {}
            missing = [linear.input.name for linear in self.linears if linear.input.name not in ranges]
            if missing:
                raise ir.passes.PreconditionError(f"no calibrated activation range for {missing[0]}")
        if self.kernels == "sq_onnx" and self.act != "per-token":
            raise ir.passes.PreconditionError("the sq_onnx kernels implement per-token activations only")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = model.opset_imports.get("", 18)
        self.replaced = quantize_w8a8(
            model.graph, self.linears, opset, self.act, self.static_absmax, self.kernels
        )
        if self.kernels == "ort" and self.replaced:
            ensure_opset(model, MS, 1)
        return ir.passes.PassResult(model, modified=bool(self.replaced))
