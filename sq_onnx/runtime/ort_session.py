"""Create ONNX Runtime sessions for files and in-memory onnx_ir models."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import onnx_ir as ir

from sq_onnx.errors import ModelLoadError, ModelRunError, SqOnnxError
from sq_onnx.runtime import custom_ops, device
from sq_onnx.runtime.custom_ops import register_custom_ops
from sq_onnx.runtime.float32_twin import float32_twin, has_bfloat16
from sq_onnx.runtime.model_io import copy_model, has_external_tensors, weight_bytes

# Above this, sessions for in-memory models go through a temporary file (see in_memory_session).
IN_MEMORY_LIMIT = 64 * 1024**2
# Above this many bytes of weights, a conversion's session on a float model runs "lean", on the memory-mapped
# weights as they are (pages the kernel can drop): without ORT's pre-packed copies of them (for Llama-3.2-1B's
# 4.9 GB, 1.4 GB of anonymous memory after loading instead of 5.2, a peak of 5.55 GB instead of 5.99, loaded in
# 3 s instead of 16, for runs about 10% slower; tools/RESULTS.md) and without constant folding, which turns a tied
# lm_head's Transpose(embedding) into a second copy of the table (1 GB at Llama-3.2-1B, at no measurable cost
# per run when not folded). GPTQ's segment models (a layer each) keep both.
LEAN_LIMIT = 1536 * 1024**2
# Ops that run on weights ORT packs when the session is made: MatMulNBits computes at accuracy_level 4 only on
# prepacked weights, ORT fuses QDQ weights (DequantizeLinear -> MatMul) into MatMulNBits or int8 ops that pack
# theirs, and our kernels pack there on request. A model with any of them is never run lean: lean sessions are
# for the float model a conversion starts from.
PACKED_WEIGHT_OPS = {
    ("com.microsoft", "MatMulNBits"),
    ("com.microsoft", "MatMulIntegerToFloat"),
    ("com.microsoft", "DynamicQuantizeMatMul"),
    ("", "DequantizeLinear"),
    ("", "MatMulInteger"),
    ("", "QLinearMatMul"),
}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise SqOnnxError(
            "onnxruntime is not installed; install sq-onnx[cpu] (or sq-onnx[gpu] on NVIDIA machines)."
        ) from None
    return onnxruntime


def session_options(threads: int | None = None, custom_ops: bool = False, lean: bool = False):
    """Options for our sessions; ``custom_ops`` registers the sq_onnx op library (raises if it is missing);
    ``lean`` runs on the weights as they are, no packed or folded copies (see LEAN_LIMIT)."""
    ort = _ort()
    so = ort.SessionOptions()
    so.log_severity_level = 4  # errors come back as exceptions, which we report; ORT would print them twice
    if threads:
        so.intra_op_num_threads = threads
    if lean:
        so.add_session_config_entry("session.disable_prepacking", "1")
        so.add_session_config_entry("optimization.disable_specified_optimizers", "ConstantFolding")
    if custom_ops:
        register_custom_ops(so)
    return so


def session(path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
    """An ``onnxruntime.InferenceSession`` for a model file (on the conversion's device unless providers say
    otherwise). The sq_onnx
    custom-op library, when built, is always registered: that costs milliseconds, while reading the model's
    opsets first would cost a full parse of a single-file model."""
    ort = _ort()
    so = session_options(threads, custom_ops=custom_ops.available())
    try:
        return ort.InferenceSession(str(path), so, providers=providers or device.providers())
    except Exception as exc:
        if custom_ops.DOMAIN in str(exc) and not custom_ops.available():
            custom_ops.require_library()  # raises the sentence that says how to get it
        raise


@contextmanager
def in_memory_session(model: ir.Model, threads: int | None = None) -> Iterator[object]:
    """A session (on the conversion's device) for an onnx_ir model, by the cheapest route that works:
    - small and self-contained: serialized in memory;
    - weights in an external-data file (large models): a hidden temporary .onnx written beside that file
      references it in place, so ORT reads the original weights and this process never copies them;
      only new tensors (smoothed or quantized weights) go to a temporary data file beside it;
    - otherwise: everything streamed to a temporary folder (ORT needs files for models over 2 GB).
    bfloat16 models run as their float32 twin (``sq_onnx.runtime.float32_twin``): the CPU provider has no bf16 kernels.
    Feeds and outputs of a twin are float32 where the model's are bfloat16."""
    if has_bfloat16(model):
        model = float32_twin(model)
    custom = custom_ops.DOMAIN in model.opset_imports
    size = weight_bytes(model)
    lean = size > LEAN_LIMIT and not runs_on_packed_weights(model)
    if size < IN_MEMORY_LIMIT and not has_external_tensors(model):
        data = ir.to_proto(model).SerializeToString()
        yield _checked_session(data, threads, custom)
        return
    home = _external_home(model)
    if home is not None:
        with _files_beside(model, home) as path:
            yield _checked_session(str(path), threads, custom, lean)
        return
    with tempfile.TemporaryDirectory(prefix="sq-onnx-") as tmp:
        path = Path(tmp) / "model.onnx"
        ir.save(model, path, external_data="model.onnx.data", size_threshold_bytes=1024)
        yield _checked_session(str(path), threads, custom, lean)


@contextmanager
def run_failures_said(what: str, hint: str = "") -> Iterator[None]:
    """ONNX Runtime's failure while running a model the user gave us becomes one sentence naming ``what`` failed:
    a graph ORT loads but cannot run (onnxruntime-genai's CPU fp16 builder graph decoding on ORT 1.32, for one)
    is the model's problem, and a traceback would hide that. Other exceptions pass through."""
    try:
        yield
    except Exception as exc:  # ORT raises its own pybind types (Fail, RuntimeException, InvalidArgument, ...)
        if not type(exc).__module__.startswith("onnxruntime"):
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelRunError(
            f"ONNX Runtime fails running {what} ({first}){'; ' + hint if hint else ''}."
        ) from None


def _external_home(model: ir.Model) -> Path | None:
    """The one writable folder every external tensor of ``model`` lives in, if there is exactly one."""
    homes = {
        Path(v.const_value.base_dir)
        for v in model.graph.initializers.values()
        if isinstance(v.const_value, ir.ExternalTensor)
    }
    if len(homes) != 1:
        return None
    home = homes.pop()
    return home if os.access(home, os.W_OK) else None


ALIGN = 4096
INLINE_BYTES = 1024


@contextmanager
def _files_beside(model: ir.Model, home: Path) -> Iterator[Path]:
    """Write a structural copy of ``model`` as a hidden .onnx in ``home``: external tensors keep their
    references, other tensors above INLINE_BYTES stream (one at a time) into a hidden .data beside it.
    Both files are removed afterwards, also on errors and interrupts."""
    work = copy_model(model)
    fd, name = tempfile.mkstemp(prefix=".sq-onnx-", suffix=".onnx", dir=home)
    os.close(fd)
    path = Path(name)
    data_path = path.with_name(path.name + ".data")
    try:
        with open(data_path, "wb") as f:
            for value in work.graph.initializers.values():
                tensor = value.const_value
                if tensor is None or isinstance(tensor, ir.ExternalTensor) or tensor.nbytes < INLINE_BYTES:
                    continue
                offset = -(-f.tell() // ALIGN) * ALIGN
                f.seek(offset)
                raw = tensor.tobytes()
                f.write(raw)
                value.const_value = ir.ExternalTensor(
                    data_path.name,
                    offset,
                    len(raw),
                    tensor.dtype,
                    shape=tensor.shape,
                    name=value.name,
                    base_dir=home,
                )
                del raw
        ir.save(work, path)
        yield path
    finally:
        path.unlink(missing_ok=True)
        data_path.unlink(missing_ok=True)


def runs_on_packed_weights(model: ir.Model) -> bool:
    """Whether any node of ``model`` is an op that needs its weights packed when the session is made."""
    return any(
        (node.domain or "", node.op_type) in PACKED_WEIGHT_OPS or node.domain == custom_ops.DOMAIN
        for node in ir.traversal.RecursiveGraphIterator(model.graph)
    )


def _checked_session(model: bytes | str, threads: int | None, custom_ops: bool = False, lean: bool = False):
    """A session on the conversion's device (``sq_onnx.runtime.device``); ORT's refusal of a model the checker
    let through becomes one clear sentence."""
    ort = _ort()
    so = session_options(threads, custom_ops, lean)
    try:
        return ort.InferenceSession(model, so, providers=device.providers())
    except Exception as exc:  # ORT raises its own pybind types (Fail, InvalidGraph, NotImplemented, ...)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"ONNX Runtime cannot load the model: {first}") from None
