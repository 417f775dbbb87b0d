"""Per-channel abs-max of chosen tensors, computed inside ONNX Runtime and max-reduced over samples.

A copy of the graph gets ``ReduceMax(Abs(x))`` outputs (over every axis but the last), so the only
arrays that leave ORT are [C] vectors: memory does not grow with the calibration set.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir

from sq_onnx.errors import CalibrationError
from sq_onnx.runtime.model_io import copy_model
from sq_onnx.runtime.ort_session import in_memory_session
from sq_onnx.runtime.progress import track

STAT_PREFIX = "sq_onnx.absmax."


def _reduce_rows(op: str, x: ir.Value, axes: ir.Value, opset: int) -> ir.Node:
    if opset >= 18:
        return ir.Node("", op, [x, axes], attributes=[ir.AttrInt64("keepdims", 0)])
    return ir.Node("", op, [x], attributes=[ir.AttrInt64s("axes", [0]), ir.AttrInt64("keepdims", 0)])


def _float_output(graph: ir.Graph, node: ir.Node, name: str, channels: int) -> tuple[ir.Node, ir.Value]:
    cast = ir.Node("", "Cast", [node.outputs[0]], attributes=[ir.AttrInt64("to", int(ir.DataType.FLOAT))])
    out = cast.outputs[0]
    out.name = name
    out.type = ir.TensorType(ir.DataType.FLOAT)
    out.shape = ir.Shape([channels])
    graph.outputs.append(out)
    return cast, out


def add_absmax_outputs(model: ir.Model, tensors: dict[str, int]) -> dict[str, tuple[str, str]]:
    """Add per-channel ``max |x|`` and ``mean x²`` outputs (over every axis but the last) for each tensor;
    returns tensor -> (abs-max output name, mean-square output name)."""
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs if v.name in tensors}
    for v in graph.inputs:
        if v.name in tensors:
            values[v.name] = v
    opset = model.opset_imports.get("", 18)
    axes = ir.Value(name=f"{STAT_PREFIX}axes", const_value=ir.tensor(np.array([0], np.int64)))
    graph.register_initializer(axes)
    out_names = {}
    for i, (name, channels) in enumerate(sorted(tensors.items())):
        shape = ir.Value(
            name=f"{STAT_PREFIX}shape{i}", const_value=ir.tensor(np.array([-1, channels], np.int64))
        )
        graph.register_initializer(shape)
        abs_node = ir.Node("", "Abs", [values[name]])
        flat = ir.Node("", "Reshape", [abs_node.outputs[0], shape])
        red = _reduce_rows("ReduceMax", flat.outputs[0], axes, opset)
        square = ir.Node("", "Mul", [flat.outputs[0], flat.outputs[0]])
        mean = _reduce_rows("ReduceMean", square.outputs[0], axes, opset)
        cast_max, out_max = _float_output(graph, red, f"{STAT_PREFIX}{i}", channels)
        cast_ms, out_ms = _float_output(graph, mean, f"{STAT_PREFIX}ms{i}", channels)
        graph.extend([abs_node, flat, red, cast_max, square, mean, cast_ms])
        out_names[name] = (out_max.name, out_ms.name)
    return out_names


def collect_absmax(
    model: ir.Model, tensors: dict[str, int], feeds: list[dict[str, np.ndarray]], show_progress: bool = True
) -> dict[str, np.ndarray]:
    """Per-channel abs-max of each tensor (name -> channels) over all feeds. ``model`` is not modified."""
    return calibrate(model, tensors, feeds, show_progress=show_progress).absmax


@dataclass
class Calibration:
    """absmax: tensor -> [C] abs-max over the calibration feeds; reference: the model's first output on
    the reference feeds; rows: tensor -> [R, C] bounded random sample of activation rows (α search)."""

    absmax: dict[str, np.ndarray]
    mean_square: dict[str, np.ndarray] = field(default_factory=dict)
    reference: list[Any] = field(default_factory=list)  # float32 arrays, or what ``on_reference`` kept
    rows: dict[str, np.ndarray] = field(default_factory=dict)


def calibrate(
    model: ir.Model,
    tensors: dict[str, int],
    feeds: list[dict[str, np.ndarray]],
    reference_feeds: list[dict[str, np.ndarray]] = (),  # type: ignore[assignment]
    row_tensors: tuple[str, ...] = (),
    max_rows: int = 512,
    seed: int = 0,
    show_progress: bool = True,
    on_reference: Callable[[int, np.ndarray], None] | None = None,
) -> Calibration:
    """Statistics over ``feeds``, reference outputs on ``reference_feeds`` and optional row samples,
    all from one ORT session (one copy of the weights in ORT). Memory is bounded by ``max_rows`` per
    tensor, not by the number of feeds. ``on_reference``: given each reference output (feed index, float32
    output) as it comes, instead of keeping them all in ``Calibration.reference``."""
    work = copy_model(model)
    out_names = add_absmax_outputs(work, tensors)
    order = list(out_names.items())
    row_values = {v.name: v for node in work.graph for v in node.outputs if v.name in set(row_tensors)}
    for name in row_tensors:
        if not row_values[name].is_graph_output():
            work.graph.outputs.append(row_values[name])
    rng = np.random.default_rng(seed)
    per_feed = -(-max_rows // max(1, len(feeds)))
    stats: dict[str, np.ndarray] = {}
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, list[np.ndarray]] = {name: [] for name in row_tensors}
    reference: list[np.ndarray] = []
    with in_memory_session(work) as sess:
        fetch = [o for _, pair in order for o in pair] + list(row_tensors)
        n_stats = 2 * len(order)
        first = sess.get_outputs()[0].name
        for feed in track(feeds, "calibrating", total=len(feeds), enabled=show_progress and bool(fetch)):
            if not fetch:
                break
            results = sess.run(fetch, feed)
            for j, (tensor, _) in enumerate(order):
                amax, ms = results[2 * j], results[2 * j + 1]
                stats[tensor] = amax if tensor not in stats else np.maximum(stats[tensor], amax)
                sums[tensor] = ms.astype(np.float64) if tensor not in sums else sums[tensor] + ms
            for name, arr in zip(row_tensors, results[n_stats:], strict=True):
                flat = np.asarray(arr, dtype=np.float32).reshape(-1, arr.shape[-1])
                take = rng.choice(flat.shape[0], size=min(per_feed, flat.shape[0]), replace=False)
                rows[name].append(flat[np.sort(take)])
        references = track(
            reference_feeds,
            "float outputs to verify against",
            total=len(reference_feeds),
            enabled=show_progress,
        )
        for i, feed in enumerate(references):
            output = np.asarray(sess.run([first], feed)[0], dtype=np.float32)
            if on_reference is not None:
                on_reference(i, output)
            else:
                reference.append(output)
    for tensor, arr in stats.items():
        if not np.all(np.isfinite(arr)):
            raise CalibrationError(
                f"calibration produced NaN or Inf in tensor {tensor!r}: the model overflows on this data."
            )
    sampled = {name: np.concatenate(parts)[:max_rows] for name, parts in rows.items() if parts}
    mean_square = {t: (v / len(feeds)).astype(np.float32) for t, v in sums.items()}
    return Calibration(stats, mean_square, reference, sampled)
