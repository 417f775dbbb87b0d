"""The part of a model after its lm_head's input: verification judges the lm_head's accuracy level on the final
hidden states the body already gave on each sample, instead of running the whole model once more for one node
(at Llama-3.2-1B's 16 layers the body is three quarters of a run)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import onnx_ir as ir


def head_input(model: ir.Model, head: list[ir.Node]) -> ir.Value | None:
    """The one lm_head node's input, when the model's first output is computed from it and constants alone;
    else None (the whole model runs)."""
    if len(head) != 1 or head[0].inputs[0] is None or not model.graph.outputs:
        return None
    hidden = head[0].inputs[0]
    try:
        ir.convenience.extract(model.graph, [hidden], [model.graph.outputs[0]])
    except ValueError:  # the output also needs a graph input or a value before the lm_head
        return None
    return hidden


def tail_model(model: ir.Model, hidden: ir.Value) -> ir.Model:
    """The model from ``hidden`` to the first output, with the graph's nodes as they are now (their accuracy
    levels included); initializers shared, not copied."""
    graph = ir.convenience.extract(model.graph, [hidden], [model.graph.outputs[0]])
    return ir.Model(graph, ir_version=model.ir_version, functions=list(model.functions.values()))


@contextmanager
def also_an_output(graph: ir.Graph, value: ir.Value | None) -> Iterator[None]:
    """``value`` as an extra graph output while inside (so a session can fetch it), then the outputs as before."""
    added = value is not None and not value.is_graph_output()
    if added:
        graph.outputs.append(value)  # type: ignore[arg-type]
    try:
        yield
    finally:
        if added:
            graph.outputs.remove(value)  # type: ignore[arg-type]
