"""Shapes for graphs whose exporter wrote none between the nodes (torch.onnx's TorchScript exporter, the genai
model builder): the analysis decides what a per-channel scale may pass through from value shapes, e.g. that
GPT-2's Conv1D flatten ``x.view(-1, x.size(-1))`` keeps the channel axis last, whose Reshape target is computed
at run time from ``Shape(x)``. ONNX's shape inference with data propagation follows such computed targets."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from sq_onnx.passes.linears import find_linears


def fill_missing_shapes(model: ir.Model) -> bool:
    """Infer the graph's value shapes in place when some linear's input has none; returns whether it ran. A graph
    with shapes everywhere it matters (sq-onnx's own exports) is left as it is. Ops ONNX does not know (ORT's
    contrib ops) leave their outputs unknown; inference that fails leaves the model unchanged."""
    if all(linear.input.shape is not None for linear in find_linears(model.graph)):
        return False
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    return True
