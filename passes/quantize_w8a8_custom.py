"""W8A8 per-token on the sq_onnx custom ops (``--kernels sq_onnx``; ops in custom_ops/).

Each input tensor X of the quantized linears gets one QuantizePerToken(X) (shared by q/k/v), and each linear
becomes Int8MatMulDequant(Xq, x_scale, Wq [N, K] int8, w_scale [N], bias [N]) with scales and bias in X's
type. Same weights and arithmetic as the stock form (quantize_w8a8), so both agree to float rounding; float32
and float16 activations only. Where X comes from a norm, ``fuse_norm_quant`` then folds the quantization into
the norm.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.graph_edit import SQ, add_initializer, replace_node
from sq_onnx.passes.linears import Linear
from sq_onnx.quant.int8 import quantize_per_channel

SUPPORTED = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}


def per_token_inputs(graph: ir.Graph, linears: list[Linear]) -> list[tuple[ir.Value, ir.Value]]:
    """(Xq, x_scale) for each linear: one QuantizePerToken per distinct input (q/k/v share one), inserted
    before its first reader."""
    act_cache: dict[int, tuple[ir.Value, ir.Value]] = {}
    for linear in linears:
        x = linear.input
        if id(x) not in act_cache:
            quant = ir.Node(SQ, "QuantizePerToken", [x], num_outputs=2, name=f"{x.name or 'x'}.quant")
            graph.insert_before(linear.node, [quant])
            act_cache[id(x)] = (quant.outputs[0], quant.outputs[1])
    graph.opset_imports.setdefault(SQ, 1)
    return [act_cache[id(linear.input)] for linear in linears]


def quantize_w8a8_custom(graph: ir.Graph, linears: list[Linear]) -> list[str]:
    """Replace each linear by Int8MatMulDequant (and its inputs' quantization); returns replaced names."""
    activations = per_token_inputs(graph, linears)
    done = []
    for linear, (xq, xs) in zip(linears, activations, strict=True):
        node = linear.node
        x_type = linear.activation_type
        if x_type not in SUPPORTED:
            raise ValueError(
                f"--kernels sq_onnx supports float32 and float16 activations, not {x_type} ({node.name})"
            )
        dtype = SUPPORTED[x_type]
        wq_kn, ws = quantize_per_channel(linear.weight_kn())
        base = linear.weight_name or linear.name
        inputs = [
            xq,
            xs,
            add_initializer(graph, f"{base}.int8_nk", np.ascontiguousarray(wq_kn.T)),
            add_initializer(graph, f"{base}.w_scale", ws.astype(dtype)),
        ]
        bias = linear.bias_array()
        if bias is not None:
            inputs.append(add_initializer(graph, f"{base}.bias", bias.astype(dtype)))
        mm = ir.Node(SQ, "Int8MatMulDequant", inputs, name=node.name)
        linear.release()  # before the node leaves the graph: its weight is read through it
        replace_node(graph, node, [mm], mm.outputs[0])
        done.append(node.name or "")
    return done
