"""Recognise an RMSNorm spelled out in ONNX ops, as torch.onnx exports LlamaRMSNorm:

    γ * (x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2), axes=[-1], keepdims=1) + eps)))

(``Div(1, ·)`` for the Reciprocal and ``Mul(x, x)`` for the Pow are accepted too), so that the custom-op W8A8
pass can fuse the whole chain, γ already divided by the smoothing scale, into one ``RMSNormQuant``. Every
intermediate must feed only the next step: a chain whose pieces are used elsewhere is left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.linears import _attr_int, constant_array, is_constant


@dataclass(frozen=True)
class DecomposedRMSNorm:
    x: ir.Value  # the input being normalised
    gamma: ir.Value  # the per-channel constant, a vector
    epsilon: float
    output_node: ir.Node  # the Mul by γ, whose output is the norm's


def _producer(value: ir.Value | None, op: str) -> ir.Node | None:
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op and node.domain == "" else None


def _only_feeds_next(value: ir.Value) -> bool:
    return len(value.uses()) == 1 and not value.is_graph_output()


def _scalar(value: ir.Value | None) -> float | None:
    arr = constant_array(value) if is_constant(value) else None
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def _other(node: ir.Node, value: ir.Value) -> ir.Value | None:
    """The other input of a two-input node, given one of them."""
    a, b = node.inputs
    return b if a is value else a if b is value else None


def _mean_over_last_axis(node: ir.Node, x: ir.Value) -> bool:
    if _attr_int(node, "keepdims", 1) != 1:
        return False
    attr = node.attributes.get("axes")
    if attr is not None:
        axes = list(attr.value)
    elif len(node.inputs) > 1 and is_constant(node.inputs[1]):
        axes = constant_array(node.inputs[1]).reshape(-1).tolist()
    else:
        return False
    rank = x.shape.rank() if x.shape is not None else None
    return len(axes) == 1 and (axes[0] == -1 or (rank is not None and axes[0] == rank - 1))


def _squares(node: ir.Node | None, x: ir.Value) -> bool:
    """Pow(x, 2) or Mul(x, x)."""
    if node is None or node.domain != "":
        return False
    if node.op_type == "Pow":
        return node.inputs[0] is x and _scalar(node.inputs[1]) == 2.0
    return node.op_type == "Mul" and node.inputs[0] is x and node.inputs[1] is x


def _inverse_rms(r: ir.Value, x: ir.Value) -> float | None:
    """eps when r = 1 / sqrt(mean(x^2, last axis) + eps) with single-use intermediates, else None."""
    recip = _producer(r, "Reciprocal")
    div = _producer(r, "Div")
    if recip is not None:
        s = recip.inputs[0]
    elif div is not None and _scalar(div.inputs[0]) == 1.0:
        s = div.inputs[1]
    else:
        return None
    sqrt = _producer(s, "Sqrt")
    if sqrt is None or not _only_feeds_next(s):
        return None
    t = sqrt.inputs[0]
    add = _producer(t, "Add")
    if add is None or not _only_feeds_next(t):
        return None
    for mean, eps in ((add.inputs[0], add.inputs[1]), (add.inputs[1], add.inputs[0])):
        reduce = _producer(mean, "ReduceMean")
        epsilon = _scalar(eps)
        if reduce is None or epsilon is None or not _only_feeds_next(mean):
            continue
        squared = reduce.inputs[0]
        if _mean_over_last_axis(reduce, x) and _only_feeds_next(squared) and _squares(squared.producer(), x):
            return epsilon
    return None


def match_decomposed_rmsnorm(value: ir.Value) -> DecomposedRMSNorm | None:
    """The decomposed RMSNorm whose output is ``value``, or None."""
    mul_g = _producer(value, "Mul")
    if mul_g is None or len(mul_g.inputs) != 2:
        return None
    for gamma in mul_g.inputs:
        scaled = _other(mul_g, gamma)
        arr = constant_array(gamma) if is_constant(gamma) else None
        if arr is None or arr.ndim != 1 or not np.issubdtype(arr.dtype, np.floating):
            continue
        mul_x = _producer(scaled, "Mul")
        if mul_x is None or not _only_feeds_next(scaled):
            continue
        for x in mul_x.inputs:
            r = _other(mul_x, x)
            if r is None or r is x or not _only_feeds_next(r):
                continue
            channels = x.shape[-1] if x.shape is not None and x.shape.rank() else None
            if isinstance(channels, int) and channels != arr.shape[0]:
                continue
            eps = _inverse_rms(r, x)
            if eps is not None:
                return DecomposedRMSNorm(x, gamma, eps, mul_g)
    return None
