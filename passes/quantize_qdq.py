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
- W8A8 ``qoperator``: QuantizeLinear(X) -> QLinearMatMul(..., y_scale) -> DequantizeLinear, y_scale from the
  calibrated abs-max of the linear's output, activations and outputs uint8 around 128 (codes -127..127 + 128) (QLinearMatMul's scales are scalars per tensor in ORT, so it
  cannot carry per-token activation scales).
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
    """Replace ``linears`` by W8A8 in standard ops: Q/DQ + MatMul (``qoperator=False``) or QLinearMatMul.

    Precondition (``requires``): every linear is a node of this graph with float32 / float16 activations;
    ``act_absmax`` holds the calibrated abs-max of every input tensor (after smoothing), and for
    ``qoperator`` ``out_absmax`` that of every linear's output. After the call, ``replaced`` names the
    replaced nodes."""

    def __init__(
        self,
        linears: list[Linear],
        act_absmax: dict[str, float],
        out_absmax: dict[str, float] | None = None,
        qoperator: bool = False,
        wide: frozenset[str] = frozenset(),
    ):
        super().__init__()
        self.wide = wide  # names of the linears whose input is quantized to int16 (A16W8), not int8
        self.linears, self.act_absmax, self.out_absmax, self.qoperator = (
            linears,
            act_absmax,
            out_absmax,
            qoperator,
        )
        self.replaced: list[str] = []

    def requires(self, model: ir.Model) -> None:
        require_in_graph(model, self.linears)
        if self.wide and self.qoperator:
            raise ir.passes.PreconditionError("QLinearMatMul takes 8-bit activations only")
        for linear in self.linears:
            if linear.input.name not in self.act_absmax:
                raise ir.passes.PreconditionError(f"no calibrated activation range for {linear.input.name}")
            output = linear.node.outputs[0].name
            if self.qoperator and output not in (self.out_absmax or {}):
                raise ir.passes.PreconditionError(f"no calibrated output range for {output}")
            try:
                _scale_type(linear)
            except ValueError as exc:
                raise ir.passes.PreconditionError(str(exc)) from None

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        quantized: dict[int, tuple[ir.Value, ir.Value, ir.Value]] = {}  # X -> (Xq, scale, DQ(Xq))
        if not self.linears:
            return ir.passes.PassResult(model, modified=False)
        # activations: int8 around 0 for QDQ; for QLinearMatMul uint8 around 128 (ORT's own convention: its
        # optimizer's QDQ propagation past Reshapes breaks on int8 QLinearMatMul outputs in ORT 1.32)
        zero = (
            add_initializer(graph, "sq_onnx.zero_uint8", np.array(128, np.uint8))
            if self.qoperator
            else add_initializer(graph, "sq_onnx.zero_int8", np.array(0, np.int8))
        )
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
            w_scale = add_initializer(graph, f"{base}.w_scale", ws.astype(dtype))
            w_zero = add_initializer(graph, f"{base}.w_zero", np.zeros(ws.shape, np.int8))
            if self.qoperator:
                out = linear.node.outputs[0].name or ""
                y_scale = add_initializer(
                    graph, f"{base}.y_scale", np.array(max((self.out_absmax or {})[out], EPS) / 127.0, dtype)
                )
                mm = ir.Node(
                    "",
                    "QLinearMatMul",
                    [xq, x_scale, zero, w, w_scale, w_zero, y_scale, zero],
                    name=linear.name,
                )
                nodes = [mm, ir.Node("", "DequantizeLinear", [mm.outputs[0], y_scale, zero])]
            else:
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
