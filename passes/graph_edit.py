"""Small helpers for adding constants and nodes through onnx_ir without name clashes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.linears import Linear

# Operator domains: ORT's contrib ops, and the custom-op library built from custom_ops/.
MS = "com.microsoft"
SQ = "sq_onnx"


def unique_name(graph: ir.Graph, base: str) -> str:
    """A value name not yet used by an initializer in ``graph``."""
    taken = graph.initializers
    if base not in taken:
        return base
    i = 1
    while f"{base}_{i}" in taken:
        i += 1
    return f"{base}_{i}"


def add_initializer(graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a new initializer and return its value."""
    name = unique_name(graph, base)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    value.type = ir.TensorType(value.const_value.dtype)
    graph.register_initializer(value)
    return value


def set_weight(graph: ir.Graph, linear: Linear, w_kn: np.ndarray, suffix: str) -> None:
    """Give ``linear`` a new, unshared constant weight (given as [K, N]); old constants are left for DCE."""
    value = add_initializer(
        graph, f"{linear.weight_name or linear.node.name}.{suffix}", np.ascontiguousarray(w_kn)
    )
    _use_weight(linear, value)


def _use_weight(linear: Linear, value: ir.Value) -> None:
    """Point the linear at a [K, N] weight: Gemm/FusedMatMul lose transB and alpha (folded in). A Transpose
    that fed the old weight and has no other reader goes too: sessions on large models do not fold constants
    (``sq_onnx.runtime.ort_session.LEAN_LIMIT``), and ORT would transpose a tied lm_head's whole embedding
    on every run for nothing (1 GB at Llama-3.2-1B, 2 GB more resident at the smoothing check)."""
    node = linear.node
    old = node.inputs[1]
    node.replace_input_with(1, value)
    producer = old.producer() if old is not None else None
    if (
        producer is not None
        and producer.op_type == "Transpose"
        and not old.uses()
        and not old.is_graph_output()
        and producer.graph is not None
    ):
        producer.graph.remove(producer, safe=True)
    if node.op_type in ("Gemm", "FusedMatMul"):
        node.attributes["transB"] = ir.AttrInt64("transB", 0)
        node.attributes["alpha"] = ir.AttrFloat32("alpha", 1.0)


def set_weight_lazy(
    graph: ir.Graph, linear: Linear, make_kn: Callable[[], np.ndarray], dtype: ir.DataType, suffix: str
) -> None:
    """Like ``set_weight``, but the new [K, N] weight is computed by ``make_kn`` each time it is read
    (quantization, saving, a session): a large model never holds all its rewritten weights at once."""
    k, n = linear.shape

    def make() -> ir.Tensor:
        return ir.tensor(np.ascontiguousarray(make_kn()))

    name = unique_name(graph, f"{linear.weight_name or linear.node.name}.{suffix}")
    tensor = ir.LazyTensor(make, dtype=dtype, shape=ir.Shape([k, n]), name=name)
    value = ir.Value(name=name, shape=ir.Shape([k, n]), type=ir.TensorType(dtype), const_value=tensor)
    graph.register_initializer(value)
    _use_weight(linear, value)


def replace_node(graph: ir.Graph, old: ir.Node, new_nodes: list[ir.Node], new_output: ir.Value) -> None:
    """Put ``new_nodes`` where ``old`` was; ``new_output`` takes over old's single output (name, users)."""
    ir.convenience.replace_nodes_and_values(graph, old, [old], new_nodes, [old.outputs[0]], [new_output])


def require_in_graph(model: ir.Model, linears: list[Linear]) -> None:
    """A pass's precondition: every linear is a node of this model's graph (not of a copy)."""
    nodes = {id(n) for n in model.graph}
    foreign = [linear.name for linear in linears if id(linear.node) not in nodes]
    if foreign:
        raise ir.passes.PreconditionError(f"linears not in this graph: {', '.join(foreign[:3])}")


def ensure_opset(model: ir.Model, domain: str, version: int) -> None:
    """Declare ``domain`` in the model's opset imports if it is not there yet."""
    if domain not in model.opset_imports:
        model.opset_imports[domain] = version


def corresponding_nodes(original: ir.Graph, copy: ir.Graph) -> dict[ir.Node, ir.Node]:
    """Each node of ``original`` -> its counterpart in ``copy`` (``ir.Graph.clone`` keeps the order), so
    what was found on one graph can be used on the other without finding it again."""
    pairs = dict(zip(original, copy, strict=True))
    if any(a.op_type != b.op_type or a.name != b.name for a, b in pairs.items()):
        raise ValueError("the graphs are not copies of each other")
    return pairs
