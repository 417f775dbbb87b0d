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
    if weight_bytes(model) < IN_MEMORY_LIMIT and not _has_external_tensors(model):
        data = ir.to_proto(model).SerializeToString()
        yield _checked_session(data, threads)
        return
    with tempfile.TemporaryDirectory(prefix="sq-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
        yield _checked_session(str(path), threads)


def _checked_session(model: bytes | str, threads: int | None):
    """A CPU session; ORT's refusal of a model the checker let through becomes one clear sentence."""
    ort = _ort()
    try:
        return ort.InferenceSession(model, session_options(threads), providers=["CPUExecutionProvider"])
    except Exception as exc:  # ORT raises its own pybind types (Fail, InvalidGraph, NotImplemented, ...)
        from sq_onnx.errors import ModelLoadError

        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"ONNX Runtime cannot load the model: {first}") from None


def _has_external_tensors(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
