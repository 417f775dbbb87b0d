"""Smooth and quantize a copy of a model: the step that convert runs once and α search runs per candidate."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from sq_onnx.calibration.gptq_method import batch_grams
from sq_onnx.calibration.segment_runner import SegmentInputs
from sq_onnx.passes.analyze import Analysis
from sq_onnx.passes.fuse_norm_quant import FuseNormQuantPass, Refusal
from sq_onnx.passes.graph_edit import corresponding_nodes, ensure_opset
from sq_onnx.passes.linears import Linear, find_linears
from sq_onnx.passes.quantize_embedding import QuantizeEmbeddingPass
from sq_onnx.passes.quantize_qdq import QuantizeW8A8QDQPass, emit_blocked_dq
from sq_onnx.passes.quantize_w4 import QuantizeWeightsPass, WeightBatch, emit_matmulnbits, quantize_weight
from sq_onnx.passes.quantize_w8a8 import QuantizeW8A8Pass
from sq_onnx.passes.smooth import SmoothedGroup, SmoothPass
from sq_onnx.plan import LinearPlan, act16_linears, plan_linears
from sq_onnx.quant.blockwise import BlockQuantized
from sq_onnx.recipe import Recipe
from sq_onnx.runtime.device import gptq_device
from sq_onnx.runtime.model_io import copy_model
from sq_onnx.runtime.progress import track

# Most float64 bytes of weight that one GPTQ pass quantizes at once when linears share an input.
SHARED_WEIGHT_BYTES = 1 << 28
# Most float64 bytes of one weight's columns that GPTQ works on at once (``by_columns``).
COLUMN_BYTES = 1 << 26


@dataclass(frozen=True)
class Smoothed:
    """A smoothed copy of the model: the conversion's plans carried over to it, one record per smoothed
    group and the scales (group tensor -> s)."""

    model: ir.Model
    plans: list[LinearPlan]
    groups: list[SmoothedGroup]
    scales: dict[str, np.ndarray]


def smooth_copy(
    src: ir.Model,
    analysis: Analysis,
    plans: list[LinearPlan],
    stats: dict[str, np.ndarray],
    alpha: float | dict[str, float] | None,
) -> Smoothed:
    """A copy of ``src`` with every group of ``analysis`` (found on ``src``) smoothed; ``alpha`` None: an
    unsmoothed copy. The copy shares the unchanged weights with ``src``."""
    work = copy_model(src)
    nodes = corresponding_nodes(src.graph, work.graph)
    work_plans = [p.carried_over(nodes) for p in plans]
    if alpha is None:
        return Smoothed(work, work_plans, [], {})
    smooth = SmoothPass(analysis.carried_over(nodes).groups, stats, alpha)
    smooth(work)
    return Smoothed(work, work_plans, smooth.smoothed, smooth.scales)


def input_importance(
    mean_square: dict[str, np.ndarray], scales: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per-channel E[x²] of each linear's input as the quantizer sees it (after dividing by s)."""
    return {name: ms / np.square(scales[name]) if name in scales else ms for name, ms in mean_square.items()}


@dataclass(frozen=True)
class Quantized:
    """What ``quantize_graph`` replaced, the batches (by input tensor) where the held-out check kept
    round-to-nearest over GPTQ (None when there was no check), and for the sq_onnx kernels how many norms
    were fused with their quantization and which were not, with why."""

    replaced: list[str]
    fell_back: list[str] | None = None
    embeddings: list[str] = field(default_factory=list)
    fused_norms: int = 0
    unfused_norms: list[Refusal] = field(default_factory=list)


def quantize_graph(
    work: ir.Model,
    recipe: Recipe,
    plans: list[LinearPlan] | None = None,
    static_ranges: dict[str, float] | None = None,
    show_progress: bool = False,
    importance: dict[str, np.ndarray] | None = None,
    hessians: Callable[[str], np.ndarray] | None = None,
    segments: Iterable[SegmentInputs] | None = None,
) -> Quantized:
    """Quantize ``work`` in place according to ``plans`` (made on this graph; None: planned here).

    GPTQ takes its Hessians from ``hessians`` (input tensor name -> XᵀX, computed on the float model) or,
    sequentially, from ``segments`` (a ``SegmentRunner`` over ``work`` for ``gptq_batches``): each step is
    taken after the batches before it are quantized, so every Hessian sees the quantized layers upstream.
    With a float copy in the runner and ``recipe.gptq_asymmetric`` GPTQ fits the float target; with
    ``recipe.gptq_holdout`` a batch keeps GPTQ's weights only where they beat round-to-nearest with the clip
    search on the held-out samples."""
    plans = plans if plans is not None else plan_linears(work.graph, find_linears(work.graph), recipe)
    ensure_opset(work, "com.microsoft", 1)
    steps = iter(segments) if segments is not None else None
    fell_back: list[str] | None = [] if steps is not None and recipe.gptq_holdout else None
    heads = {p.linear.node for p in plans if p.lm_head}

    def quantize(batch: WeightBatch, original: np.ndarray) -> BlockQuantized:
        name = batch.linears[0].input.name or ""
        grid = (recipe.block_size, recipe.symmetric)
        rounding = dict(clip_search=recipe.clip_search, importance=(importance or {}).get(name))
        fitted_by_gptq = recipe.gptq_fits(batch.linears[0].node in heads)  # else no step was planned for it
        if not fitted_by_gptq or (steps is None and hessians is None):
            return quantize_weight(original, batch.bits, *grid, **rounding)
        device = gptq_device()
        level4 = recipe.gptq_int8_inputs and recipe.aimed_accuracy_level(batch.linears[0].node in heads) == 4
        int8_block = recipe.block_size if level4 else None
        grams = (
            batch_grams(_step_for(steps, name), recipe.gptq_holdout, int8_block, original, device)
            if steps is not None
            else None
        )
        hessian = grams.hessian if grams is not None else hessians(name)  # type: ignore[misc]
        gptq = dict(
            act_order=recipe.act_order, refine_rounds=recipe.gptq_refine, damp=recipe.gptq_damp, device=device
        )

        def fitted(w: np.ndarray, columns: slice) -> BlockQuantized:
            target = (
                grams.target(w, recipe.gptq_target_ridge, columns)
                if grams is not None and recipe.gptq_asymmetric
                else w
            )
            return quantize_weight(target, batch.bits, *grid, **rounding, hessian=hessian, **gptq)

        bq = by_columns(original, fitted)
        if fell_back is not None and grams is not None and grams.held is not None:
            plain = quantize_weight(
                original, batch.bits, *grid, clip_search=True, importance=np.diag(hessian)
            )
            if grams.held_out_loss(original, plain.dequantize()) < grams.held_out_loss(
                original, bq.dequantize()
            ):
                bq = plain
                fell_back.append(name)
        return bq

    together = hessians is not None or segments is not None
    batches = [
        WeightBatch(
            [p.linear for p in batch],
            4 if batch[0].action == "w4" else 8,
            recipe.written_lm_head_accuracy_level if batch[0].lm_head else recipe.written_accuracy_level,
        )
        for batch in weight_batches(plans, together=together)
    ]
    weights = QuantizeWeightsPass(
        batches,
        quantize,
        lambda b: track(b, "quantizing", total=len(batches), enabled=show_progress),
        emit=emit_matmulnbits if recipe.format == "contrib" else emit_blocked_dq,
    )
    w8a8_linears = [p.linear for p in plans if p.action == "w8a8"]
    w8a8: QuantizeW8A8Pass | QuantizeW8A8QDQPass
    if recipe.format == "contrib":
        w8a8 = QuantizeW8A8Pass(w8a8_linears, recipe.act, static_ranges, recipe.kernels)
    else:
        w8a8 = QuantizeW8A8QDQPass(
            w8a8_linears,
            static_ranges or {},
            qoperator=recipe.format == "qoperator",
            wide=act16_linears(plans, recipe),
        )
    fuse = [FuseNormQuantPass()] if recipe.kernels == "sq_onnx" and w8a8_linears else []
    # GatherBlockQuantized is a contrib op: QDQ / QOperator models keep their embedding in float
    quantize_embedding = recipe.embedding != "fp" and recipe.format == "contrib"
    embed = [QuantizeEmbeddingPass(int(recipe.embedding), recipe.block_size)] if quantize_embedding else []
    ir.passes.Sequential(weights, w8a8, *embed, *fuse, *CLEANUP)(work)
    if recipe.format != "contrib" and not any(n.domain == "com.microsoft" for n in work.graph):
        work.opset_imports.pop("com.microsoft", None)  # standard ops only: nothing else to declare
    fusions = dict(fused_norms=fuse[0].fused, unfused_norms=fuse[0].refused) if fuse else {}
    embeddings = embed[0].replaced if embed else []
    return Quantized(weights.replaced + w8a8.replaced, fell_back, embeddings=embeddings, **fusions)


def by_columns(w: np.ndarray, fit: Callable[[np.ndarray, slice], BlockQuantized]) -> BlockQuantized:
    """``fit(columns of w, their slice)`` over column slices of a [K, N] weight at most COLUMN_BYTES of
    float64 wide (and at least 4K columns), joined: GPTQ and the float target treat output columns independently, so the result is the
    same while the working arrays (float64 copies, codes, gradients) stay bounded. A vocabulary projection
    (576 x 49152 on SmolLM2, 896 x 151936 on Qwen2.5-0.5B) was the conversion's memory peak without it."""
    k, n = w.shape
    step = max(COLUMN_BYTES // (8 * k), 4 * k, 1)
    if n <= step:
        return fit(w, slice(None))
    return BlockQuantized.joined(
        [fit(w[:, lo : lo + step], slice(lo, lo + step)) for lo in range(0, n, step)]
    )


def _step_for(steps: Iterator[SegmentInputs], name: str) -> SegmentInputs:
    """The runner's next step, which must be the one for the batch reading ``name``."""
    step = next(steps, None)
    if step is None or step.target != name:
        raise RuntimeError(
            f"the segment runner gave {step.target if step else 'nothing'!r}, expected {name!r}"
        )
    return step


def weight_batches(plans: list[LinearPlan], together: bool) -> list[list[LinearPlan]]:
    """The weight-only (w4/w8) plans in order, one per batch; with ``together`` (GPTQ), linears that read the same
    tensor with the same bits share a batch, up to ``SHARED_WEIGHT_BYTES``. They share that tensor's
    Hessian and GPTQ treats output channels independently, so one pass over their concatenated columns
    gives each the result it would get alone (to float rounding) with one inverse and one loop, not
    one per linear (q/k/v, gate/up)."""
    batches: list[list[LinearPlan]] = []
    latest: dict[tuple[str, str, bool], list[LinearPlan]] = {}  # the batch still open per input
    for p in plans:
        if p.action not in ("w4", "w8"):
            continue
        key = (p.linear.input.name, p.action, p.lm_head)
        batch = latest.get(key)
        if together and batch is not None and _float64_bytes([*batch, p]) <= SHARED_WEIGHT_BYTES:
            batch.append(p)
        else:
            latest[key] = [p]
            batches.append(latest[key])
    return batches


def gptq_batches(work: ir.Model, recipe: Recipe, plans: list[LinearPlan] | None = None) -> list[list[Linear]]:
    """The linears of each batch ``quantize_graph`` will hand to GPTQ, in the order it will."""
    plans = plans if plans is not None else plan_linears(work.graph, find_linears(work.graph), recipe)
    batches = weight_batches(plans, together=True)
    return [[p.linear for p in b] for b in batches if recipe.gptq_fits(b[0].lm_head)]


def _float64_bytes(plans: list[LinearPlan]) -> int:
    """Bytes of the joined [K, ΣN] float64 weight GPTQ would work on."""
    return 8 * plans[0].linear.shape[0] * sum(p.linear.shape[1] for p in plans)


# Drop constants and nodes nobody uses any more, and keep the graph topologically sorted.
CLEANUP = (RemoveUnusedNodesPass(), TopologicalSortPass())


def cleanup(work: ir.Model) -> None:
    """``CLEANUP`` on its own (the smooth scheme quantizes nothing)."""
    ir.passes.Sequential(*CLEANUP)(work)


def static_ranges(stats: dict[str, np.ndarray], smoothed: list[SmoothedGroup]) -> dict[str, float]:
    """Per-tensor activation abs-max after smoothing: max_j(absmax_j / s_j) for smoothed tensors."""
    after = {g.name: g.act_absmax_after for g in smoothed}
    return {name: after.get(name, float(arr.max())) for name, arr in stats.items()}


def activation_ranges(
    recipe: Recipe, stats: dict[str, np.ndarray], smoothed: Smoothed
) -> dict[str, float] | None:
    """The calibrated per-tensor ranges the recipe's W8A8 form needs (--act static), else None."""
    return static_ranges(stats, smoothed.groups) if recipe.act == "static" else None
