"""Create ONNX Runtime sessions for files and in-memory onnx_ir models."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from sq_onnx.model_io import weight_bytes

# Above this, sessions for in-memory models go through a temporary file (see in_memory_session).
IN_MEMORY_LIMIT = 64 * 1024**2


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
    """A CPU session for an onnx_ir model: serialized in memory when small; otherwise written to a temp
    folder with external data, which streams the weights instead of holding a protobuf copy and its bytes
    (two extra copies of the model), and which ORT needs for models over 2 GB or with external tensors."""
    ort = _ort()
    if weight_bytes(model) < IN_MEMORY_LIMIT and not _has_external_tensors(model):
        data = ir.to_proto(model).SerializeToString()
        yield ort.InferenceSession(data, session_options(threads), providers=["CPUExecutionProvider"])
        return
    with tempfile.TemporaryDirectory(prefix="sq-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
        yield ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])


def _has_external_tensors(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
