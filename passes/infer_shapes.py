"""Shapes for graphs whose exporter wrote none between the nodes (torch.onnx's TorchScript exporter, the genai
model builder): the analysis decides what a per-channel scale may pass through from value shapes, e.g. that
GPT-2's Conv1D flatten ``x.view(-1, x.size(-1))`` keeps the channel axis last, whose Reshape target is computed
at run time from ``Shape(x)``. ONNX's shape inference with data propagation follows such computed targets."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from sq_onnx.passes.linears import find_linears

# value.meta key: the value's dims when the graph's inputs take the stand-in sizes below (in memory only).
CONCRETE_SHAPE = "sq_onnx.concrete_shape"
# Stand-ins for the inputs' symbolic dims (batch, sequence, past length): primes far from any head count or
# width, so no stand-in is mistaken for a model dimension. Each symbol keeps its size across inputs.
STAND_INS = (1009, 1013, 1019, 1021, 1031, 1033, 1039, 1049, 1051, 1061)


def fill_missing_shapes(model: ir.Model) -> bool:
    """Infer the graph's value shapes in place when some linear's input has none; returns whether it ran. A graph
    with shapes everywhere it matters (sq-onnx's own exports) is left as it is. Ops ONNX does not know (ORT's
    contrib ops) leave their outputs unknown; inference that fails leaves the model unchanged."""
    if all(linear.input.shape is not None for linear in find_linears(model.graph)):
        return False
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    note_concrete_shapes(model)
    return True


def note_concrete_shapes(model: ir.Model) -> int:
    """Record in ``value.meta[CONCRETE_SHAPE]`` the dims a value takes when the graph inputs' symbolic dims take
    stand-in sizes (None where still unknown), for values where that knows more than the symbolic shape;
    returns how many. TorchScript attention
    computes its head split and repeat_kv from ``Shape`` / ``Where`` / ``Expand`` at run time, which symbolic
    inference cannot follow, but with sizes it can: the heads then read as numbers (the value-to-output
    fold's head mapping needs them). The model's own shapes are left as they were."""
    graph = model.graph
    inputs = [v for v in graph.inputs if v.shape is not None]
    symbols = sorted({str(d) for v in inputs for d in v.shape if not isinstance(d, int)})
    if len(symbols) > len(STAND_INS):
        return 0
    size = dict(zip(symbols, STAND_INS, strict=False))
    values = ir.convenience.create_value_mapping(graph)
    saved = {name: (v.shape, v.type) for name, v in values.items()}
    for value in inputs:
        value.shape = ir.Shape([d if isinstance(d, int) else size[str(d)] for d in value.shape])
    try:
        ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
        concrete = {
            name: tuple(d if isinstance(d, int) else None for d in v.shape)
            for name, v in values.items()
            if v.shape is not None
        }
    finally:
        _restore(values, saved)
    noted = 0
    for name, dims in concrete.items():
        shape = values[name].shape
        if (
            shape is not None
            and len(shape) == len(dims)
            and any(isinstance(c, int) and not isinstance(d, int) for d, c in zip(shape, dims, strict=True))
        ):
            values[name].meta[CONCRETE_SHAPE] = dims
            noted += 1
    return noted


def _restore(values: dict[str, ir.Value], saved: dict[str, tuple]) -> None:
    for name, (shape, type_) in saved.items():
        values[name].shape, values[name].type = shape, type_


def known_dims(value: ir.Value | None) -> tuple[int | None, ...] | None:
    """The value's static dims (None where symbolic), filled from the sizes it takes at stand-in input sizes
    where symbolic inference lost them (``note_concrete_shapes``: TorchScript attention)."""
    if value is None or value.shape is None:
        return None
    concrete = value.meta.get(CONCRETE_SHAPE)
    if concrete is None or len(concrete) != len(value.shape):  # none noted, or the value was reshaped since
        concrete = (None,) * len(value.shape)
    return tuple(d if isinstance(d, int) else c for d, c in zip(value.shape, concrete, strict=True))


# Ops of the integer arithmetic exporters write on shapes (torch.onnx's TorchScript exporter computes a fused
# projection's chunk bounds as (Shape(x)[-1] + 1) / 2 * i).
_ARITHMETIC = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b}


def shape_ints(value: ir.Value | None, depth: int = 0) -> list[int] | None:
    """The integers a small shape computation yields from the graph's static dims and constants alone (no
    stand-in sizes), or None where it reads a symbolic dim or an op outside Shape / Gather / Unsqueeze /
    Squeeze / Concat / Cast / Add / Sub / Mul / Div. For bounds the exporter computed from a static width."""
    if value is None or depth > 16:
        return None
    if value.const_value is not None:
        return [int(v) for v in value.const_value.numpy().reshape(-1)]
    node = value.producer()
    if node is None or node.domain != "":
        return None
    op = node.op_type
    if op == "Constant" and "value" in node.attributes:
        return [int(v) for v in node.attributes["value"].value.numpy().reshape(-1)]
    if op == "Shape":
        source = node.inputs[0]
        if source is None or source.shape is None:
            return None
        dims = [d if isinstance(d, int) else None for d in source.shape]
        start, end = (node.attributes[k].value if k in node.attributes else None for k in ("start", "end"))
        return dims[start:end]  # type: ignore[return-value]  # None entries: symbolic, caught by the reader
    args = [shape_ints(v, depth + 1) for v in node.inputs]
    if any(a is None for a in args) or not args:
        return None
    if op == "Gather" and len(args) == 2 and (node.attributes.get_int("axis", 0) == 0):
        data, index = args
        picked = [data[i] if -len(data) <= i < len(data) else None for i in index]
        return None if None in picked else picked  # type: ignore[return-value]
    if None in (v for a in args for v in a):
        return None
    if op in ("Unsqueeze", "Squeeze", "Cast"):
        return args[0]
    if op == "Concat":
        return [v for a in args for v in a]
    if op in _ARITHMETIC or op == "Div":
        a, b = args
        if len(b) == 1:
            b = b * len(a)
        if len(a) == 1:
            a = a * len(b)
        if len(a) != len(b) or (op == "Div" and 0 in b):
            return None
        if op == "Div":  # ONNX integer Div truncates toward zero
            return [int(x / y) for x, y in zip(a, b, strict=True)]
        return [_ARITHMETIC[op](x, y) for x, y in zip(a, b, strict=True)]
    return None
