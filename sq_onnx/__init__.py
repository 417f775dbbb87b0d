"""sq-onnx: SmoothQuant (W8A8) and SmoothQuant+ (W4) for ONNX LLMs, on stock ONNX Runtime ops."""

from __future__ import annotations

from pathlib import Path

from sq_onnx.version import __version__

# Running from a source checkout: the top-level ``passes/`` folder is ``sq_onnx.passes``
# (the wheel installs it there). Appending the repository root to our package path makes
# ``sq_onnx.passes`` resolve to the top-level folder.
_here = Path(__file__).resolve().parent
if not (_here / "passes").is_dir() and (_here.parent / "passes" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # type: ignore[name-defined]  # noqa: F821

from sq_onnx.errors import SqOnnxError  # noqa: E402
from sq_onnx.recipe import Recipe  # noqa: E402


def convert(*args, **kwargs):
    """See :func:`sq_onnx.convert.convert`."""
    from sq_onnx.pipeline import convert as _convert

    return _convert(*args, **kwargs)


def session(path, providers=None, threads=None):
    """An ``onnxruntime.InferenceSession`` for a converted model (registers the sq_onnx custom ops when the
    model uses them)."""
    from sq_onnx.runtime.ort_session import session as _session

    return _session(path, providers=providers, threads=threads)


def register_custom_ops(session_options) -> None:
    """Register the sq_onnx custom-op library (models converted with ``--kernels sq_onnx``) on an
    ``onnxruntime.SessionOptions``, for sessions created outside sq-onnx."""
    from sq_onnx.runtime.custom_ops import register_custom_ops as _register

    _register(session_options)


__all__ = ["Recipe", "SqOnnxError", "__version__", "convert", "register_custom_ops", "session"]
