"""bf16 models on ONNX Runtime's CPU provider, which has (almost) no bfloat16 kernels: calibration and
verification run a float32 twin of the graph instead.

The twin widens every bfloat16 tensor to float32 (exactly: bf16 is a truncated float32), so it computes
what the bf16 model computes up to the rounding of its intermediate activations. Weights are widened
lazily, one tensor at a time, when the session is written.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_onnx.runtime.model_io import copy_model

BF16 = ir.DataType.BFLOAT16
FLOAT = ir.DataType.FLOAT


def _typed_values(graph: ir.Graph) -> list[ir.Value]:
    """Inputs, outputs, initializers and node outputs of ``graph``: every value that carries a type."""
    values = [*graph.inputs, *graph.outputs, *graph.initializers.values()]
    return values + [v for node in graph for v in node.outputs]


def has_bfloat16(model: ir.Model) -> bool:
    """Whether any input, output, initializer or node output of the main graph is bfloat16."""
    return any(v.dtype == BF16 for v in _typed_values(model.graph))


def _widened(tensor: ir.TensorProtocol) -> ir.LazyTensor:
    def make() -> ir.Tensor:
        return ir.tensor(np.asarray(tensor.numpy()).astype(np.float32))

    return ir.LazyTensor(make, dtype=FLOAT, shape=tensor.shape, name=tensor.name)


def float32_twin(model: ir.Model) -> ir.Model:
    """A copy of ``model`` with every bfloat16 value, initializer and Cast target made float32."""

    twin = copy_model(model)
    graph = twin.graph
    for value in graph.initializers.values():
        if value.const_value is not None and value.const_value.dtype == BF16:
            value.const_value = _widened(value.const_value)
    for value in _typed_values(graph):
        if value.dtype == BF16:
            value.type = ir.TensorType(FLOAT)  # a new type object: clones share the old one
    for node in graph:
        to = node.attributes.get("to")
        if node.op_type == "Cast" and to is not None and to.as_int() == int(BF16):
            node.attributes["to"] = ir.AttrInt64("to", int(FLOAT))
    return twin
