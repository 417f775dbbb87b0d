"""The conversion's stages over one typed state: each stage reads what the earlier ones left in
``Conversion`` and adds its own part; ``pipeline.convert`` calls them in order.

analyze -> samples -> calibrate -> choose α -> smooth -> quantize -> verify -> (report) -> save
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

from sq_onnx import accuracy_level
from sq_onnx.alpha_search import search_alpha_layer, search_alpha_model
from sq_onnx.calibration.calibrate import Calibration, calibrate
from sq_onnx.calibration.calibration_data import builtin_heldout_feeds, find_tokenizer, load_calibration
from sq_onnx.calibration.hessian import ChunkedHessians
from sq_onnx.calibration.segment_runner import SegmentRunner, SpillFolder
from sq_onnx.errors import NothingToQuantizeError, SqOnnxError
from sq_onnx.lm.genai_folder import genai_config_of, write_folder
from sq_onnx.lm_head_tail import also_an_output, head_input, tail_model
from sq_onnx.memory_check import check_memory, memory_need
from sq_onnx.mixed_precision import layer_costs, promote
from sq_onnx.opset_upgrade import upgrade_if_needed
from sq_onnx.passes.analyze import Analysis, analyze
from sq_onnx.passes.fuse_masked_attention import FuseMaskedAttentionPass
from sq_onnx.passes.fuse_norm_quant import fusion_record
from sq_onnx.passes.merge_matmulnbits import MergeSharedInputMatMulNBitsPass
from sq_onnx.passes.smooth import producer_scales
from sq_onnx.passes.use_nbits_a8_kernel import UseNBitsA8KernelPass
from sq_onnx.plan import LinearPlan, plan_linears, without_act16_groups
from sq_onnx.quantize_model import (
    Smoothed,
    activation_ranges,
    cleanup,
    gptq_batches,
    input_importance,
    quantize_graph,
    smooth_copy,
)
from sq_onnx.recipe import Recipe
from sq_onnx.reporting.layer_error import LayerError, layer_errors
from sq_onnx.reporting.report import group_record
from sq_onnx.runtime import custom_ops
from sq_onnx.runtime.device import running_on
from sq_onnx.runtime.model_inputs import (
    InputSpec,
    check_feed,
    complete_feed,
    input_specs,
    is_language_model,
    with_cache_dims,
)
from sq_onnx.runtime.model_io import has_external_tensors, save_model, weight_bytes
from sq_onnx.runtime.peak_memory import current_rss_bytes
from sq_onnx.verify import (
    Agreement,
    AgreementSums,
    HeldOutput,
    HeldOutputs,
    each_first_output,
    held_outputs,
)
from sq_onnx.version import __version__

Feeds = list[dict[str, np.ndarray]]
# A smoothed float model must reproduce the original to float rounding: fp32 ~1e-7 per op, fp16/bf16
# weights re-rounded after scaling ~1e-3 (measured 1.6e-3 on a tiny fp16 Llama).
EQUIVALENCE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}
# Activation rows kept per tensor for the report's per-layer errors (bounded memory, enough for a stable error).
REPORT_ROWS = 256
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
    quantized_embeddings: list[str] = field(default_factory=list)
    kept_float: list[dict[str, str]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    fusions: dict[str, Any] | None = None
    smoothing_check: dict[str, Any] | None = None
    alpha_search: dict[str, Any] | None = None
    verify: dict[str, Any] | None = None
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    peak_rss_mb: float = 0.0
    report: list[str] | None = None
    opset_upgrade: dict[str, Any] | None = None
    genai: dict[str, Any] | None = None
    accuracy_level: dict[str, Any] | None = None  # what --accuracy-level auto chose, and why
    stage_seconds: dict[str, float] = field(default_factory=dict)  # wall time per stage, in order
    kept_8bit: list[dict[str, Any]] = field(default_factory=list)  # --keep-8bit's choice, with its scores
    device: str = "cpu"  # where the sessions ran (--device, resolved)
    joined_linears: list[list[str]] = field(default_factory=list)  # MatMulNBits joined per shared input
    nbits_a8_kernels: dict[str, Any] | None = (
        None  # W4 --kernels sq_onnx: MatMulNBits swapped, and why others stayed
    )
    masked_attention: int | None = None  # W4 --kernels sq_onnx: attention blocks fused into MaskedAttention

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scheme"] = str(self.scheme)
        return data


@dataclass(frozen=True)
class Samples:
    """The calibration samples (statistics: the first ``recipe.samples``; GPTQ: up to ``gptq_samples``) and
    the verification samples, which calibration never reads, with where each came from."""

    pool: Feeds
    verify: Feeds
    source: str
    verify_source: str
    held_out: bool


@dataclass
class Conversion:
    """Everything one conversion knows. ``analyzed`` makes it; each stage fills in its part."""

    recipe: Recipe
    src: ir.Model
    input_path: Path | None
    tokenizer: str | os.PathLike | None
    show_progress: bool
    want_report: bool
    analysis: Analysis
    plans: list[LinearPlan]
    specs: list[InputSpec]
    result: ConvertResult
    samples: Samples | None = None
    calib: Calibration | None = None
    alpha: float | dict[str, float] | None = None
    smoothed: Smoothed | None = None  # the copy being converted, the plans carried to it, groups and scales
    # the float model's outputs on the verification samples, from calibration's session (half, or in files)
    reference: HeldOutputs | None = None
    reference_spill: SpillFolder | None = None
    genai: tuple[dict[str, Any] | None, str] | None = None  # the input's genai config and where it came from

    @property
    def work(self) -> ir.Model:
        assert self.smoothed is not None, "smooth first"
        return self.smoothed.model

    @property
    def calib_feeds(self) -> Feeds:
        assert self.samples is not None
        return self.samples.pool[: self.recipe.samples]


def analyzed(
    src: ir.Model,
    out: Path,
    recipe: Recipe,
    input_path: Path | None,
    tokenizer: str | os.PathLike | None,
    show_progress: bool,
    want_report: bool,
) -> Conversion:
    """Find the groups and plan every linear; refuse, before any work, what the recipe cannot do."""
    _refuse_quantized(src)
    analysis = analyze(src.graph, through_linears=recipe.uses_linear_folds)
    plans = plan_linears(src.graph, analysis.linears, recipe)
    analysis = without_act16_groups(analysis, plans, recipe)
    if recipe.scheme != "smooth" and not any(p.action != "keep" for p in plans):
        raise NothingToQuantizeError(
            "the model has no MatMul or Gemm with a constant weight that this recipe would quantize."
        )
    if recipe.scheme == "smooth" and (not recipe.smooth or not analysis.groups):
        raise NothingToQuantizeError("the model has no norm -> MatMul group that smoothing could fold into.")
    _refuse_old_runtime(recipe)
    # GPTQ's cache holds at least one value as wide as the narrowest linear input (the residual stream) per
    # sample and stream at every cut (past its memory budget, in files)
    narrowest = min((p.linear.shape[0] for p in plans if p.action != "keep"), default=0)
    external = has_external_tensors(src)
    check_memory(
        memory_need(weight_bytes(src), external, recipe, narrowest), current_rss_bytes(), recipe, external
    )
    if recipe.kernels == "sq_onnx" and _weight_dtype(analysis) == "bfloat16":
        raise SqOnnxError(
            "--kernels sq_onnx takes float32 or float16 models, not bfloat16; use the stock ops (--kernels ort) "
            "or export the model in float16."
        )
    names = [v.name or "" for v in src.graph.inputs], [v.name or "" for v in src.graph.outputs]
    genai = genai_config_of(input_path, *names) if input_path is not None else None
    result = ConvertResult(
        output=str(out),
        scheme=recipe.scheme,
        alpha=recipe.effective_alpha if recipe.smooth else None,
        recipe=recipe.to_dict(),
        calibration={},
    )
    return Conversion(
        recipe,
        src,
        input_path,
        tokenizer,
        show_progress,
        want_report,
        analysis,
        plans,
        with_cache_dims(input_specs(src), genai[0] if genai else None),  # the input's own genai config
        result,
        genai=genai,
    )


def gather_samples(conv: Conversion, calibration: Any) -> None:
    """Calibration and verification samples; upgrades the opset when the recipe's ops need a newer one."""
    recipe = conv.recipe
    searched = (
        recipe.search_samples if recipe.alpha_search == "model" else 0
    )  # scored apart from the statistics
    pool = max(recipe.samples + searched, recipe.gptq_samples if recipe.uses_gptq else 0)
    feeds, origin = load_calibration(
        calibration,
        conv.specs,
        model_path=conv.input_path,
        tokenizer_dir=conv.tokenizer,
        count=pool if calibration is None else pool + recipe.verify_samples,
        seq_len=recipe.seq_len,
        mix=recipe.calib_mix,
        seed=recipe.seed,
        show_progress=conv.show_progress,
    )
    if calibration is None:  # verify on built-in text the calibration never reads, not on its own kind
        verify_feeds, verify_origin = held_out_feeds(recipe, conv.specs, conv.input_path, conv.tokenizer)
        pool_feeds, held_out = feeds, True
    else:
        pool_feeds, verify_feeds, held_out = _split(feeds, pool, recipe.verify_samples)
        verify_origin = f"held-out part of {origin}"
    conv.samples = Samples(pool_feeds, verify_feeds, origin, verify_origin, held_out)
    conv.result.calibration = {
        "source": origin,
        "samples": len(conv.calib_feeds),
        "verify_samples": len(verify_feeds),
        "held_out": held_out,
        "verify_source": verify_origin,
    }
    calib_feeds = conv.calib_feeds
    conv.src, conv.result.opset_upgrade = upgrade_if_needed(
        conv.src, recipe, calib_feeds[0] if calib_feeds else None
    )
    if conv.result.opset_upgrade is not None:  # node objects changed: analyse the upgraded graph
        conv.analysis = analyze(conv.src.graph, through_linears=recipe.uses_linear_folds)
        conv.plans = plan_linears(conv.src.graph, conv.analysis.linears, recipe)
        conv.analysis = without_act16_groups(conv.analysis, conv.plans, recipe)
    conv.result.skipped = [asdict(s) for s in conv.analysis.skipped]
    conv.result.kept_float = [{"node": p.name, "reason": p.reason} for p in conv.plans if p.action == "keep"]


# The smoothed float model must equal the original to float rounding: a wrong fold shows on any sample, so the
# exactness check reads the first few verification samples (their float outputs come from calibration's session).
EXACTNESS_SAMPLES = 2


def calibrate_stage(conv: Conversion) -> None:
    """Per-channel abs-max of every tensor that smoothing, the clip search or static activations need, the
    float model's reference outputs on the verification samples, and rows for the layer search / report."""
    recipe, analysis, plans = conv.recipe, conv.analysis, conv.plans
    assert conv.samples is not None
    tensors: dict[str, int] = {}
    if recipe.smooth:
        tensors.update({g.name: g.channels for g in analysis.groups})
    if recipe.clip_search:
        tensors.update({p.linear.input.name: p.linear.shape[0] for p in plans if p.action in ("w4", "w8")})
    if recipe.scheme == "w8a8" and recipe.act == "static":
        tensors.update({p.linear.input.name: p.linear.shape[0] for p in plans if p.action == "w8a8"})
    row_tensors = tuple(g.name for g in analysis.groups) if recipe.alpha_search == "layer" else ()
    if recipe.keep_8bit:  # mixed_precision scores each W4 linear on its input's rows
        w4_inputs = [p.linear.input.name or "" for p in plans if p.action == "w4" and not p.lm_head]
        row_tensors = tuple(dict.fromkeys([*row_tensors, *w4_inputs]))
    max_rows = recipe.search_rows
    if conv.want_report:
        quantized_inputs = [p.linear.input.name for p in plans if p.action != "keep"]
        row_tensors = tuple(dict.fromkeys([*row_tensors, *quantized_inputs]))
        keeps_rows = recipe.alpha_search == "layer" or recipe.keep_8bit > 0
        max_rows = max_rows if keeps_rows else min(max_rows, REPORT_ROWS)
    # the float model's outputs on every verification sample come from this session too (verification then
    # runs no float model of its own, and no float session shares memory with the converted model's weights);
    # the first few are also kept whole for the smoothing check
    conv.reference_spill = SpillFolder(
        "the float model's reference outputs for verification", "lower --verify-samples"
    )
    conv.reference = HeldOutputs(conv.reference_spill)
    exact: list[HeldOutput] = []  # whole float32, in files: 131 MB each at a 128K vocabulary

    def hold(i: int, output: np.ndarray) -> None:
        if i < EXACTNESS_SAMPLES:
            exact.append(HeldOutput.whole(output).to_file(conv.reference_spill))  # type: ignore[arg-type]
        conv.reference.add(output)  # type: ignore[union-attr]

    conv.calib = calibrate(
        conv.src,
        tensors,
        conv.calib_feeds,
        conv.samples.verify,
        row_tensors=row_tensors,
        max_rows=max_rows,
        seed=recipe.seed,
        show_progress=conv.show_progress,
        on_reference=hold,
    )
    conv.calib.reference = exact


def choose_alpha(conv: Conversion) -> None:
    """The recipe's α, or the one an α search picks (one for the model, or one per group)."""
    recipe, groups = conv.recipe, conv.analysis.groups
    assert conv.calib is not None
    conv.alpha = recipe.effective_alpha if recipe.smooth else None
    if recipe.alpha_search == "model" and groups:
        assert conv.samples is not None
        # score the candidates on samples the statistics did not come from, so the α that wins is not
        # the one that fits the calibration slice best; a pool too small for that falls back to it
        after = conv.samples.pool[recipe.samples : recipe.samples + recipe.search_samples]
        held_out = len(after) == recipe.search_samples
        feeds = after if held_out else conv.calib_feeds[: recipe.search_samples]
        stats = conv.calib.absmax
        conv.alpha, record = search_alpha_model(
            conv.src, conv.analysis, conv.plans, recipe, stats, feeds, conv.show_progress
        )
        conv.result.alpha_search = {**record, "held_out": held_out}
        conv.result.alpha = conv.alpha
    elif recipe.alpha_search == "layer" and groups:
        conv.alpha, conv.result.alpha_search = search_alpha_layer(
            groups, conv.plans, conv.calib.absmax, conv.calib.rows, recipe, conv.show_progress
        )
        conv.result.alpha = float(np.mean(list(conv.alpha.values())))


def smooth(conv: Conversion) -> None:
    """A smoothed copy of the model; it must compute what the original does (checked on the verification
    samples, to float rounding)."""
    assert conv.calib is not None and conv.samples is not None
    alpha = conv.alpha if conv.analysis.groups else None
    conv.smoothed = smooth_copy(conv.src, conv.analysis, conv.plans, conv.calib.absmax, alpha)
    conv.result.smoothed_groups = [asdict(g) for g in conv.smoothed.groups]
    # the whole float32 outputs are read once, here (verification reads the half-precision ones in conv.reference)
    reference, conv.calib.reference = conv.calib.reference, []
    if not (conv.smoothed.groups and reference):
        return
    check, _ = _score(conv, "smoothed", reference)
    tolerance = EQUIVALENCE_TOLERANCE.get(_weight_dtype(conv.analysis), 1e-4)
    equivalent = check.relative_error < tolerance
    conv.result.smoothing_check = {**check.to_dict(), "tolerance": tolerance, "equivalent": equivalent}
    if not equivalent:
        raise SqOnnxError(
            f"internal check failed: the smoothed float model differs from the original "
            f"(relative error {check.relative_error:.2e}); please report this model."
        )


def choose_8bit(conv: Conversion) -> None:
    """``--keep-8bit N``: the N W4 linears that lose the most output per byte get 8-bit weights
    (``sq_onnx.mixed_precision``), scored on the smoothed weights."""
    recipe = conv.recipe
    if not recipe.keep_8bit:
        return
    assert conv.smoothed is not None and conv.calib is not None
    costs = layer_costs(conv.smoothed.plans, conv.calib.rows, conv.smoothed.scales, recipe)
    chosen = costs[: recipe.keep_8bit]
    names = {c.name for c in chosen}
    conv.smoothed = replace(conv.smoothed, plans=promote(conv.smoothed.plans, names))
    conv.plans = promote(conv.plans, names)
    conv.result.kept_8bit = [asdict(c) for c in chosen]


def quantize(conv: Conversion) -> None:
    """Replace the planned linears in the smoothed copy (GPTQ's Hessians from the float model in one pass,
    or segment by segment from the copy as it is quantized)."""
    recipe, calib, samples, smoothed = conv.recipe, conv.calib, conv.samples, conv.smoothed
    assert smoothed is not None and calib is not None and samples is not None
    work = smoothed.model
    if recipe.scheme == "smooth":
        cleanup(work)
        return
    ranges = activation_ranges(recipe, calib.absmax, smoothed)
    importance = input_importance(calib.mean_square, smoothed.scales) if recipe.clip_search else None
    hessians = segments = None
    if recipe.uses_gptq:
        feeds = samples.pool[: recipe.gptq_samples]
        conv.result.calibration["hessian_samples"] = len(feeds)
        if recipe.gptq_sequential or recipe.gptq_asymmetric:
            segments = SegmentRunner(
                work, gptq_batches(work, recipe, smoothed.plans), feeds, float_copy=recipe.gptq_asymmetric
            )
        else:
            inputs = {p.linear.input.name: p.linear.shape[0] for p in conv.plans if p.action in ("w4", "w8")}
            hessians = ChunkedHessians(
                conv.src, inputs, feeds, smoothed.scales, show_progress=conv.show_progress
            )
    quantized = quantize_graph(
        work,
        recipe,
        smoothed.plans,
        static_ranges=ranges,
        show_progress=conv.show_progress,
        importance=importance,
        hessians=hessians,
        segments=segments,
    )
    conv.result.quantized_matmuls = quantized.replaced
    conv.result.quantized_embeddings = quantized.embeddings
    if recipe.kernels == "sq_onnx":
        conv.result.fusions = fusion_record(quantized.fused_norms, quantized.unfused_norms)
    if quantized.fell_back is not None:
        conv.result.calibration["gptq_fell_back"] = quantized.fell_back


def verify(conv: Conversion) -> None:
    """The converted model against the float one on the verification samples; with ``--accuracy-level auto``
    the W4 linears are also run at level 4 and keep it when it costs at most the tolerance. That choice is
    about ORT's CPU kernel (MLAS rounds the activations to int8 per block), so it is judged on the CPU
    whatever ``--device`` ran the rest."""
    nodes, head = _auto_level_nodes(conv), _auto_level_nodes(conv, lm_head=True)
    with running_on("cpu") if nodes or head else nullcontext():
        _verify(conv, nodes, head)


def _verify(conv: Conversion, nodes: list[ir.Node], head: list[ir.Node]) -> None:
    assert conv.smoothed is not None and conv.calib is not None and conv.samples is not None
    if not conv.samples.verify:
        if nodes:
            choice = accuracy_level.LevelChoice(
                0, "no held-out samples to verify level 4 on (--verify-samples 0)"
            )
            accuracy_level.set_level(nodes, 0)
            conv.result.accuracy_level = choice.to_dict()
        return
    spill = conv.reference_spill or SpillFolder(
        "the float model's reference outputs for verification", "lower --verify-samples"
    )
    try:
        reference = conv.reference.outputs if conv.reference is not None else []
        if len(reference) != len(conv.samples.verify):  # not from calibration: the float model runs here
            reference = held_outputs(conv.src, conv.samples.verify, "float model", conv.show_progress, spill)
        _verify_against(conv, nodes, head, reference)
    finally:
        spill.close()
        conv.reference = None


def _verify_against(
    conv: Conversion, nodes: list[ir.Node], head: list[ir.Node], reference: list[HeldOutput]
) -> None:
    """``_verify`` with the float model's ``reference`` outputs on the verification samples."""
    accuracy_level.set_level(head, 0)  # the linears' choice is judged with the lm_head in float, on its own
    # the runs below also keep the lm_head's input, so its own level is judged on the lm_head and what follows it
    hidden = head_input(conv.work, head) if head else None
    kept: dict[str, list[np.ndarray]] = {hidden.name: []} if hidden is not None and hidden.name else {}
    kept4: dict[str, list[np.ndarray]] = {name: [] for name in kept}
    with also_an_output(conv.work.graph, hidden if kept else None):
        agreement, losses = _score(conv, "converted", reference, bool(nodes or head), kept)
        tolerance = conv.recipe.level4_tolerance
        if nodes:
            accuracy_level.set_level(nodes, 4)
            agreement4, losses4 = _score(conv, "converted, accuracy level 4", reference, True, kept4)
            choice = accuracy_level.judge(losses, losses4, tolerance)
            if choice.level == 4:
                agreement, losses, kept = agreement4, losses4, kept4
            accuracy_level.set_level(nodes, choice.level)
            conv.result.accuracy_level = choice.to_dict()
    if head:  # then the lm_head at 4 (as written) against 0, with the linears at their chosen level
        accuracy_level.set_level(head, 4)
        label = "converted, lm_head at accuracy level 4"
        outputs = None
        if kept and hidden is not None:
            feeds = [{name: value} for name, values in kept.items() for value in values]
            outputs = each_first_output(tail_model(conv.work, hidden), feeds, label, conv.show_progress)
        agreement4, losses4 = _score(conv, label, reference, True, outputs=outputs)
        head_choice = accuracy_level.judge(losses, losses4, tolerance)
        if head_choice.level == 4:
            agreement = agreement4
        accuracy_level.set_level(head, head_choice.level)
        conv.result.accuracy_level = {**(conv.result.accuracy_level or {}), "lm_head": head_choice.to_dict()}
    conv.result.verify = agreement.to_dict()


def _score(
    conv: Conversion,
    label: str,
    reference: list[HeldOutput],
    losses_too: bool = False,
    keep: dict[str, list[np.ndarray]] | None = None,
    outputs: Iterator[np.ndarray] | None = None,
) -> tuple[Agreement, accuracy_level.LossSums]:
    """The working model against the float model's ``reference`` outputs on the first verification samples,
    one sample at a time (with ``losses_too``, also its KL from the float model and its next-token NLL).
    ``keep``: as ``each_first_output``'s; ``outputs``: the samples' outputs from elsewhere (the lm_head's tail)
    instead of running the working model."""
    assert conv.samples is not None
    feeds = conv.samples.verify[: len(reference)]
    agreement, losses = AgreementSums(), accuracy_level.LossSums()
    if outputs is None:
        outputs = each_first_output(conv.work, feeds, label, conv.show_progress, keep)
    for held, output, feed in zip(reference, outputs, feeds, strict=True):
        ref = held.restore()
        agreement.add(ref, output)
        if losses_too:
            losses.add(ref, output, feed)
    return agreement.result(), losses


def _auto_level_nodes(conv: Conversion, lm_head: bool = False) -> list[ir.Node]:
    """The MatMulNBits nodes whose level ``--accuracy-level auto`` decides: the W4 linears, or (``lm_head``) the
    lm_head's when ``--lm-head-accuracy-level`` is auto too: the one linear whose input no smoothing may have
    reached (``--no-smooth``, an unfoldable final norm), where level 4's int8 activations touch every logit."""
    recipe = conv.recipe
    if recipe.accuracy_level != "auto" or recipe.format != "contrib" or conv.smoothed is None:
        return []
    if lm_head and recipe.lm_head_accuracy_level != "auto":
        return []
    names = {p.name for p in conv.smoothed.plans if p.action in ("w4", "w8") and p.lm_head == lm_head}
    return accuracy_level.w4_nodes(conv.work.graph, names)


def report_parts(conv: Conversion) -> tuple[list[dict[str, Any]], list[LayerError]]:
    """The report's per-group records and per-layer errors (read back from the quantized graph)."""
    assert conv.smoothed is not None and conv.calib is not None
    alphas = {g.name: g.alpha for g in conv.smoothed.groups}
    stats, scales = conv.calib.absmax, conv.smoothed.scales
    groups = [
        group_record(g, stats[g.name], scales[g.name], alphas[g.name])
        for g in conv.analysis.groups
        if g.name in scales
    ]
    columns = {
        producer.name: producer_scales(g, scales[g.name])
        for g in conv.analysis.groups
        if g.name in scales
        for producer in g.fold_columns
    }
    errors = layer_errors(conv.work.graph, [p.linear for p in conv.plans], conv.calib.rows, scales, columns)
    return groups, errors


def join_linears(conv: Conversion) -> None:
    """``--join-linears``: the W4/W8 linears that share an input become one MatMulNBits and a Split
    (``passes.merge_matmulnbits``). Runs after verification and the report, which read per-linear nodes;
    the outputs are the same numbers."""
    if conv.recipe.join_linears and conv.recipe.format == "contrib" and conv.recipe.scheme == "w4":
        join = MergeSharedInputMatMulNBitsPass()
        ir.passes.Sequential(join, RemoveUnusedNodesPass())(conv.work)
        conv.result.joined_linears = join.merged


def use_nbits_a8_kernel(conv: Conversion) -> None:
    """W4 ``--kernels sq_onnx``: the 4-bit MatMulNBits left at level 4 become ``sq_onnx::MatMulNBitsA8``, which
    computes the same numbers (``passes.use_nbits_a8_kernel``). Runs last, after verification (at level 4, on
    stock ORT) and the joins; a linear that ``--accuracy-level auto`` kept at level 0 stays MatMulNBits."""
    if conv.recipe.kernels != "sq_onnx" or conv.recipe.scheme != "w4":
        return
    swap = UseNBitsA8KernelPass()
    swap(conv.work)
    conv.result.nbits_a8_kernels = {"swapped": swap.swapped, "kept": swap.kept}


def fuse_attention(conv: Conversion) -> None:
    """W4 ``--kernels sq_onnx``: each exported attention (MatMul, scale, mask, Softmax, MatMul) becomes
    ``sq_onnx::MaskedAttention``, which skips the keys a causal mask removes (``passes.fuse_masked_attention``;
    the same numbers to float rounding). CPU-only like MatMulNBitsA8, so W8A8's kernels (CUDA too) keep theirs."""
    if conv.recipe.kernels != "sq_onnx" or conv.recipe.scheme != "w4":
        return
    fuse = FuseMaskedAttentionPass()
    fuse(conv.work)
    conv.result.masked_attention = fuse.fused


def save(conv: Conversion, out: Path) -> None:
    """Recipe, version, calibration and verification into metadata_props; the file written atomically, with
    external data when asked or when the input had it."""
    work, recipe, result = conv.work, conv.recipe, conv.result
    assert work is not None
    work.metadata_props["sq_onnx.version"] = __version__
    work.metadata_props["sq_onnx.recipe"] = recipe.to_json()
    work.metadata_props["sq_onnx.calibration"] = json.dumps(result.calibration, sort_keys=True)
    work.metadata_props["sq_onnx.verify"] = json.dumps(result.verify, sort_keys=True)
    if result.alpha_search is not None:
        work.metadata_props["sq_onnx.alpha_search"] = json.dumps(result.alpha_search, sort_keys=True)
    if result.accuracy_level is not None:
        work.metadata_props["sq_onnx.accuracy_level"] = json.dumps(result.accuracy_level, sort_keys=True)
    if result.smoothing_check is not None:
        work.metadata_props["sq_onnx.smoothing_check"] = json.dumps(result.smoothing_check, sort_keys=True)
    keep_layout = conv.input_path is not None and has_external_tensors(conv.src)
    save_model(work, out, external_data=recipe.external_data or keep_layout)


def genai_folder(conv: Conversion, out: Path) -> None:
    """Make the output's folder an onnxruntime-genai folder when the input came with (or allows) a genai
    config: the config with the new file name, the tokenizer files, the custom-op library when the model
    needs it."""
    if conv.genai is None or conv.input_path is None:
        return
    config, origin = conv.genai
    if config is None:
        if is_language_model(conv.specs):
            conv.result.genai = {"written": [], "why_not": origin}
        return
    library = custom_ops.require_library() if conv.recipe.kernels == "sq_onnx" else None
    tokenizer = Path(conv.tokenizer) if conv.tokenizer is not None else None
    tokenizer = tokenizer.parent if tokenizer is not None and tokenizer.is_file() else tokenizer
    written = write_folder(config, conv.input_path.parent, out, library, tokenizer)
    conv.result.genai = {"written": written, "config": origin}


def held_out_feeds(
    recipe: Recipe, specs: list, model_path: Path | None, tokenizer: str | os.PathLike | None
) -> tuple[Feeds, str]:
    """Verification samples for the built-in calibration: held-out docs and code (``builtin_heldout_feeds``)."""
    if recipe.verify_samples == 0:
        return [], "none"
    feeds, origin = builtin_heldout_feeds(
        recipe.verify_samples, recipe.seq_len, find_tokenizer(model_path, tokenizer)
    )
    return [complete_feed(check_feed(f, specs), specs) for f in feeds], origin


def _weight_dtype(analysis: Analysis) -> str:
    """Name of the linears' weight dtype (the precision the smoothed weights are re-rounded to)."""
    dtype = analysis.linears[0].source.dtype if analysis.linears else None
    names = {ir.DataType.FLOAT16: "float16", ir.DataType.BFLOAT16: "bfloat16"}
    return names.get(dtype, "float32")


# The oldest onnxruntime that runs each non-default format: opset 21 with blocked int4 DequantizeLinear.
FORMAT_MIN_ORT = {"qdq": (1, 20), "qoperator": (1, 20)}


def _refuse_old_runtime(recipe: Recipe) -> None:
    """A format the installed onnxruntime cannot run would fail in verification, after all the work."""
    need = FORMAT_MIN_ORT.get(str(recipe.format))
    if need is None or recipe.scheme == "smooth":
        return
    import onnxruntime

    have = tuple(int(p) for p in re.findall(r"\d+", onnxruntime.__version__)[:2])
    if have < need:
        raise SqOnnxError(
            f"--format {recipe.format} writes opset-21 QDQ ops, which need onnxruntime >= {need[0]}.{need[1]}; "
            f"this is {onnxruntime.__version__}: upgrade it or use --format contrib."
        )


def _refuse_quantized(model: ir.Model) -> None:
    """Quantizing twice compounds the error silently; say so instead."""
    found = sorted({n.op_type for n in model.graph if n.op_type in QUANTIZED_OPS})
    if found:
        raise SqOnnxError(
            f"the model is already quantized (it contains {', '.join(found)}); convert the float model instead."
        )


def _split(feeds: Feeds, pool: int, verify: int) -> tuple[Feeds, Feeds, bool]:
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
