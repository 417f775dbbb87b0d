"""The conversion: load -> analyze -> calibrate -> smooth -> quantize -> verify -> save (``sq_onnx.stages``)."""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import onnx_ir as ir

from sq_onnx import stages
from sq_onnx.errors import SqOnnxError
from sq_onnx.recipe import Recipe
from sq_onnx.reporting.report import build_report, check_report_dir, write_report
from sq_onnx.runtime.device import running_on
from sq_onnx.runtime.model_io import check_output_path, load_model
from sq_onnx.runtime.ort_session import run_failures_said
from sq_onnx.runtime.peak_memory import peak_rss_mb, reset_peak_rss
from sq_onnx.stages import ConvertResult

# The steps that run only the user's float model (sampling text from it, calibrating it): ONNX Runtime failing
# there is the input's problem, said in one sentence (``run_failures_said``); later, a failure is ours.
INPUT_MODEL_STEPS = ("samples", "calibrate")
INPUT_FAILS = (
    "the input model itself, so it cannot be calibrated",
    "check that it runs in ONNX Runtime as it is, also through its KV cache (`sq-onnx generate MODEL PROMPT`)",
)


def convert(
    model: str | os.PathLike | Any,
    output: str | os.PathLike,
    recipe: Recipe | None = None,
    calibration: Any = None,
    *,
    tokenizer: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = False,
    report: str | os.PathLike | None = None,
    device: str = "auto",
) -> ConvertResult:
    """Convert ``model`` (path or in-memory model) with ``recipe`` and write ``output`` atomically.

    ``calibration``: None (built-in text), a .txt/.jsonl/.npz path, a dict of arrays (first axis =
    samples), or a list of feeds. ``report``: a folder for report.html/report.json (``sq_onnx.reporting.report``).
    ``device``: where ONNX Runtime runs the conversion's sessions (auto: a CUDA GPU when onnxruntime-gpu can use
    one, else the CPU; ``sq_onnx.runtime.device``); the result does not depend on it beyond float rounding.
    Raises ``SqOnnxError`` subclasses for anything the user can fix.
    """
    recipe = recipe or Recipe()
    start = time.perf_counter()
    reset_peak_rss()  # this conversion's own peak, not an earlier one's in the same process
    input_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
    out = check_output_path(input_path, output, overwrite)
    report_dir = check_report_dir(report, overwrite) if report is not None else None
    with running_on(device) as used, tempfile.TemporaryDirectory(prefix="sq-onnx-in-") as tmpdir:
        src = load_model(input_path if input_path is not None else _materialize_input(model, tmpdir))
        conv = stages.analyzed(src, out, recipe, input_path, tokenizer, show_progress, report_dir is not None)
        timings = {"load and analyze": time.perf_counter() - start}
        steps = [
            ("samples", lambda: stages.gather_samples(conv, calibration)),
            ("calibrate", lambda: stages.calibrate_stage(conv)),
            ("choose alpha", lambda: stages.choose_alpha(conv)),
            ("smooth", lambda: stages.smooth(conv)),
            ("choose 8-bit", lambda: stages.choose_8bit(conv)),
            ("quantize", lambda: stages.quantize(conv)),
            ("verify", lambda: stages.verify(conv)),
        ]
        for name, step in steps:
            began = time.perf_counter()
            with run_failures_said(*INPUT_FAILS) if name in INPUT_MODEL_STEPS else nullcontext():
                step()
            timings[name] = time.perf_counter() - began
        began = time.perf_counter()
        parts = stages.report_parts(conv) if report_dir is not None else None
        stages.join_linears(conv)
        stages.use_nbits_a8_kernel(conv)
        stages.fuse_attention(conv)
        stages.save(conv, out)
        stages.genai_folder(conv, out)
        timings["save"] = time.perf_counter() - began
    result = conv.result
    result.device = used
    result.stage_seconds = {name: round(seconds, 3) for name, seconds in timings.items()}
    result.input_bytes = _file_bytes(input_path) if input_path is not None else 0
    result.seconds = round(time.perf_counter() - start, 3)
    result.output_bytes = _file_bytes(out)
    result.peak_rss_mb = round(peak_rss_mb(), 1)
    if report_dir is not None and parts is not None:
        data = build_report(result.to_dict(), str(model) if input_path else "<in-memory>", *parts)
        result.report = [str(p) for p in write_report(report_dir, data, show_progress)]
    return result


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def _materialize_input(model: Any, tmpdir: str) -> Path:
    """Write an in-memory model (onnx_ir or ModelProto) to a temporary file so every path is file-based."""
    if isinstance(model, ir.Model):
        proto_model = model
    else:
        import onnx

        if not isinstance(model, onnx.ModelProto):
            raise SqOnnxError(
                f"convert() takes a path, an onnx_ir.Model or an onnx.ModelProto, not {type(model).__name__}."
            )
        proto_model = ir.from_proto(model)
    path = Path(tmpdir) / "input.onnx"
    ir.save(proto_model, path, external_data="input.onnx.data")
    return path
