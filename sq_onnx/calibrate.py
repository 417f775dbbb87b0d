"""Per-channel abs-max of chosen tensors, computed inside ONNX Runtime and max-reduced over samples.

A copy of the graph gets ``ReduceMax(Abs(x))`` outputs (over every axis but the last), so the only
arrays that leave ORT are [C] vectors: memory does not grow with the calibration set.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_onnx.errors import CalibrationError
from sq_onnx.ort_session import in_memory_session
from sq_onnx.progress import track

STAT_PREFIX = "sq_onnx.absmax."


def add_absmax_outputs(model: ir.Model, tensors: dict[str, int]) -> dict[str, str]:
    """Add ``Cast(ReduceMax(Abs(Reshape(x, [-1, C]))), float)`` outputs; returns tensor -> output name."""
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs if v.name in tensors}
    for v in graph.inputs:
        if v.name in tensors:
            values[v.name] = v
    opset = model.opset_imports.get("", 18)
    out_names = {}
    for i, (name, channels) in enumerate(sorted(tensors.items())):
        x = values[name]
        shape = ir.Value(
            name=f"{STAT_PREFIX}shape{i}", const_value=ir.tensor(np.array([-1, channels], np.int64))
        )
        graph.register_initializer(shape)
        abs_node = ir.Node("", "Abs", [x])
        flat = ir.Node("", "Reshape", [abs_node.outputs[0], shape])
        if opset >= 18:
            axes = ir.Value(name=f"{STAT_PREFIX}axes{i}", const_value=ir.tensor(np.array([0], np.int64)))
            graph.register_initializer(axes)
            red = ir.Node("", "ReduceMax", [flat.outputs[0], axes], attributes=[ir.AttrInt64("keepdims", 0)])
        else:
            red = ir.Node(
                "",
                "ReduceMax",
                [flat.outputs[0]],
                attributes=[ir.AttrInt64s("axes", [0]), ir.AttrInt64("keepdims", 0)],
            )
        cast = ir.Node("", "Cast", [red.outputs[0]], attributes=[ir.AttrInt64("to", int(ir.DataType.FLOAT))])
        out = cast.outputs[0]
        out.name = f"{STAT_PREFIX}{i}"
        out.type = ir.TensorType(ir.DataType.FLOAT)
        out.shape = ir.Shape([channels])
        graph.extend([abs_node, flat, red, cast])
        graph.outputs.append(out)
        out_names[name] = out.name
    return out_names


def collect_absmax(
    model: ir.Model, tensors: dict[str, int], feeds: list[dict[str, np.ndarray]], show_progress: bool = True
) -> dict[str, np.ndarray]:
    """Per-channel abs-max of each tensor (name -> channels) over all feeds. ``model`` is not modified."""
    return calibrate_and_reference(model, tensors, feeds, [], show_progress)[0]


def calibrate_and_reference(
    model: ir.Model,
    tensors: dict[str, int],
    feeds: list[dict[str, np.ndarray]],
    reference_feeds: list[dict[str, np.ndarray]],
    show_progress: bool = True,
) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """Abs-max statistics over ``feeds`` and the model's first output on ``reference_feeds``, from one
    ORT session (one copy of the weights in ORT instead of two)."""
    work = copy_model(model)
    out_names = add_absmax_outputs(work, tensors)
    order = list(out_names.items())
    stats: dict[str, np.ndarray] = {}
    reference: list[np.ndarray] = []
    with in_memory_session(work) as sess:
        fetch = [o for _, o in order]
        first = sess.get_outputs()[0].name
        for feed in track(feeds, "calibrating", total=len(feeds), enabled=show_progress and bool(fetch)):
            if not fetch:
                break
            results = sess.run(fetch, feed)
            for (tensor, _), arr in zip(order, results, strict=True):
                stats[tensor] = arr if tensor not in stats else np.maximum(stats[tensor], arr)
        for feed in reference_feeds:
            reference.append(np.asarray(sess.run([first], feed)[0], dtype=np.float32))
    for tensor, arr in stats.items():
        if not np.all(np.isfinite(arr)):
            raise CalibrationError(
                f"calibration produced NaN or Inf in tensor {tensor!r}: the model overflows on this data."
            )
    return stats, reference


def copy_model(model: ir.Model) -> ir.Model:
    """A structural copy that shares (lazy) tensors with ``model``: no weights are read or duplicated."""
    return ir.Model(
        model.graph.clone(),
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        functions=list(model.functions.values()),
    )
