"""Create ONNX Runtime sessions for files and in-memory onnx_ir models."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from sq_onnx.model_io import EXTERNAL_DATA_THRESHOLD, weight_bytes


def _ort():
    try:
        import onnxruntime
    except ImportError:
        from sq_onnx.errors import SqOnnxError

        raise SqOnnxError(
            "onnxruntime is not installed; install sq-onnx[cpu] (or sq-onnx[gpu] on NVIDIA machines)."
        ) from None
    return onnxruntime


def session_options(threads: int | None = None):
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:
        so.intra_op_num_threads = threads
    return so


def session(path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` for a model file (CPU unless providers say otherwise)."""
    ort = _ort()
    return ort.InferenceSession(
        str(path), session_options(threads), providers=providers or ["CPUExecutionProvider"]
    )


@contextmanager
def in_memory_session(model: ir.Model, threads: int | None = None) -> Iterator[object]:
    """A CPU session for an onnx_ir model: serialized in memory, or through a temp folder when the model
    is over 2 GB or still points at external data files (ORT cannot resolve those from bytes)."""
    ort = _ort()
    if weight_bytes(model) < EXTERNAL_DATA_THRESHOLD and not _has_external_tensors(model):
        data = ir.to_proto(model).SerializeToString()
        yield ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"])
        return
    with tempfile.TemporaryDirectory(prefix="sq-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data")
        yield ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def _has_external_tensors(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
