"""The conversion pipeline: load -> analyze -> calibrate -> smooth -> quantize -> verify -> save."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from sq_onnx.alpha_search import search_alpha_layer, search_alpha_model
from sq_onnx.calibrate import calibrate
from sq_onnx.calibration_data import builtin_heldout_feeds, find_tokenizer, load_calibration
from sq_onnx.errors import NothingToQuantizeError, SqOnnxError
from sq_onnx.hessian import ChunkedHessians
from sq_onnx.layer_error import LayerError, layer_errors
from sq_onnx.model_inputs import check_feed, complete_feed, input_specs
from sq_onnx.model_io import check_output_path, has_external_tensors, load_model, save_model
from sq_onnx.opset_upgrade import upgrade_if_needed
from sq_onnx.passes.analyze import analyze
from sq_onnx.peak_memory import peak_rss_mb, reset_peak_rss
from sq_onnx.plan import plan_linears
from sq_onnx.quantize_model import (
    cleanup,
    gptq_batches,
    input_importance,
    quantize_graph,
    smooth_copy,
    static_ranges,
)
from sq_onnx.recipe import Recipe
from sq_onnx.report import build_report, check_report_dir, group_record, write_report
from sq_onnx.segment_runner import SegmentRunner
from sq_onnx.verify import Agreement, compare, first_outputs
from sq_onnx.version import __version__

# A smoothed float model must reproduce the original to float rounding: fp32 ~1e-7 per op, fp16/bf16
# weights re-rounded after scaling ~1e-3 (measured 1.6e-3 on a tiny fp16 Llama).
EQUIVALENCE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# Activation rows kept per tensor for the report's per-layer errors (bounded memory, enough for a stable error).
REPORT_ROWS = 256


@dataclass
class ConvertResult:
    """What ``convert`` did; ``to_dict()`` is the CLI's --json object and goes into the output metadata."""

    output: str
    scheme: str
    alpha: float | None
    recipe: dict[str, Any]
    calibration: dict[str, Any]
    smoothed_groups: list[dict[str, Any]] = field(default_factory=list)
    quantized_matmuls: list[str] = field(default_factory=list)
    kept_float: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    smoothing_check: dict[str, Any] | None = None
    alpha_search: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    report: list[str] | None = None
    opset_upgrade: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
) -> ConvertResult:
    """Convert ``model`` (path or in-memory model) with ``recipe`` and write ``output`` atomically.

    ``calibration``: None (built-in text), a .txt/.jsonl/.npz path, a dict of arrays (first axis =
    samples), or a list of feeds. ``report``: a folder for report.html/report.json (``sq_onnx.report``).
    Raises ``SqOnnxError`` subclasses for anything the user can fix.
    """
    recipe = recipe or Recipe()
    start = time.perf_counter()
    reset_peak_rss()  # this conversion's own peak, not an earlier one's in the same process
    with tempfile.TemporaryDirectory(prefix="sq-onnx-in-") as tmpdir:
        input_path = Path(model) if isinstance(model, (str, os.PathLike)) else None
        out = check_output_path(input_path, output, overwrite)
        report_dir = check_report_dir(report, overwrite) if report is not None else None
        src = load_model(input_path if input_path is not None else _materialize_input(model, tmpdir))
        result, parts = _run_pipeline(
            src, out, recipe, calibration, input_path, tokenizer, show_progress, report_dir is not None
        )
        result.input_bytes = _file_bytes(input_path) if input_path is not None else 0
    result.seconds = round(time.perf_counter() - start, 3)
    result.output_bytes = _file_bytes(out)
    result.peak_rss_mb = round(peak_rss_mb(), 1)
    if report_dir is not None and parts is not None:
        data = build_report(result.to_dict(), str(model) if input_path else "<in-memory>", *parts)
        result.report = [str(p) for p in write_report(report_dir, data, show_progress)]
    return result


def _run_pipeline(
    src: ir.Model,
    out: Path,
    recipe: Recipe,
    calibration: Any,
    input_path: Path | None,
    tokenizer: str | os.PathLike | None,
    show_progress: bool,
    want_report: bool = False,
) -> tuple[ConvertResult, tuple[list[dict[str, Any]], list[LayerError]] | None]:
    """Every stage after loading; with ``want_report`` also the report's group records and layer errors."""
    _refuse_quantized(src)
    analysis = analyze(src.graph)
    plans = plan_linears(src.graph, analysis.linears, recipe)
    if recipe.scheme != "smooth" and not any(p.action != "keep" for p in plans):
        raise NothingToQuantizeError(
            "the model has no MatMul or Gemm with a constant weight that this recipe would quantize."
        )
    if recipe.scheme == "smooth" and (not recipe.smooth or not analysis.groups):
        raise NothingToQuantizeError("the model has no norm -> MatMul group that smoothing could fold into.")
    if recipe.kernels == "sq_onnx" and _weight_dtype(analysis) == "bfloat16":
        raise SqOnnxError(
            "--kernels sq_onnx takes float32 or float16 models, not bfloat16; use the stock ops (--kernels ort) "
            "or export the model in float16."
        )
    alpha = recipe.effective_alpha if recipe.smooth else None
    specs = input_specs(src)
    pool = max(recipe.samples, recipe.gptq_samples if recipe.uses_gptq else 0)
    feeds, origin = load_calibration(
        calibration,
        specs,
        model_path=input_path,
        tokenizer_dir=tokenizer,
        count=pool if calibration is None else pool + recipe.verify_samples,
        seq_len=recipe.seq_len,
        mix=recipe.calib_mix,
        seed=recipe.seed,
    )
    if calibration is None:  # verify on built-in text the calibration never reads, not on its own kind
        verify_feeds, verify_origin = held_out_feeds(recipe, specs, input_path, tokenizer)
        pool_feeds, held_out = feeds, True
    else:
        pool_feeds, verify_feeds, held_out = _split(feeds, pool, recipe.verify_samples)
        verify_origin = f"held-out part of {origin}"
    calib_feeds = pool_feeds[: recipe.samples]
    src, upgrade = upgrade_if_needed(src, recipe, calib_feeds[0] if calib_feeds else None)
    if upgrade is not None:  # node objects changed: analyse the upgraded graph
        analysis = analyze(src.graph)
        plans = plan_linears(src.graph, analysis.linears, recipe)
    result = ConvertResult(
        output=str(out),
        scheme=recipe.scheme,
        alpha=alpha,
        recipe=recipe.to_dict(),
        calibration={
            "source": origin,
            "samples": len(calib_feeds),
            "verify_samples": len(verify_feeds),
            "held_out": held_out,
            "verify_source": verify_origin,
        },
        skipped=[asdict(s) for s in analysis.skipped],
        kept_float=[{"node": p.name, "reason": p.reason} for p in plans if p.action == "keep"],
        opset_upgrade=upgrade,
    )

    # Calibrate: per-channel abs-max of every tensor that smoothing or static activations need.
    tensors: dict[str, int] = {}
    if recipe.smooth:
        tensors.update({g.name: g.channels for g in analysis.groups})
    if recipe.clip_search:
        tensors.update({p.linear.input.name: p.linear.shape[0] for p in plans if p.action in ("w4", "w8")})
    if recipe.scheme == "w8a8" and recipe.act == "static":
        tensors.update({p.linear.input.name: p.linear.shape[0] for p in plans if p.action == "w8a8"})
    row_tensors = tuple(g.name for g in analysis.groups) if recipe.alpha_search == "layer" else ()
    max_rows = recipe.search_rows
    if want_report:
        quantized_inputs = [p.linear.input.name for p in plans if p.action != "keep"]
        row_tensors = tuple(dict.fromkeys([*row_tensors, *quantized_inputs]))
        max_rows = max_rows if recipe.alpha_search == "layer" else min(max_rows, REPORT_ROWS)
    calib = calibrate(
        src,
        tensors,
        calib_feeds,
        verify_feeds,
        row_tensors=row_tensors,
        max_rows=max_rows,
        seed=recipe.seed,
        show_progress=show_progress,
    )
    stats, reference = calib.absmax, calib.reference
    if recipe.alpha_search == "model" and analysis.groups:
        alpha, result.alpha_search = search_alpha_model(
            src, recipe, stats, calib_feeds[: recipe.search_samples], show_progress
        )
        result.alpha = alpha
    elif recipe.alpha_search == "layer" and analysis.groups:
        alpha, result.alpha_search = search_alpha_layer(
            analysis.groups, plans, stats, calib.rows, recipe, show_progress
        )
        result.alpha = float(np.mean(list(alpha.values())))
    work, result.smoothed_groups, scales = smooth_copy(src, stats, alpha if analysis.groups else None)
    if result.smoothed_groups and verify_feeds:
        check = compare(reference, first_outputs(work, verify_feeds, "smoothed", show_progress))
        tolerance = EQUIVALENCE_TOLERANCE.get(_weight_dtype(analysis), 1e-4)
        result.smoothing_check = {
            **check.to_dict(),
            "tolerance": tolerance,
            "equivalent": check.relative_error < tolerance,
        }
        if not result.smoothing_check["equivalent"]:
            raise SqOnnxError(
                f"internal check failed: the smoothed float model differs from the original "
                f"(relative error {check.relative_error:.2e}); please report this model."
            )
    if recipe.scheme != "smooth":
        ranges = static_ranges(stats, result.smoothed_groups) if recipe.act == "static" else None
        importance = input_importance(calib.mean_square, scales) if recipe.clip_search else None
        hessians = segments = None
        if recipe.uses_gptq:
            hessian_feeds = pool_feeds[: recipe.gptq_samples]
            result.calibration["hessian_samples"] = len(hessian_feeds)
            if recipe.gptq_sequential or recipe.gptq_asymmetric:
                batches = gptq_batches(work, recipe)
                segments = SegmentRunner(work, batches, hessian_feeds, float_copy=recipe.gptq_asymmetric)
            else:
                inputs = {p.linear.input.name: p.linear.shape[0] for p in plans if p.action in ("w4", "w8")}
                hessians = ChunkedHessians(src, inputs, hessian_feeds, scales, show_progress=show_progress)
        quantized = quantize_graph(work, recipe, ranges, show_progress, importance, hessians, segments)
        result.quantized_matmuls = quantized.replaced
        if quantized.fell_back is not None:
            result.calibration["gptq_fell_back"] = quantized.fell_back
    else:
        cleanup(work)

    if verify_feeds:
        agreement: Agreement = compare(
            reference, first_outputs(work, verify_feeds, "converted", show_progress)
        )
        result.verify = agreement.to_dict()
    parts = None
    if want_report:
        alphas = {g["name"]: g["alpha"] for g in result.smoothed_groups}
        groups = [
            group_record(g, stats[g.name], scales[g.name], alphas[g.name])
            for g in analysis.groups
            if g.name in scales
        ]
        errors = layer_errors(work.graph, [p.linear for p in plans], calib.rows, scales)
        parts = (groups, errors)
    _record_metadata(work, recipe, result)
    # Keep the input's layout: an input with external data gets an output with external data.
    keep_layout = input_path is not None and has_external_tensors(src)
    save_model(work, out, external_data=recipe.external_data or keep_layout)
    return result, parts


def held_out_feeds(
    recipe: Recipe, specs: list, model_path: Path | None, tokenizer: str | os.PathLike | None
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Verification samples for the built-in calibration: held-out docs and code (``builtin_heldout_feeds``)."""
    if recipe.verify_samples == 0:
        return [], "none"
    feeds, origin = builtin_heldout_feeds(
        recipe.verify_samples, recipe.seq_len, find_tokenizer(model_path, tokenizer)
    )
    return [complete_feed(check_feed(f, specs), specs) for f in feeds], origin


def _weight_dtype(analysis: Any) -> str:
    """Name of the linears' weight dtype (the precision the smoothed weights are re-rounded to)."""
    dtype = analysis.linears[0].source.dtype if analysis.linears else None
    names = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
    return names.get(dtype, "float32")


QUANTIZED_OPS = {
    "MatMulNBits",
    "MatMulIntegerToFloat",
    "DynamicQuantizeMatMul",
    "QLinearMatMul",
    "MatMulInteger",
    "QuantizeLinear",
    "DequantizeLinear",
    "DynamicQuantizeLinear",
    "GatherBlockQuantized",
}


def _refuse_quantized(model: ir.Model) -> None:
    """Quantizing twice compounds the error silently; say so instead."""
    found = sorted({n.op_type for n in model.graph if n.op_type in QUANTIZED_OPS})
    if found:
        raise SqOnnxError(
            f"the model is already quantized (it contains {', '.join(found)}); convert the float model instead."
        )


def _record_metadata(work: ir.Model, recipe: Recipe, result: ConvertResult) -> None:
    """Recipe, version, calibration summary and verification go into the output's metadata_props."""
    work.metadata_props["sq_onnx.version"] = __version__
    work.metadata_props["sq_onnx.recipe"] = recipe.to_json()
    work.metadata_props["sq_onnx.calibration"] = json.dumps(result.calibration, sort_keys=True)
    work.metadata_props["sq_onnx.verify"] = json.dumps(result.verify, sort_keys=True)
    if result.alpha_search is not None:
        work.metadata_props["sq_onnx.alpha_search"] = json.dumps(result.alpha_search, sort_keys=True)
    if result.smoothing_check is not None:
        work.metadata_props["sq_onnx.smoothing_check"] = json.dumps(result.smoothing_check, sort_keys=True)


def _split(feeds: list[dict[str, np.ndarray]], pool: int, verify: int) -> tuple[list, list, bool]:
    """The first ``pool`` samples for calibration, verification samples after them (held out) when
    there are enough."""
    if verify == 0:
        return feeds[:pool], [], True
    if len(feeds) > pool:
        return feeds[:pool], feeds[pool : pool + verify], True
    if len(feeds) >= 2:
        n_verify = max(1, min(verify, len(feeds) // 4))
        return feeds[:-n_verify], feeds[-n_verify:], True
    return feeds, feeds[:1], False
