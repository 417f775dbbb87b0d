"""Linears that read one tensor -> one ``MatMulNBits`` and a ``Split`` (q/k/v, gate/up).

At decode (one token) a small model's W4 linears cost little arithmetic and much per-call work: ORT's
kernel quantizes the activation (level 4), dispatches its threads and walks the weight blocks once per node.
MatMulNBits' blocks run along K per output column, so MatMulNBits nodes that share the input, K, the bit
width, the block size and the level compute the same columns when their weights, scales, zero points and
biases are joined along N: one node, then a Split back to each linear's output (what onnxruntime-genai's
model builder writes as packed qkv_proj / gate_up_proj). On SmolLM2 this takes 210 kernel calls per token to
121 (tools/RESULTS.md).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.graph_edit import MS, add_initializer

# The attributes that must agree for two nodes' columns to be computed the same way in one node.
_SHARED_ATTRIBUTES = ("K", "bits", "block_size", "accuracy_level")


def _key(node: ir.Node) -> tuple | None:
    """Nodes with equal keys can be joined; None: this node cannot (not a constant-weight MatMulNBits, g_idx)."""
    if node.domain != MS or node.op_type != "MatMulNBits" or node.inputs[0] is None:
        return None
    constants = node.inputs[1:]
    if any(v is not None and v.const_value is None for v in constants):
        return None
    if len(constants) > 3 and constants[3] is not None:  # g_idx reorders K: leave such nodes alone
        return None
    attrs = tuple(node.attributes[a].value if a in node.attributes else None for a in _SHARED_ATTRIBUTES)
    present = tuple(v is not None for v in constants)
    return (id(node.inputs[0]), attrs, present)


class MergeSharedInputMatMulNBitsPass(ir.passes.InPlacePass):
    """Join every set of MatMulNBits nodes that can be joined (see the module's docstring). The function is
    unchanged: each output column is computed from the same bytes as before. ``merged`` records, per new
    node, the names of the nodes it replaced."""

    def __init__(self) -> None:
        super().__init__()
        self.merged: list[list[str]] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.merged = []
        graph = model.graph
        outputs = set(graph.outputs)
        groups: dict[tuple, list[ir.Node]] = defaultdict(list)
        for node in graph:
            key = _key(node)
            if key is not None and node.outputs[0] not in outputs:
                groups[key].append(node)
        for nodes in groups.values():
            if len(nodes) > 1:
                _join(graph, nodes)
                self.merged.append([n.name or "" for n in nodes])
        return ir.passes.PassResult(model, modified=bool(self.merged))


def _join(graph: ir.Graph, nodes: list[ir.Node]) -> None:
    first = nodes[0]
    base = first.name or "matmulnbits"
    inputs: list[ir.Value | None] = [first.inputs[0]]
    for i, value in enumerate(first.inputs[1:], start=1):
        if value is None:
            inputs.append(None)
            continue
        arrays = [n.inputs[i].const_value.numpy() for n in nodes]  # type: ignore[union-attr]
        suffix = value.name.rsplit(".", 1)[-1] if value.name else str(i)
        inputs.append(add_initializer(graph, f"{base}.joined.{suffix}", np.concatenate(arrays, axis=0)))
    widths = [n.attributes["N"].value for n in nodes]
    attributes = [a for name, a in first.attributes.items() if name != "N"]
    joined = ir.Node(
        MS,
        "MatMulNBits",
        inputs,
        attributes=[*attributes, ir.AttrInt64("N", sum(widths))],
        name=f"{base}.joined",
    )
    splits = add_initializer(graph, f"{base}.joined.split", np.array(widths, np.int64))
    split = ir.Node(
        "",
        "Split",
        [joined.outputs[0], splits],
        attributes=[ir.AttrInt64("axis", -1)],
        num_outputs=len(nodes),
        name=f"{base}.joined.split",
    )
    joined.outputs[0].name = f"{base}.joined.out"
    joined.outputs[0].type = first.outputs[0].type
    graph.insert_before(first, [joined, split])
    for node, out in zip(nodes, split.outputs, strict=True):
        old = node.outputs[0]
        out.type, out.shape = old.type, old.shape
        old.replace_all_uses_with(out)
        name = old.name
        graph.remove(node, safe=True)
        out.name = name
