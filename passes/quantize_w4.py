"""Weight-only quantization: every selected linear -> ``com.microsoft::MatMulNBits`` (runs on stock ORT).

Precondition: ``linears`` were found on this graph (after any smoothing). Gemm biases are kept as the
op's bias input. Returns the names of the replaced nodes.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.graph_edit import add_initializer, replace_node
from sq_onnx.passes.linears import Linear
from sq_onnx.quant.blockwise import BlockQuantized, quantize_blockwise
from sq_onnx.quant.gptq import DAMP, gptq_quantize

MS = "com.microsoft"


def _float_dtype(linear: Linear) -> np.dtype:
    dtype = linear.input.dtype
    if dtype == ir.DataType.FLOAT16:
        return np.dtype(np.float16)
    if dtype == ir.DataType.BFLOAT16:
        return ir.DataType.BFLOAT16.numpy()  # ml_dtypes.bfloat16: MatMulNBits takes bf16 scales with bf16 A
    return np.dtype(np.float32)


def quantize_weight(
    w: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    clip_search: bool = False,
    importance: np.ndarray | None = None,
    hessian: np.ndarray | None = None,
    act_order: bool = False,
    refine_rounds: int = 0,
    damp: float = DAMP,
) -> BlockQuantized:
    """A [K, N] float32 weight in MatMulNBits' layout: GPTQ's error feedback when the input's ``hessian``
    is given, else per-block rounding (with the clip search weighted by ``importance``)."""
    if hessian is not None:
        return gptq_quantize(
            w,
            hessian,
            bits,
            block_size,
            symmetric,
            clip_search=clip_search,
            act_order=act_order,
            refine_rounds=refine_rounds,
            damp=damp,
        )
    return quantize_blockwise(w, bits, block_size, symmetric, clip_search=clip_search, importance=importance)


def replace_with_matmulnbits(
    graph: ir.Graph,
    linear: Linear,
    bits: int,
    block_size: int,
    symmetric: bool,
    accuracy_level: int,
    **options: Any,
) -> ir.Node:
    """Swap one linear for a MatMulNBits node computing the same Y from quantized weights; ``options``
    are ``quantize_weight``'s (clip search, importance, GPTQ's hessian, act order, refine rounds)."""
    w = linear.weight_kn().astype(np.float32)
    bq = quantize_weight(w, bits, block_size, symmetric, **options)
    return emit_matmulnbits(graph, linear, bq, accuracy_level)


def emit_matmulnbits(graph: ir.Graph, linear: Linear, bq: BlockQuantized, accuracy_level: int) -> ir.Node:
    """Replace ``linear`` by a MatMulNBits node holding ``bq`` (its [K, N] weight, already quantized)."""
    k, n = bq.k, bq.scales.shape[0]
    bits, block_size = bq.bits, bq.block_size
    dtype = _float_dtype(linear)
    base = linear.weight_name or linear.name
    inputs: list[ir.Value | None] = [
        linear.input,
        add_initializer(graph, f"{base}.q{bits}", bq.packed),
        add_initializer(graph, f"{base}.scales", bq.scales.astype(dtype)),
    ]
    zp = bq.packed_zero_points()
    inputs.append(add_initializer(graph, f"{base}.zero_points", zp) if zp is not None else None)
    bias = linear.bias_array()
    if bias is not None:
        inputs += [None, add_initializer(graph, f"{base}.bias", bias.astype(dtype))]
    while inputs and inputs[-1] is None:
        inputs.pop()
    old = linear.node
    node = ir.Node(
        MS,
        "MatMulNBits",
        inputs,
        attributes=[
            ir.AttrInt64("K", k),
            ir.AttrInt64("N", n),
            ir.AttrInt64("bits", bits),
            ir.AttrInt64("block_size", block_size),
            ir.AttrInt64("accuracy_level", accuracy_level),
        ],
        name=old.name,
    )
    replace_node(graph, old, [node], node.outputs[0])
    return node
