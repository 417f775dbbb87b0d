"""W8A8 per-token on the sq_onnx custom ops (``--kernels sq_onnx``; ops in custom_ops/).

Per input tensor X of the quantized linears:
- X is the single output in use of a last-axis norm node, and every user of X is a linear being
  quantized: the norm becomes its fused form (RMSNormQuant, SkipRMSNormQuant keeping the residual sum,
  LayerNormQuant) with the same γ, β and epsilon, so X itself is never written; an RMSNorm spelled out in
  ONNX ops (torch.onnx's LlamaRMSNorm, passes/decomposed_rmsnorm.py) becomes RMSNormQuant the same way;
- otherwise QuantizePerToken(X) after it.
Each linear becomes Int8MatMulDequant(Xq, x_scale, Wq [N, K] int8, w_scale [N], bias [N]) with scales
and bias in X's type. Same weights and arithmetic as the stock form (quantize_w8a8), so both agree to
float rounding; float32 and float16 activations only.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.decomposed_rmsnorm import match_decomposed_rmsnorm
from sq_onnx.passes.graph_edit import SQ, add_initializer, replace_node
from sq_onnx.passes.linears import Linear, _attr_float, _attr_int, constant_array
from sq_onnx.quant.int8 import quantize_per_channel

SUPPORTED = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16}

# norm op (domain, type) -> (fused op, default epsilon, index of the residual-sum output or None)
FUSABLE = {
    ("", "SimplifiedLayerNormalization"): ("RMSNormQuant", 1e-5, None),
    ("com.microsoft", "SimplifiedLayerNormalization"): ("RMSNormQuant", 1e-5, None),
    ("", "RMSNormalization"): ("RMSNormQuant", 1e-5, None),
    ("com.microsoft", "SkipSimplifiedLayerNormalization"): ("SkipRMSNormQuant", 1e-12, 3),
    ("", "LayerNormalization"): ("LayerNormQuant", 1e-5, None),
}


def _last_axis(node: ir.Node, x: ir.Value) -> bool:
    axis = _attr_int(node, "axis", -1)
    rank = x.shape.rank() if x.shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


def _fused_decomposed(x: ir.Value, dtype: type) -> tuple[ir.Node, ir.Node] | None:
    """RMSNormQuant for an RMSNorm spelled out in ONNX ops (passes/decomposed_rmsnorm.py), γ in X's type."""
    norm = match_decomposed_rmsnorm(x)
    if norm is None or constant_array(norm.gamma).dtype != dtype:
        return None
    eps = ir.AttrFloat32("epsilon", norm.epsilon)
    return norm.output_node, ir.Node(
        SQ, "RMSNormQuant", [norm.x, norm.gamma], attributes=[eps], num_outputs=2
    )


def _fused_norm(
    x: ir.Value, quantized: set[int], graph_outputs: list[ir.Value], dtype: type
) -> tuple[ir.Node, ir.Node] | None:
    """(norm node, its fused replacement) when X's producer can absorb the quantization, else None."""
    norm = x.producer()
    if norm is None or any(id(user) not in quantized for user, _ in x.uses()) or x in graph_outputs:
        return None
    if (norm.domain, norm.op_type) not in FUSABLE:
        return _fused_decomposed(x, dtype)
    if norm.outputs[0] is not x:
        return None
    op, default_eps, sum_index = FUSABLE[(norm.domain, norm.op_type)]
    if any(out.uses() for i, out in enumerate(norm.outputs) if i not in (0, sum_index)):
        return None  # mean / inverse std-dev outputs are used elsewhere
    if not _last_axis(norm, norm.inputs[0]) or any(out in graph_outputs for out in norm.outputs):
        return None
    eps = ir.AttrFloat32("epsilon", _attr_float(norm, "epsilon", default_eps))
    if op == "SkipRMSNormQuant":
        inputs = list(norm.inputs[:4])
        fused = ir.Node(SQ, op, inputs, attributes=[eps], num_outputs=3)
    else:
        fused = ir.Node(
            SQ, op, list(norm.inputs[: 3 if op == "LayerNormQuant" else 2]), attributes=[eps], num_outputs=2
        )
    return norm, fused


def _activation_type(linear: Linear) -> ir.DataType | None:
    """X's element type; intermediate values often carry none, and then the weight's type is X's."""
    if linear.input.dtype is not None:
        return linear.input.dtype
    tensor = linear.source.const_value
    return linear.source.dtype or (tensor.dtype if tensor is not None else None)


def quantize_w8a8_custom(graph: ir.Graph, linears: list[Linear]) -> list[str]:
    """Replace each linear by Int8MatMulDequant (and its inputs' quantization); returns replaced names."""
    quantized = {id(linear.node) for linear in linears}
    act_cache: dict[int, tuple[ir.Value, ir.Value]] = {}
    done = []
    for linear in linears:
        node, x = linear.node, linear.input
        x_type = _activation_type(linear)
        if x_type not in SUPPORTED:
            raise ValueError(
                f"--kernels sq_onnx supports float32 and float16 activations, not {x_type} ({node.name})"
            )
        dtype = SUPPORTED[x_type]
        if id(x) not in act_cache:
            fused = _fused_norm(x, quantized, list(graph.outputs), dtype)
            if fused is not None:
                norm, new = fused
                new.name = f"{norm.name or 'norm'}.quant"
                graph.insert_before(norm, [new])
                if new.op_type == "SkipRMSNormQuant" and len(norm.outputs) > 3:
                    ir.convenience.replace_all_uses_with(norm.outputs[3], new.outputs[2])
            else:
                new = ir.Node(SQ, "QuantizePerToken", [x], num_outputs=2, name=f"{x.name or 'x'}.quant")
                graph.insert_before(node, [new])
            act_cache[id(x)] = (new.outputs[0], new.outputs[1])
        xq, xs = act_cache[id(x)]
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
        replace_node(graph, node, [mm], mm.outputs[0])
        linear.release()
        done.append(node.name or "")
    # the replaced norms have no users left: the caller's cleanup (RemoveUnusedNodesPass) drops them
    graph.opset_imports.setdefault(SQ, 1)
    return done
