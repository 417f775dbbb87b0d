"""sq-onnx: SmoothQuant (W8A8) and SmoothQuant+ (W4) for ONNX LLMs, on stock ONNX Runtime ops."""

from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

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
    """An ``onnxruntime.InferenceSession`` for a converted model."""
    from sq_onnx.ort_session import session as _session

    return _session(path, providers=providers, threads=threads)


__all__ = ["Recipe", "SqOnnxError", "__version__", "convert", "session"]
