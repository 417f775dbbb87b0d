"""Quantized linears in standard ONNX ops (``--format qdq`` / ``qoperator``): the form execution providers read
(TensorRT, QNN, OpenVINO, DirectML) and that ORT's CPU optimizer fuses itself (blocked DequantizeLinear +
MatMul -> MatMulNBits; Q/DQ around a MatMul -> QLinearMatMul or MatMulIntegerToFloat).

- weight-only (W4, and the 8-bit lm_head): ``emit_blocked_dq`` writes the codes as a uint4 / uint8 [K, N]
  initializer and a blocked ``DequantizeLinear`` (opset 21: axis 0, block_size; scales and zero points
  [K / block, N]) before a ``MatMul``: the same codes and grid as MatMulNBits, so both compute the same weight;
- W8A8 ``qdq``: X -> QuantizeLinear -> DequantizeLinear with its calibrated per-tensor scale (int8, zero point
  0; one pair per tensor, shared by q/k/v), the per-channel int8 weight -> DequantizeLinear(axis 1), MatMul;
  the ``wide`` linears' inputs are int16 (A16W8, as QNN runs the layers int8 activations hurt most; ORT's
  CPU runs them as float MatMuls);
- W8A8 ``qoperator``: QuantizeLinear(X) (the same calibrated int8 scale) -> MatMulInteger with the per-channel
  int8 weight -> Cast -> Mul(x_scale · w_scale): the QOperator form's integer MatMul with a float output (what
  ORT's own dynamic quantization writes in that form; ORT fuses it into MatMulIntegerToFloat). Not
  QLinearMatMul: its output is requantized to int8 with one scale per tensor, which LLMs' outputs cannot carry
  (massive activations up to 25,000 beside channels below 50; gate / up outputs): on SmolLM2 it dropped top-1
  agreement with the float model to 29% (tools/RESULTS.md), and every output here is read in float anyway.
A bias is a separate Add. Scales are in the activations' type (float32 or float16).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from sq_onnx.passes.graph_edit import add_initializer, replace_node, require_in_graph
from sq_onnx.passes.linears import Linear
from sq_onnx.quant.blockwise import BlockQuantized
from sq_onnx.quant.int8 import EPS, quantize_per_channel

SCALE_TYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def _scale_type(linear: Linear) -> type:
    dtype = linear.activation_type
    if dtype not in SCALE_TYPES:
        raise ValueError(
            f"--format qdq / qoperator take float32 or float16 activations, not {dtype} ({linear.name})"
        )
    return SCALE_TYPES[dtype]


def _add_bias(graph: ir.Graph, linear: Linear, y: ir.Value, dtype: type, nodes: list[ir.Node]) -> ir.Value:
    bias = linear.bias_array()
    if bias is None:
        return y
    base = linear.weight_name or linear.name
    nodes.append(ir.Node("", "Add", [y, add_initializer(graph, f"{base}.bias", bias.astype(dtype))]))
    return nodes[-1].outputs[0]


def emit_blocked_dq(graph: ir.Graph, linear: Linear, bq: BlockQuantized, accuracy_level: int) -> ir.Node:
    """Replace ``linear`` by blocked DequantizeLinear + MatMul holding ``bq`` (``accuracy_level`` is
    MatMulNBits', which ORT's fusion takes from its session option instead)."""
    del accuracy_level
    k, n = bq.k, bq.scales.shape[0]
    dtype = _scale_type(linear)
    codes = np.ascontiguousarray(bq.q.reshape(n, -1)[:, :k].T)  # [K, N]
    zp = (
        bq.zero_points
        if bq.zero_points is not None
        else np.full(bq.scales.shape, 1 << (bq.bits - 1), np.uint8)
    )
    code_type = ml_dtypes.uint4 if bq.bits == 4 else np.uint8
    base = linear.weight_name or linear.name
    dq = ir.Node(
        "",
        "DequantizeLinear",
        [
            add_initializer(graph, f"{base}.q{bq.bits}", codes.astype(code_type)),
            add_initializer(graph, f"{base}.scales", np.ascontiguousarray(bq.scales.T).astype(dtype)),
            add_initializer(graph, f"{base}.zero_points", np.ascontiguousarray(zp.T).astype(code_type)),
        ],
        attributes=[ir.AttrInt64("axis", 0), ir.AttrInt64("block_size", bq.block_size)],
    )
    matmul = ir.Node("", "MatMul", [linear.input, dq.outputs[0]], name=linear.name)
    nodes = [dq, matmul]
    y = _add_bias(graph, linear, matmul.outputs[0], dtype, nodes)
    linear.release()
    replace_node(graph, linear.node, nodes, y)
    return matmul


class QuantizeW8A8QDQPass(ir.passes.InPlacePass):
    """Replace ``linears`` by W8A8 in standard ops: Q/DQ + MatMul (``qoperator=False``) or MatMulInteger.

    Precondition (``requires``): every linear is a node of this graph with float32 / float16 activations;
    ``act_absmax`` holds the calibrated abs-max of every input tensor (after smoothing). After the call,
    ``replaced`` names the replaced nodes."""

    def __init__(
        self,
        linears: list[Linear],
        act_absmax: dict[str, float],
        qoperator: bool = False,
        wide: frozenset[str] = frozenset(),
    ):
        super().__init__()
        self.wide = wide  # names of the linears whose input is quantized to int16 (A16W8), not int8
        self.linears, self.act_absmax, self.qoperator = linears, act_absmax, qoperator
        self.replaced: list[str] = []

    def requires(self, model: ir.Model) -> None:
        require_in_graph(model, self.linears)
        if self.wide and self.qoperator:
            raise ir.passes.PreconditionError("--format qoperator takes 8-bit activations only")
        for linear in self.linears:
            if linear.input.name not in self.act_absmax:
                raise ir.passes.PreconditionError(f"no calibrated activation range for {linear.input.name}")
            try:
                _scale_type(linear)
            except ValueError as exc:
                raise ir.passes.PreconditionError(str(exc)) from None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        quantized: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}  # X -> (Xq, scale, DQ(Xq))
        if not self.linears:
            return ir.passes.PassResult(model, modified=False)
        # int8 activations around 0 (MatMulInteger multiplies int8 by int8: no int16 saturation on AVX2 CPUs)
        zero = add_initializer(graph, "sq_onnx.zero_int8", np.array(0, np.int8))
        self.replaced = []
        # a tensor read by any wide linear is quantized once, to int16, for all its readers
        wide_inputs = {id(lin.input) for lin in self.linears if lin.name in self.wide}
        zero16 = add_initializer(graph, "sq_onnx.zero_int16", np.array(0, np.int16)) if wide_inputs else None
        for linear in self.linears:
            dtype = _scale_type(linear)
            x = linear.input
            if id(x) not in quantized:
                name = x.name or linear.name
                wide = id(x) in wide_inputs
                qmax = 32767.0 if wide else 127.0
                scale = add_initializer(
                    graph, f"{name}.act_scale", np.array(max(self.act_absmax[name], EPS) / qmax, dtype)
                )
                x_zero = zero16 if wide else zero
                q = ir.Node("", "QuantizeLinear", [x, scale, x_zero])
                pre = [q]
                if not self.qoperator:
                    pre.append(ir.Node("", "DequantizeLinear", [q.outputs[0], scale, x_zero]))
                graph.insert_before(linear.node, pre)
                quantized[id(x)] = (q.outputs[0], scale, pre[-1].outputs[0])
            xq, x_scale, x_dq = quantized[id(x)]
            wq, ws = quantize_per_channel(linear.weight_kn())
            base = linear.weight_name or linear.name
            w = add_initializer(graph, f"{base}.int8", wq)
            w_zero = add_initializer(graph, f"{base}.w_zero", np.zeros(ws.shape, np.int8))
            if self.qoperator:
                mm = ir.Node("", "MatMulInteger", [xq, w, zero, w_zero], name=linear.name)
                to = ir.AttrInt64("to", int(linear.activation_type))
                as_float = ir.Node("", "Cast", [mm.outputs[0]], attributes=[to])
                scale = (x_scale.const_value.numpy().astype(np.float32) * ws).astype(dtype)
                y_scale = add_initializer(graph, f"{base}.y_scale", scale)
                nodes = [mm, as_float, ir.Node("", "Mul", [as_float.outputs[0], y_scale])]
            else:
                w_scale = add_initializer(graph, f"{base}.w_scale", ws.astype(dtype))
                w_dq = ir.Node(
                    "", "DequantizeLinear", [w, w_scale, w_zero], attributes=[ir.AttrInt64("axis", 1)]
                )
                mm = ir.Node("", "MatMul", [x_dq, w_dq.outputs[0]], name=linear.name)
                nodes = [w_dq, mm]
            y = _add_bias(graph, linear, nodes[-1].outputs[0], dtype, nodes)
            linear.release()
            replace_node(graph, linear.node, nodes, y)
            self.replaced.append(linear.name)
        return ir.passes.PassResult(model, modified=bool(self.replaced))
