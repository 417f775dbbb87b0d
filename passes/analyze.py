"""Find smoothing groups: a producer whose output channels can absorb 1/s, and the linears it feeds.

Precondition: none (read-only). A group is foldable only when *every* consumer of the producer's
output is a linear layer reading it as X; otherwise it is reported as skipped, never half-applied.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.graph_edit import MS
from sq_onnx.passes.infer_shapes import known_dims
from sq_onnx.passes.linear_producers import Fold, linear_producer
from sq_onnx.passes.linears import Linear, find_linears, is_channel_vector, is_constant


@dataclass
class SmoothGroup:
    """One shared smoothing scale: ``tensor`` is divided by s, every consumer's weight rows multiplied by s.

    ``fold_into`` lists (node, input index) of the per-channel constants (γ, β, a bias) that absorb 1/s;
    ``fold_columns`` the linears whose output columns absorb it (a linear producer, as AWQ folds
    up_proj -> down_proj through the gated product, or fc1 -> fc2 through a ReLU).
    """

    kind: str
    producer: ir.Node
    tensor: ir.Value
    fold_into: list[tuple[ir.Node, int]]
    consumers: list[Linear]
    fold_columns: list[Linear] = field(default_factory=list)
    column_map: np.ndarray | None = None  # tensor channel -> producer column, where several share one

    @property
    def through_linear(self) -> bool:
        """The scale folds into a linear producer's columns, not a norm's constants."""
        return bool(self.fold_columns)

    @property
    def channels(self) -> int:
        return self.consumers[0].shape[0]

    @property
    def name(self) -> str:
        return self.tensor.name or ""


@dataclass
class Skip:
    """A tensor feeding linear layers that cannot be smoothed by folding, with the reason."""

    tensor: str
    consumers: list[str]
    reason: str


@dataclass
class Analysis:
    linears: list[Linear]
    groups: list[SmoothGroup] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)

    def carried_over(self, nodes: dict[ir.Node, ir.Node]) -> Analysis:
        """The same analysis on a copy of the graph (``graph_edit.corresponding_nodes``): found once,
        used on every copy."""
        return Analysis(
            [Linear(nodes[lin.node]) for lin in self.linears],
            [
                SmoothGroup(
                    g.kind,
                    nodes[g.producer],
                    nodes[g.producer].outputs[g.tensor.index()],
                    [(nodes[node], index) for node, index in g.fold_into],
                    [Linear(nodes[c.node]) for c in g.consumers],
                    [Linear(nodes[p.node]) for p in g.fold_columns],
                    g.column_map,
                )
                for g in self.groups
            ],
            list(self.skipped),
        )


def _axis_is_last(node: ir.Node, default: int = -1) -> bool:
    attr = node.attributes.get("axis")
    axis = default if attr is None else int(attr.value)
    if axis == -1:
        return True
    rank = None if node.inputs[0] is None or node.inputs[0].shape is None else len(node.inputs[0].shape)
    return rank is not None and axis == rank - 1


def _mul_gamma_index(node: ir.Node, channels: int) -> int | None:
    """Index of the constant per-channel input of a Mul whose other input is not constant."""
    if node.op_type != "Mul" or node.domain != "" or len(node.inputs) != 2:
        return None
    for i in (0, 1):
        if is_channel_vector(node.inputs[i], channels) and not is_constant(node.inputs[1 - i]):
            return i
    return None


def _looks_like_rms(node: ir.Node, gamma_index: int) -> bool:
    other = node.inputs[1 - gamma_index]
    producer = other.producer() if other is not None else None
    if producer is None or producer.op_type != "Mul":
        return False
    ops = {p.op_type for p in producer.predecessors()}
    return bool(ops & {"Reciprocal", "Div", "Sqrt"})


def classify_producer(value: ir.Value, channels: int, through_linears: bool = False) -> Fold | str:
    """(kind, constant fold targets, linear fold targets) when ``value``'s producer can absorb a
    per-channel 1/s, else the reason. ``through_linears``: also fold into a linear producer's columns."""
    flat = _flattened_from(value, channels)
    if flat is not None:  # Conv1D / addmm exports flatten [B, S, C] to [B*S, C] first: look through it
        found = classify_producer(flat, channels, through_linears)
        return found if isinstance(found, str) else (f"{found[0]}, flattened", *found[1:])
    found = classify_norm(value, channels)
    if isinstance(found, str) and through_linears and value.producer() is not None:
        linear = linear_producer(value.producer(), channels)  # type: ignore[arg-type]
        if linear is not None:
            return linear
    return found if isinstance(found, str) else (*found, [], None)


def _flattened_from(value: ir.Value, channels: int) -> ir.Value | None:
    """The input of a Reshape that keeps the channel axis last ([B, S, C] -> [B*S, C]) when nothing else
    reads that input's numbers, so a scale on its channels is a scale on ``value``'s."""
    node = value.producer()
    if node is None or node.op_type != "Reshape" or node.domain != "" or node.inputs[0] is None:
        return None
    source = node.inputs[0]
    dims_in, dims_out = known_dims(source), known_dims(value)
    if dims_in is None or dims_out is None or len(dims_in) == 0 or len(dims_out) == 0:
        return None
    if dims_in[-1] != channels or dims_out[-1] != channels or source.is_graph_output():
        return None
    if any(user is not node and user.op_type != "Shape" for user, _ in source.uses()):
        return None
    return source


def classify_norm(value: ir.Value, channels: int) -> tuple[str, list[tuple[ir.Node, int]]] | str:
    """(kind, fold targets) when ``value``'s producer has per-channel constants that absorb 1/s, else why."""
    node = value.producer()
    if node is None:
        return "it is a graph input" if value.is_graph_input() else "it has no producer node"
    op, dom, idx = node.op_type, node.domain, value.index()
    ins = list(node.inputs) + [None] * 5

    def vec(i: int) -> bool:
        return is_channel_vector(ins[i], channels)

    if dom == "" and op == "LayerNormalization" and idx == 0 and vec(1) and _axis_is_last(node):
        targets = [(node, 1)] + ([(node, 2)] if ins[2] is not None and vec(2) else [])
        if ins[2] is not None and not vec(2):
            return "LayerNormalization bias is not a constant per-channel vector"
        return "LayerNormalization", targets
    if op in ("SimplifiedLayerNormalization", "RMSNormalization") and dom in ("", MS) and idx == 0:
        if vec(1) and _axis_is_last(node):
            return op, [(node, 1)]
        return f"{op} scale is not a constant per-channel vector over the last axis"
    if dom == MS and op == "SkipSimplifiedLayerNormalization":
        if idx != 0:
            return "it is the residual-sum output of SkipSimplifiedLayerNormalization (must stay unscaled)"
        return (op, [(node, 2)]) if vec(2) else f"{op} gamma is not a constant per-channel vector"
    if dom == MS and op == "SkipLayerNormalization":
        if idx != 0:
            return "it is the residual-sum/statistics output of SkipLayerNormalization (must stay unscaled)"
        if not vec(2) or (ins[3] is not None and not vec(3)):
            return f"{op} gamma/beta are not constant per-channel vectors"
        return op, [(node, 2)] + ([(node, 3)] if ins[3] is not None else [])
    gamma = _mul_gamma_index(node, channels)
    if gamma is not None:
        kind = "RMSNorm (decomposed)" if _looks_like_rms(node, gamma) else "Mul by per-channel constant"
        return kind, [(node, gamma)]
    if dom == "" and op == "Add" and len(node.inputs) == 2:
        for i in (0, 1):
            other = node.inputs[1 - i]
            inner = other.producer() if other is not None else None
            if vec(i) and inner is not None and len(other.uses()) == 1 and not other.is_graph_output():
                g = _mul_gamma_index(inner, channels)
                if g is not None:
                    return "LayerNorm (decomposed)", [(inner, g), (node, i)]
    return f"its producer {op or '?'} ({node.name}) cannot absorb a per-channel scale"


def reads_shape_only(node: ir.Node) -> bool:
    """Shape and Size read a tensor's dimensions, never its values: scaling the tensor leaves them alone
    (torch.onnx's TorchScript exporter, and so optimum's, reads the normed hidden states' shape in attention)."""
    return node.domain == "" and node.op_type in ("Shape", "Size")


def analyze(graph: ir.Graph, linears: list[Linear] | None = None, through_linears: bool = False) -> Analysis:
    """Group linears by their input tensor and decide, per tensor, whether smoothing can fold
    (``through_linears``: also into a linear producer's output columns)."""
    linears = find_linears(graph) if linears is None else linears
    result = Analysis(linears=linears)
    by_input: dict[int, list[Linear]] = {}
    order: list[ir.Value] = []
    for lin in linears:
        key = id(lin.input)
        if key not in by_input:
            by_input[key] = []
            order.append(lin.input)
        by_input[key].append(lin)
    linear_nodes = {id(lin.node): lin for lin in linears}
    for value in order:
        consumers = by_input[id(value)]
        names = [c.name for c in consumers]
        channels = consumers[0].shape[0]
        if any(c.shape[0] != channels for c in consumers):
            result.skipped.append(Skip(value.name or "", names, "consumers disagree on the input width"))
            continue
        foreign = [
            u.node
            for u in value.uses()
            if (id(u.node) not in linear_nodes or u.idx != 0) and not reads_shape_only(u.node)
        ]
        if foreign:
            other = foreign[0]
            reason = f"the tensor also feeds {other.op_type} ({other.name}), which cannot absorb the scale"
            result.skipped.append(Skip(value.name or "", names, reason))
            continue
        if value.is_graph_output():
            result.skipped.append(Skip(value.name or "", names, "the tensor is also a graph output"))
            continue
        found = classify_producer(value, channels, through_linears)
        if isinstance(found, str):
            result.skipped.append(Skip(value.name or "", names, found))
            continue
        kind, targets, columns, column_map = found
        producer = value.producer()
        assert producer is not None
        result.groups.append(SmoothGroup(kind, producer, value, targets, consumers, columns, column_map))
    return result
