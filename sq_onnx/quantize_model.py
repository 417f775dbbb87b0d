"""Smooth and quantize a copy of a model: the step that convert runs once and α search runs per candidate."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass, TopologicalSortPass

from sq_onnx.model_io import copy_model
from sq_onnx.passes.graph_edit import ensure_opset
from sq_onnx.passes.linears import Linear, find_linears
from sq_onnx.passes.quantize_w4 import QuantizeWeightsPass, WeightBatch, quantize_weight
from sq_onnx.passes.quantize_w8a8 import QuantizeW8A8Pass
from sq_onnx.passes.smooth import SmoothPass
from sq_onnx.plan import LinearPlan, plan_linears
from sq_onnx.progress import track
from sq_onnx.quant.blockwise import BlockQuantized
from sq_onnx.recipe import Recipe

# Most float64 bytes of weight that one GPTQ pass quantizes at once when linears share an input.
SHARED_WEIGHT_BYTES = 1 << 28


def smooth_copy(
    src: ir.Model, stats: dict[str, np.ndarray], alpha: float | dict[str, float] | None
) -> tuple[ir.Model, list[dict[str, Any]], dict[str, np.ndarray]]:
    """A copy of ``src`` with every foldable group smoothed (``alpha`` None: an unsmoothed copy): the
    model, one record per group and the scales (group tensor -> s)."""
    work = copy_model(src)
    if alpha is None:
        return work, [], {}
    smooth = SmoothPass(stats, alpha)
    smooth(work)
    return work, [asdict(d) for d in smooth.smoothed], smooth.scales


def input_importance(
    mean_square: dict[str, np.ndarray], scales: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per-channel E[x²] of each linear's input as the quantizer sees it (after dividing by s)."""
    return {name: ms / np.square(scales[name]) if name in scales else ms for name, ms in mean_square.items()}


def quantize_graph(
    work: ir.Model,
    recipe: Recipe,
    static_ranges: dict[str, float] | None = None,
    show_progress: bool = False,
    importance: dict[str, np.ndarray] | None = None,
    hessians: Callable[[str], np.ndarray] | None = None,
    weight_target: Callable[[np.ndarray], np.ndarray] | None = None,
    held_out_loss: Callable[[np.ndarray, np.ndarray], float] | None = None,
) -> list[str]:
    """Quantize ``work`` in place according to the recipe's plan; returns the replaced node names.
    ``hessians``: input tensor name -> XᵀX as the quantizer sees it, for GPTQ (W4/W8 weight-only).
    ``weight_target``: a batch's joined [K, N] weight -> the weight GPTQ fits instead, called right after
    that batch's Hessian (``SequentialHessians.float_target``). ``held_out_loss(W, Ŵ)``: a batch keeps
    GPTQ's weights only where they beat round-to-nearest with the clip search on samples GPTQ never saw
    (``SequentialHessians.held_out_loss``); the batches that fell back are named in ``work``'s metadata."""
    plans = plan_linears(work.graph, find_linears(work.graph), recipe)
    ensure_opset(work, "com.microsoft", 1)
    fell_back: list[str] = []

    def quantize(batch: WeightBatch, original: np.ndarray) -> BlockQuantized:
        name = batch.linears[0].input.name or ""
        hessian = hessians(name) if hessians is not None else None
        joined = weight_target(original) if weight_target is not None else original
        bq = quantize_weight(
            joined,
            batch.bits,
            recipe.block_size,
            recipe.symmetric,
            clip_search=recipe.clip_search,
            importance=(importance or {}).get(name),
            hessian=hessian,
            act_order=recipe.act_order,
            refine_rounds=recipe.gptq_refine,
            damp=recipe.gptq_damp,
        )
        if held_out_loss is not None and hessian is not None:
            plain = quantize_weight(
                original,
                batch.bits,
                recipe.block_size,
                recipe.symmetric,
                clip_search=True,
                importance=np.diag(hessian),
            )
            if held_out_loss(original, plain.dequantize()) < held_out_loss(original, bq.dequantize()):
                bq = plain
                fell_back.append(name)
        return bq

    batches = [
        WeightBatch(
            [p.linear for p in batch],
            4 if batch[0].action == "w4" else 8,
            recipe.lm_head_accuracy_level if batch[0].lm_head else recipe.accuracy_level,
        )
        for batch in weight_batches(plans, together=hessians is not None)
    ]
    weights = QuantizeWeightsPass(
        batches, quantize, lambda b: track(b, "quantizing", total=len(batches), enabled=show_progress)
    )
    w8a8 = QuantizeW8A8Pass(
        [p.linear for p in plans if p.action == "w8a8"], recipe.act, static_ranges, recipe.kernels
    )
    ir.passes.Sequential(weights, w8a8, *CLEANUP)(work)
    if held_out_loss is not None:
        work.metadata_props["sq_onnx.gptq_fell_back"] = json.dumps(fell_back)
    return weights.replaced + w8a8.replaced


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


def gptq_batches(work: ir.Model, recipe: Recipe) -> list[list[Linear]]:
    """The linears of each batch ``quantize_graph`` will hand to GPTQ, in the order it will."""
    plans = plan_linears(work.graph, find_linears(work.graph), recipe)
    return [[p.linear for p in batch] for batch in weight_batches(plans, together=True)]


def _float64_bytes(plans: list[LinearPlan]) -> int:
    """Bytes of the joined [K, ΣN] float64 weight GPTQ would work on."""
    return 8 * plans[0].linear.shape[0] * sum(p.linear.shape[1] for p in plans)


# Drop constants and nodes nobody uses any more, and keep the graph topologically sorted.
CLEANUP = (RemoveUnusedNodesPass(), TopologicalSortPass())


def cleanup(work: ir.Model) -> None:
    """``CLEANUP`` on its own (the smooth scheme quantizes nothing)."""
    ir.passes.Sequential(*CLEANUP)(work)


def static_ranges(stats: dict[str, np.ndarray], smoothed: list[dict[str, Any]]) -> dict[str, float]:
    """Per-tensor activation abs-max after smoothing: max_j(absmax_j / s_j) for smoothed tensors."""
    after = {g["name"]: g["act_absmax_after"] for g in smoothed}
    return {name: after.get(name, float(arr.max())) for name, arr in stats.items()}
