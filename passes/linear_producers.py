"""Linear producers that absorb a smoothing scale in their output columns, as AWQ folds them: up_proj ->
down_proj through the gated product (SwiGLU / GeGLU), fc1 -> fc2 through a ReLU, v_proj -> o_proj through
attention. Dividing the producer's columns (and bias) by s divides the consumers' input by s exactly; the
producer's own quantization is per output column, so it does not notice.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.graph_edit import MS
from sq_onnx.passes.infer_shapes import known_dims, same_dims, shape_ints
from sq_onnx.passes.linears import (
    Linear,
    as_linear,
    constant_array,
    is_channel_vector,
    is_constant,
    is_float_dtype,
)

# Element-wise activations f with f(x / s) = f(x) / s for every s > 0: a scale passes through them.
POSITIVELY_HOMOGENEOUS = ("Relu",)

# (kind, constants that absorb 1/s, linears whose columns absorb it, consumer channel -> producer column
# where they differ: several query heads read one KV head's columns)
Fold = tuple[str, list[tuple[ir.Node, int]], list[Linear], np.ndarray | None]


def _read_once(value: ir.Value | None) -> bool:
    """A computed tensor that one node reads and the graph does not output: scaling it changes nothing else."""
    if value is None or value.producer() is None:
        return False
    return len(value.uses()) == 1 and not value.is_graph_output()


def _const_ints(value: ir.Value | None) -> list[int] | None:
    """An initializer's or a Constant node's integers (onnxruntime-genai's builder writes Split sizes as
    Constant nodes), or those a shape computation yields from static dims (TorchScript's chunk bounds)."""
    const = constant_array(value)
    return shape_ints(value) if const is None else [int(v) for v in const.reshape(-1)]


def _last_axis(axis: int, value: ir.Value, part: ir.Value | None = None) -> bool:
    """``axis`` is ``value``'s last, by its rank or, where its shape is unknown, by the rank of ``part`` (a
    Slice / Split output, which has the same rank)."""
    known = [v.shape for v in (value, part) if v is not None and v.shape is not None]
    return axis == -1 or (bool(known) and axis == len(known[0]) - 1)


def _column_range(node: ir.Node, index: int, width: int) -> tuple[int, int] | None:
    """The columns [lo, hi) of its input's last axis that output ``index`` of a Slice (constant, step 1) or
    Split holds, or None (another axis, steps, ranges not known at export)."""
    source = node.inputs[0]
    if node.domain != "" or source is None:
        return None
    if node.op_type == "Slice" and index == 0:
        starts, ends = _const_ints(node.inputs[1]), _const_ints(node.inputs[2])
        axes = _const_ints(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else [-1]
        steps = _const_ints(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else [1]
        if (
            None in (starts, ends, axes, steps)
            or len(starts) != 1
            or steps != [1]
            or not _last_axis(axes[0], source, node.outputs[0])
        ):
            return None
        lo, hi = (v + width if v < 0 else v for v in (starts[0], ends[0]))
        return max(0, min(lo, width)), max(0, min(hi, width))
    if node.op_type == "Split":
        axis = node.attributes["axis"].value if "axis" in node.attributes else 0
        if not _last_axis(int(axis), source, node.outputs[index]):
            return None
        sizes = _const_ints(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
        if sizes is None:
            parts = len(node.outputs)
            size = -(-width // parts)  # as ONNX splits evenly, the last part smaller
            sizes = [min(size, width - i * size) for i in range(parts)]
        if sum(sizes) != width:
            return None
        lo = sum(sizes[:index])
        return lo, lo + sizes[index]
    return None


def _width(value: ir.Value) -> int | None:
    """The last axis of ``value``: from its shape, or, where the exporter left it unknown (onnxruntime-genai's
    builder writes no intermediate shapes), from the linear that produces it (through a bias Add)."""
    if value.shape is not None and len(value.shape) and isinstance(value.shape[-1], int):
        return value.shape[-1]
    node = value.producer()
    if node is not None and node.op_type == "Add" and node.domain == "":
        node = next((i.producer() for i in node.inputs if i is not None and i.producer() is not None), None)
    linear = as_linear(node) if node is not None else None
    return None if linear is None else int(linear.shape[1])


def _column_slice(value: ir.Value, channels: int) -> tuple[ir.Value, int] | None:
    """``value`` = columns [lo, lo + channels) of a tensor (a fused projection's q/k/v or gate/up part), and
    every other reader of that tensor reads other columns only: dividing those columns by s divides ``value``
    and nothing else. The tensor and lo, else None."""
    node = value.producer()
    source = node.inputs[0] if node is not None and node.inputs else None
    width = None if source is None else _width(source)
    if width is None or source.is_graph_output():
        return None
    ours = _column_range(node, list(node.outputs).index(value), width)
    if ours is None or ours[1] - ours[0] != channels:
        return None
    for user, _ in source.uses():
        if user.op_type == "Shape":
            continue
        for i, out in enumerate(user.outputs):
            if user is node and out is value:
                continue
            other = _column_range(user, i, width) if user.inputs[0] is source else None
            read = bool(out.uses()) or out.is_graph_output()
            if other is None or (read and other[0] < ours[1] and ours[0] < other[1] and other[0] < other[1]):
                return None
    return source, ours[0]


def _unflattened(value: ir.Value) -> ir.Value | None:
    """The [B*S, C] linear output that a Reshape turns back into ``value`` [B, S, C] (GPT-2's Conv1D runs its
    addmm on flattened rows), when nothing else reads it: the same columns, so the same fold."""
    node = value.producer()
    if node is None or node.op_type != "Reshape" or node.domain != "" or node.inputs[0] is None:
        return None
    source = node.inputs[0]
    if source.shape is None or value.shape is None or len(source.shape) == 0 or len(value.shape) == 0:
        return None
    if source.shape[-1] != value.shape[-1] or not isinstance(value.shape[-1], int):
        return None
    if source.is_graph_output() or any(u is not node and u.op_type != "Shape" for u, _ in source.uses()):
        return None
    return source


def _linear_columns(
    value: ir.Value | None, channels: int
) -> tuple[list[tuple[ir.Node, int]], Linear, int] | None:
    """``value`` = a linear's output (+ a constant per-channel bias), or a column slice of one (a fused
    projection), read by one node only: dividing those of the linear's output columns (and bias) by s divides
    ``value`` by s exactly. The bias targets, the linear and the first column, else None."""
    if not _read_once(value):
        return None
    offset = 0
    sliced = _column_slice(value, channels) if value.producer().op_type in ("Slice", "Split") else None
    if sliced is not None:
        value, offset = sliced
        value = _unflattened(value) or value
        if value.producer() is None:
            return None
    node = value.producer()
    width = channels if sliced is None else _width(value)  # the linear's columns
    if width is None:
        return None
    targets: list[tuple[ir.Node, int]] = []
    if node.op_type == "Add" and node.domain == "" and len(node.inputs) == 2:
        for i in (0, 1):
            inner = node.inputs[1 - i]
            if is_channel_vector(node.inputs[i], width) and _read_once(inner):
                targets, node = [(node, i)], inner.producer()
                break
        else:
            return None
    linear = as_linear(node)
    dtype = None if linear is None else linear.source.dtype
    if linear is None or linear.shape[1] != width or dtype is None or not is_float_dtype(dtype.numpy()):
        return None
    if linear.bias is not None:
        if not is_channel_vector(linear.bias, width):
            return None
        targets.append((node, 2))
    return targets, linear, offset


def _shifted(found: tuple[list[tuple[ir.Node, int]], Linear, int], channels: int) -> np.ndarray | None:
    """The producer columns of a fold's channels: None where they are the linear's own, in order."""
    _, linear, offset = found
    return None if linear.shape[1] == channels else offset + np.arange(channels)


def linear_producer(node: ir.Node, channels: int) -> Fold | None:
    """A gated product (SwiGLU / GeGLU: act(gate) * up), a positively homogeneous activation of a linear, or
    attention's values (as torch.onnx writes it, or ORT's GroupQueryAttention)."""
    if node.domain == MS and node.op_type == "GroupQueryAttention":
        return grouped_query_values(node, channels)
    if node.domain != "":
        return None
    if node.op_type == "Mul" and len(node.inputs) == 2 and not any(is_constant(v) for v in node.inputs):
        for i in (1, 0):  # the exporters write act(gate) * up: try the second factor first
            found = _linear_columns(node.inputs[i], channels)
            if found is not None:
                return f"gated product ({found[1].name})", found[0], [found[1]], _shifted(found, channels)
    if node.op_type in POSITIVELY_HOMOGENEOUS and len(node.inputs) == 1:
        found = _linear_columns(node.inputs[0], channels)
        if found is not None:
            return (
                f"{node.op_type} of a linear ({found[1].name})",
                found[0],
                [found[1]],
                _shifted(found, channels),
            )
    return attention_values(node, channels)


def _op(value: ir.Value | None, op: str, reader: ir.Node, kv_output: bool = False) -> ir.Node | None:
    """``value``'s producer when it is ``op`` (default domain) and nothing but ``reader`` reads ``value``'s
    numbers (Shape nodes read only its shape). ``kv_output``: the value is the KV cache, which the graph may
    output, also through a Slice along the sequence (a sliding-window cache keeps its last positions)."""
    if value is None or (value.is_graph_output() and not kv_output):
        return None
    node = value.producer()
    if node is None or node.domain != "" or (node.op_type != op and not _keeps_shape(node)):
        return None
    for user, _ in value.uses():
        truncates = kv_output and user.op_type == "Slice" and all(o.is_graph_output() for o in user.outputs)
        if user is not reader and user.op_type != "Shape" and not truncates:
            return None
    if node.op_type != op:  # a Reshape to the shape it had (TorchScript writes one after P @ V)
        return _op(node.inputs[0], op, node)
    return node


def _keeps_shape(node: ir.Node) -> bool:
    """A Reshape whose output has its input's shape: it moves no element."""
    return node.op_type == "Reshape" and same_dims(node.inputs[0], node.outputs[0])


def _is_past(value: ir.Value | None) -> bool:
    """A graph input (the past KV cache), possibly sliced along the sequence first."""
    while value is not None and value.producer() is not None and value.producer().op_type == "Slice":
        value = value.producer().inputs[0]
    return value is not None and value.is_graph_input()


def _swaps_heads_and_sequence(node: ir.Node | None) -> bool:
    perm = None if node is None else node.attributes.get("perm")
    return perm is not None and list(perm.value) == [0, 2, 1, 3]


def _unsqueezes_axis_2(node: ir.Node | None) -> bool:
    if node is None:
        return False
    attr = node.attributes.get("axes")
    axes = list(attr.value) if attr is not None else None
    if axes is None and len(node.inputs) > 1:
        axes = _const_ints(node.inputs[1])
    return axes == [2]


def attention_values(node: ir.Node, channels: int) -> Fold | None:
    """o_proj's input as torch.onnx writes attention: Reshape([B,S,H,D] -> [B,S,H*D]) <- Transpose <- P @ V,
    V = repeat_kv(Concat(past, Transpose(Reshape(v_proj(x))))). Each query head h reads KV head h // rep,
    so o_proj channel h*D + d is v_proj column (h // rep)*D + d, and one scale per v_proj column keeps the
    fold exact under grouped-query attention. The KV cache then holds V / s (the model's own, so exact)."""
    if node.op_type != "Reshape" or node.domain != "":
        return None
    dims = known_dims(node.inputs[0])
    if dims is None or len(dims) != 4 or None in dims[2:] or dims[2] * dims[3] != channels:  # type: ignore[operator]
        return None
    heads, head_dim = int(dims[2]), int(dims[3])  # type: ignore[arg-type]
    swap = _op(node.inputs[0], "Transpose", node)
    product = _op(swap.inputs[0], "MatMul", swap) if _swaps_heads_and_sequence(swap) else None
    if product is None or is_constant(product.inputs[0]):
        return None
    values, reader, kv_heads = product.inputs[1], product, heads
    merge = _op(values, "Reshape", reader)  # repeat_kv: [B,kvH,T,D] -> [B,kvH,1,T,D] -> expand -> [B,H,T,D]
    if merge is not None:
        rep_dims = known_dims(merge.inputs[0])
        expand = _op(merge.inputs[0], "Expand", merge)
        unsqueeze = _op(expand.inputs[0], "Unsqueeze", expand) if expand is not None else None
        if rep_dims is None or len(rep_dims) != 5 or rep_dims[1] is None or not _unsqueezes_axis_2(unsqueeze):
            return None
        kv_heads = int(rep_dims[1])
        values, reader = unsqueeze.inputs[0], unsqueeze  # type: ignore[union-attr]
    cache = _op(values, "Concat", reader, kv_output=True)
    if cache is not None:  # the past values come in from the model's own present values
        fresh = [v for v in cache.inputs if v is not None and not _is_past(v)]
        if len(fresh) != 1 or len(cache.inputs) != 2:
            return None
        values, reader = fresh[0], cache
    h, d = np.divmod(np.arange(channels), head_dim)
    if heads % kv_heads == 0 and _sliced_for(values, reader):
        per_head = _per_head_values(values, kv_heads, head_dim)
        if per_head is None:
            return None
        found, width, lo = per_head
        columns = (h // (heads // kv_heads)) * width + lo + d + found[2]
        return (
            f"attention values ({found[1].name}; per-head q, k, v; the KV cache holds V/s)",
            found[0],
            [found[1]],
            columns,
        )
    swap = _op(values, "Transpose", reader)
    split = _op(swap.inputs[0], "Reshape", swap) if _swaps_heads_and_sequence(swap) else None
    if split is None or heads % kv_heads or known_dims(split.outputs[0]) is None:
        return None
    if known_dims(split.outputs[0])[2:] != (kv_heads, head_dim):  # type: ignore[index]
        return None
    found = _linear_columns(split.inputs[0], kv_heads * head_dim)
    if found is None:
        return None
    columns = (h // (heads // kv_heads)) * head_dim + d + found[2]
    return f"attention values ({found[1].name}; the KV cache holds V/s)", found[0], [found[1]], columns


def _sliced_for(value: ir.Value | None, reader: ir.Node) -> bool:
    """``value`` is a Slice's or Split's output that only ``reader`` reads (Shape nodes aside)."""
    node = None if value is None else value.producer()
    if node is None or node.domain != "" or node.op_type not in ("Slice", "Split") or value.is_graph_output():
        return False
    return all(user is reader or user.op_type == "Shape" for user, _ in value.uses())


def _per_head_values(
    values: ir.Value, kv_heads: int, head_dim: int
) -> tuple[tuple[list[tuple[ir.Node, int]], Linear, int], int, int] | None:
    """V as GPT-NeoX writes it: the fused projection's output reshaped to [B, S, kvH, W] (each head's q, k
    and v side by side), transposed to [B, kvH, S, W] and split on the last axis, V being columns [lo, lo + D)
    of it. So V's channel (g, d) is the linear's column g*W + lo + d, and the q and k parts read other columns
    only (``_column_slice``). The linear (``_linear_columns``'s), W and lo, else None."""
    sliced = _column_slice(values, head_dim)
    if sliced is None:
        return None
    heads_first, lo = sliced
    swap = heads_first.producer()
    if (
        swap is None
        or swap.op_type != "Transpose"
        or swap.domain != ""
        or not _swaps_heads_and_sequence(swap)
    ):
        return None
    split = _op(swap.inputs[0], "Reshape", swap)
    dims = None if split is None else known_dims(split.outputs[0])
    if dims is None or len(dims) != 4 or dims[2] != kv_heads or not isinstance(dims[3], int):
        return None
    found = _linear_columns(split.inputs[0], kv_heads * dims[3])
    return None if found is None else (found, dims[3], lo)


# GroupQueryAttention's attributes (onnxruntime 1.32) under which its output is linear in V, one query head
# reading one KV head's channels: anything else (a quantized KV cache, attributes of a later version) keeps V.
GQA_ATTRIBUTES = {
    "causal", "do_rotary", "k_norm_epsilon", "k_quant_type", "kv_num_heads", "local_window_size", "num_heads",
    "q_norm_epsilon", "qk_norm_epsilon", "qk_output", "rotary_interleaved", "scale", "sliding_window_cache",
    "smooth_softmax", "softcap",
}  # fmt: skip
GQA_V_SCALE = 14  # input index of a quantized value cache's scale


def _optional_input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if len(node.inputs) > index else None


def grouped_query_values(node: ir.Node, channels: int) -> Fold | None:
    """o_proj's input as onnxruntime-genai's builder writes attention: ``com.microsoft::GroupQueryAttention``
    on separate q, k, v or on the packed qkv_proj (q, k and v columns in that order). The output is linear in V
    (rotary embedding and any Q/K norm touch Q and K only), query head h reading KV head h // rep, so o_proj
    channel h*D + d is V's column (h // rep)*D + d; the KV cache then holds V / s (the model's own, so exact).
    A quantized value cache would round V / s differently: refused."""
    attrs = node.attributes
    if set(attrs) - GQA_ATTRIBUTES or _optional_input(node, GQA_V_SCALE) is not None:
        return None
    heads, kv_heads = attrs.get_int("num_heads", 0), attrs.get_int("kv_num_heads", 0)
    if heads <= 0 or kv_heads <= 0 or heads % kv_heads or channels % heads:
        return None
    head_dim = channels // heads
    value = _optional_input(node, 2)
    if value is not None:
        found = _linear_columns(value, kv_heads * head_dim)
        start = 0 if found is None else found[2]
    else:  # packed: the query input carries q, k and v; V's columns come after q's and k's
        found = _linear_columns(node.inputs[0], (heads + 2 * kv_heads) * head_dim)
        start = (heads + kv_heads) * head_dim
    if found is None:
        return None
    h, d = np.divmod(np.arange(channels), head_dim)
    columns = (h // (heads // kv_heads)) * head_dim + d + start
    return (
        f"attention values ({found[1].name}; GroupQueryAttention, the KV cache holds V/s)",
        found[0],
        [found[1]],
        columns,
    )
