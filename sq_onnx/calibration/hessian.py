"""Per-linear input Hessians H = XᵀX for GPTQ, computed inside ONNX Runtime and summed over samples.

A copy of the graph gets ``MatMul(Transpose(X2d), X2d)`` outputs, so only [C, C] matrices leave ORT:
memory grows with the square of the layer width, never with the calibration set. Tensors are taken in
chunks that fit a byte budget, one pass over the samples per chunk, so wide models stay bounded too.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_onnx.errors import CalibrationError
from sq_onnx.runtime.model_io import copy_model
from sq_onnx.runtime.ort_session import in_memory_session
from sq_onnx.runtime.progress import track

PREFIX = "sq_onnx.calibration.hessian."
# Accumulated float32 Hessians held at once (the chunk size); SmolLM2-135M needs ~0.4 GB in total.
BUDGET_BYTES = 1 << 30


def add_hessian_outputs(model: ir.Model, tensors: dict[str, int]) -> dict[str, str]:
    """Add a float32 [C, C] output XᵀX (X flattened to [rows, C]) per tensor; returns tensor -> output."""
    graph = model.graph
    values = {v.name: v for node in graph for v in node.outputs if v.name in tensors}
    values.update({v.name: v for v in graph.inputs if v.name in tensors})
    missing = sorted(set(tensors) - set(values))
    if missing:
        raise CalibrationError(f"tensor(s) not found for Hessians: {', '.join(missing)}.")
    names = {}
    for i, (name, channels) in enumerate(sorted(tensors.items())):
        shape = ir.Value(name=f"{PREFIX}shape{i}", const_value=ir.tensor(np.array([-1, channels], np.int64)))
        graph.register_initializer(shape)
        flat = ir.Node("", "Reshape", [values[name], shape])
        cast = ir.Node("", "Cast", [flat.outputs[0]], attributes=[ir.AttrInt64("to", int(ir.DataType.FLOAT))])
        transpose = ir.Node("", "Transpose", [cast.outputs[0]], attributes=[ir.AttrInt64s("perm", [1, 0])])
        gram = ir.Node("", "MatMul", [transpose.outputs[0], cast.outputs[0]])
        out = gram.outputs[0]
        out.name = f"{PREFIX}{i}"
        out.type = ir.TensorType(ir.DataType.FLOAT)
        out.shape = ir.Shape([channels, channels])
        graph.extend([flat, cast, transpose, gram])
        graph.outputs.append(out)
        names[name] = out.name
    return names


def chunks_within_budget(tensors: dict[str, int], budget: int = BUDGET_BYTES) -> list[dict[str, int]]:
    """Split tensors (name -> channels) into groups whose float32 Hessians fit ``budget`` bytes each
    (a single tensor larger than the budget gets a chunk of its own)."""
    chunks: list[dict[str, int]] = []
    used = budget + 1
    for name, channels in tensors.items():
        size = 4 * channels * channels
        if used + size > budget:
            chunks.append({})
            used = 0
        chunks[-1][name] = channels
        used += size
    return chunks


def collect_hessians(
    model: ir.Model, tensors: dict[str, int], feeds: list[dict[str, np.ndarray]], show_progress: bool = False
) -> dict[str, np.ndarray]:
    """Σ XᵀX over all feeds for each tensor (name -> channels), from one ORT session. ``model`` is untouched."""
    work = copy_model(model)
    outputs = add_hessian_outputs(work, tensors)
    order = list(outputs.items())
    sums: dict[str, np.ndarray] = {}
    with in_memory_session(work) as sess:
        for feed in track(feeds, "collecting Hessians", total=len(feeds), enabled=show_progress):
            results = sess.run([out for _, out in order], feed)
            for (name, _), h in zip(order, results, strict=True):
                if name in sums:
                    sums[name] += h
                else:
                    sums[name] = np.array(h, np.float32)
    for name, h in sums.items():
        if not np.all(np.isfinite(h)):
            raise CalibrationError(
                f"the Hessian of {name!r} overflowed (NaN or Inf) on this calibration data."
            )
    return sums


class ChunkedHessians:
    """``hessians(name)`` -> the (smoothed) Hessian of that tensor, computed a chunk at a time on first
    use; asking in the tensors' order computes each chunk once and holds one chunk in memory."""

    def __init__(
        self,
        model: ir.Model,
        tensors: dict[str, int],
        feeds: list[dict[str, np.ndarray]],
        scales: dict[str, np.ndarray] | None = None,
        budget: int = BUDGET_BYTES,
        show_progress: bool = False,
    ) -> None:
        self._model, self._feeds, self._scales = model, feeds, scales or {}
        self._chunks = chunks_within_budget(tensors, budget)
        self._loaded: dict[str, np.ndarray] = {}
        self._show_progress = show_progress
        self.passes = 0

    def __contains__(self, name: str) -> bool:
        return any(name in chunk for chunk in self._chunks)

    def __call__(self, name: str) -> np.ndarray:
        if name not in self._loaded:
            chunk = next((c for c in self._chunks if name in c), None)
            if chunk is None:
                raise KeyError(name)
            self._loaded = {}  # drop the previous chunk before computing the next
            self._loaded = collect_hessians(self._model, chunk, self._feeds, self._show_progress)
            self.passes += 1
        return smoothed_hessian(self._loaded[name], self._scales.get(name))


def smoothed_hessian(hessian: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """H of X/s from H of X: H_ij / (s_i s_j)."""
    if scale is None:
        return hessian
    inv = (1.0 / scale).astype(np.float32)
    return hessian * inv[:, None] * inv[None, :]
