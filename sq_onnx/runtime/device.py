"""Where a conversion's ONNX Runtime sessions run (``--device auto|cpu|cuda``): calibration, the sequential
segments that feed GPTQ, the α search and verification all create their sessions through
``sq_onnx.runtime.ort_session``, which asks ``providers()`` here. ``running_on`` sets it for one conversion
(a context variable, so nested or concurrent conversions do not see each other's)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache

from sq_onnx.errors import SqOnnxError

DEVICES = ("auto", "cpu", "cuda")
PROVIDERS = {
    "cpu": ("CPUExecutionProvider",),
    "cuda": ("CUDAExecutionProvider", "CPUExecutionProvider"),
}
_PROVIDERS: ContextVar[tuple[str, ...]] = ContextVar("sq_onnx_providers", default=PROVIDERS["cpu"])


class DeviceError(SqOnnxError):
    """The device asked for cannot be used here."""


def providers() -> list[str]:
    """The execution providers of the sessions created now."""
    return list(_PROVIDERS.get())


@lru_cache(maxsize=1)
def cuda_unusable() -> str | None:
    """None when ONNX Runtime can run on a CUDA GPU here, else why not (one clause)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        return (
            f"this onnxruntime has no CUDA provider (it has {', '.join(available)}); install onnxruntime-gpu "
            "in its place (pip install sq-onnx[gpu])"
        )
    import onnx_ir as ir

    x = ir.Value(name="x", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    y = ir.Value(name="y", shape=ir.Shape([1]), type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.Node("", "Identity", [x], outputs=[y])
    model = ir.Model(ir.Graph([x], [y], nodes=[node], opset_imports={"": 18}), ir_version=10)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    try:
        with warnings.catch_warnings():  # ORT warns before falling back; the fallback is the answer here
            warnings.simplefilter("ignore")
            sess = ort.InferenceSession(
                ir.to_proto(model).SerializeToString(), so, providers=list(PROVIDERS["cuda"])
            )
    except Exception as exc:  # ORT's own pybind errors
        return f"ONNX Runtime's CUDA provider does not start ({str(exc).strip().splitlines()[0]})"
    if "CUDAExecutionProvider" not in sess.get_providers():
        return "no CUDA GPU is usable (ONNX Runtime's CUDA provider fell back to the CPU)"
    return None


def resolve(device: str) -> str:
    """``auto``: cuda when usable, else cpu; ``cuda`` where it is not usable raises ``DeviceError``."""
    if device not in DEVICES:
        raise DeviceError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}.")
    if device == "cpu":
        return "cpu"
    why_not = cuda_unusable()
    if why_not is None:
        return "cuda"
    if device == "cuda":
        raise DeviceError(f"--device cuda: {why_not}; or leave --device at auto (the CPU here).")
    return "cpu"


@contextmanager
def running_on(device: str) -> Iterator[str]:
    """Sessions created inside use ``device`` (resolved: ``auto`` becomes cpu or cuda); yields it."""
    resolved = resolve(device)
    token = _PROVIDERS.set(PROVIDERS[resolved])
    try:
        yield resolved
    finally:
        _PROVIDERS.reset(token)


def gptq_device() -> str | None:
    """The torch device for GPTQ's maths (the Gram sums, the inverse Hessian's factor, the error feedback and the
    refinement): "cuda" while this conversion's sessions run on CUDA and torch can use the GPU too, else None
    (numpy on the CPU, where it is about 2x faster than torch's CPU device: tools/RESULTS.md). A CPU-only torch
    beside onnxruntime-gpu keeps numpy."""
    if providers()[0] != "CUDAExecutionProvider":
        return None
    return "cuda" if _torch_cuda() else None


@lru_cache(maxsize=1)
def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())
