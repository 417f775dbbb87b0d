"""``MatMulNBits`` at ``accuracy_level`` 4 -> ``sq_onnx::MatMulNBitsA8`` (``--kernels sq_onnx`` with W4).

At level 4 ORT's CPU kernel (MLAS CompInt8) quantizes the activation to int8 per block of K and multiplies
with the 4- or 8-bit codes in integers. ``MatMulNBitsA8`` (custom_ops/src/cpu_nbits_a8.h) computes the same
numbers (to float rounding: the int32 block sums are exact in both) from the same inputs and attributes, with
weights repacked once into panels of 16 output columns for vpdpbusd, and prefills several times faster than
MLAS on AVX-512 VNNI (tools/RESULTS.md). Only what it computes the same is swapped: 4- or 8-bit weights,
level 4, float32 activations, uint8 zero points or none, no g_idx; everything else stays MatMulNBits.
"""

from __future__ import annotations

import onnx_ir as ir

from sq_onnx.passes.graph_edit import MS, SQ, ensure_opset

OP = "MatMulNBitsA8"
_KEPT_ATTRIBUTES = ("K", "N", "bits", "block_size")


def _attr(node: ir.Node, name: str, default: int) -> int:
    return int(node.attributes[name].value) if name in node.attributes else default


def why_not(node: ir.Node) -> str | None:
    """None when ``node`` can become a MatMulNBitsA8, else why not (one clause)."""
    if node.domain != MS or node.op_type != "MatMulNBits":
        return "not a MatMulNBits"
    if _attr(node, "bits", 4) not in (4, 8):
        return f"{_attr(node, 'bits', 4)}-bit weights"
    if _attr(node, "accuracy_level", 0) != 4:
        return f"accuracy_level {_attr(node, 'accuracy_level', 0)}"
    a = node.inputs[0]
    if a is None or a.dtype != ir.DataType.FLOAT:
        return "activations not float32"
    if len(node.inputs) > 4 and node.inputs[4] is not None:
        return "g_idx"
    zp = node.inputs[3] if len(node.inputs) > 3 else None
    if zp is not None and zp.dtype != ir.DataType.UINT8:
        return "float zero points"
    return None


class UseNBitsA8KernelPass(ir.passes.InPlacePass):
    """Swap every eligible MatMulNBits (see ``why_not``) for ``sq_onnx::MatMulNBitsA8``, keeping the output's
    name; ``swapped`` counts them and ``kept`` says why the other MatMulNBits stayed."""

    def __init__(self) -> None:
        super().__init__()
        self.swapped = 0
        self.kept: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.swapped, self.kept = 0, {}
        graph = model.graph
        for node in list(graph):
            if node.domain != MS or node.op_type != "MatMulNBits":
                continue
            reason = why_not(node)
            if reason is not None:
                self.kept[reason] = self.kept.get(reason, 0) + 1
                continue
            _swap(graph, node)
            self.swapped += 1
        if self.swapped:
            ensure_opset(model, SQ, 1)
        return ir.passes.PassResult(model, modified=bool(self.swapped))


def _swap(graph: ir.Graph, node: ir.Node) -> None:
    inputs = list(node.inputs[:4]) + [None] * (4 - len(node.inputs[:4]))
    bias = node.inputs[5] if len(node.inputs) > 5 else None
    if bias is not None:
        inputs.append(bias)
    while inputs and inputs[-1] is None:
        inputs.pop()
    attributes = [ir.AttrInt64(name, _attr(node, name, 4)) for name in _KEPT_ATTRIBUTES]
    new = ir.Node(SQ, OP, inputs, attributes=attributes, name=node.name)
    old = node.outputs[0]
    new.outputs[0].type, new.outputs[0].shape = old.type, old.shape
    graph.insert_before(node, new)
    old.replace_all_uses_with(new.outputs[0], replace_graph_outputs=True)
    name = old.name
    graph.remove(node, safe=True)
    new.outputs[0].name = name
