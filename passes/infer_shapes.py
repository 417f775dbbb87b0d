"""Shapes for graphs whose exporter wrote none between the nodes (torch.onnx's TorchScript exporter, the genai
model builder): the analysis decides what a per-channel scale may pass through from value shapes, e.g. that
GPT-2's Conv1D flatten ``x.view(-1, x.size(-1))`` keeps the channel axis last, whose Reshape target is computed
at run time from ``Shape(x)``. ONNX's shape inference with data propagation follows such computed targets."""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass

from sq_onnx.passes.linears import find_linears

# value.meta key: the value's dims by ONNX Runtime's symbolic shape inference, ints and symbol names (in memory
# only, never saved: the model's own shapes stay what ONNX's inference made of them).
SYMBOLIC_SHAPE = "sq_onnx.symbolic_shape"


def fill_missing_shapes(model: ir.Model) -> bool:
    """Infer the graph's value shapes in place when some linear's input has none; returns whether it ran. A graph
    with shapes everywhere it matters (sq-onnx's own exports) is left as it is. Ops ONNX does not know (ORT's
    contrib ops) leave their outputs unknown; inference that fails leaves the model unchanged."""
    if all(linear.input.shape is not None for linear in find_linears(model.graph)):
        return False
    ShapeInferencePass(check_type=False, strict_mode=False, data_prop=True)(model)
    note_symbolic_shapes(model)
    return True


def note_symbolic_shapes(model: ir.Model) -> int:
    """Record in ``value.meta[SYMBOLIC_SHAPE]`` the dims ONNX Runtime's symbolic shape inference (sympy) gives a
    value whose shape ONNX's own inference left partly unknown; returns how many. TorchScript attention computes
    its head split and repeat_kv's Expand from ``Shape`` through ``Where`` at run time, which ONNX's data
    propagation drops and ORT's tool follows: the heads then read as numbers (the value-to-output fold's head
    mapping needs them) and a Reshape to the shape it had as such. Without onnxruntime, or where the tool
    fails, nothing is noted."""
    try:
        from onnx_ir.passes.common._c_api_utils import call_onnx_api  # the model without its large tensors
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference
    except ImportError:
        return 0

    def infer(proto):
        return SymbolicShapeInference.infer_shapes(proto, auto_merge=False, guess_output_rank=False)

    try:
        inferred = call_onnx_api(infer, model)
    except Exception:  # noqa: BLE001  # the tool asserts on graphs it cannot follow: keep what ONNX found
        return 0
    found = {}
    for info in [*inferred.graph.value_info, *inferred.graph.output]:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            found[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in dims
            )
    noted = 0
    for node in model.graph:
        for value in node.outputs:
            dims = found.get(value.name)
            if dims is None or None in dims or (value.shape is not None and len(value.shape) != len(dims)):
                continue
            if value.shape is None or not all(isinstance(d, int) for d in value.shape):
                value.meta[SYMBOLIC_SHAPE] = dims
                noted += 1
    return noted


def known_dims(value: ir.Value | None) -> tuple[int | None, ...] | None:
    """The value's static dims (None where symbolic), from its shape or, where ONNX's inference lost them,
    ONNX Runtime's symbolic inference (``note_symbolic_shapes``: TorchScript attention)."""
    if value is None:
        return None
    symbolic = value.meta.get(SYMBOLIC_SHAPE)
    if value.shape is None:
        return None if symbolic is None else tuple(d if isinstance(d, int) else None for d in symbolic)
    if symbolic is None or len(symbolic) != len(value.shape):  # none noted, or the value was reshaped since
        symbolic = (None,) * len(value.shape)
    return tuple(
        d if isinstance(d, int) else (s if isinstance(s, int) else None)
        for d, s in zip(value.shape, symbolic, strict=True)
    )


def same_dims(a: ir.Value | None, b: ir.Value | None) -> bool:
    """Both values have the same shape at every size of the inputs: equal static dims, symbols equal by ONNX
    Runtime's symbolic inference (one run names each derived dim once)."""
    if a is None or b is None:
        return False
    dims = [v.meta.get(SYMBOLIC_SHAPE) for v in (a, b)]
    if None in dims:
        dims = [known_dims(v) for v in (a, b)]
        return dims[0] is not None and None not in dims[0] and dims[0] == dims[1]
    return dims[0] == dims[1]


# Ops of the integer arithmetic exporters write on shapes (torch.onnx's TorchScript exporter computes a fused
# projection's chunk bounds as (Shape(x)[-1] + 1) / 2 * i).
_ARITHMETIC = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b}


def shape_ints(value: ir.Value | None, depth: int = 0) -> list[int] | None:
    """The integers a small shape computation yields from the graph's static dims and constants alone, or None
    where it reads a symbolic dim or an op outside Shape / Gather / Unsqueeze / Squeeze / Concat / Cast / Add /
    Sub / Mul / Div. For bounds the exporter computed from a static width."""
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
        dims = known_dims(node.inputs[0])
        if dims is None:
            return None
        start, end = (node.attributes[k].value if k in node.attributes else None for k in ("start", "end"))
        return list(dims)[start:end]  # type: ignore[return-value]  # None entries: symbolic, caught by the reader
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
