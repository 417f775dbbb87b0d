"""Choose α from data. Two searches, both over the recipe's grid (0..1):

- ``model`` (SmoothQuant+): one α for the whole model, each candidate smoothed, quantized and run end to
  end in ORT, scored on the model's own loss (next-token cross-entropy for language models, output MSE
  against the float model otherwise), so error accumulated through the layers counts.
- ``layer`` (AWQ-like): per smoothing group, the α minimising ||XW − Q_x(X/s)·Q_w(sW)|| over a bounded
  sample of calibration rows, summed over the group's consumers. Vectorised numpy, no ORT runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir

from sq_onnx.lm.evaluate import token_nll
from sq_onnx.passes.analyze import Analysis, SmoothGroup
from sq_onnx.passes.smooth import tied_scales, weight_row_absmax
from sq_onnx.plan import LinearPlan
from sq_onnx.quant.blockwise import quantize_blockwise
from sq_onnx.quant.int8 import EPS, fake_dynamic_uint8, fake_per_channel, fake_per_token, fake_static
from sq_onnx.quantize_model import activation_ranges, quantize_graph, smooth_copy
from sq_onnx.recipe import Recipe
from sq_onnx.runtime.ort_session import in_memory_session
from sq_onnx.runtime.progress import track
from sq_onnx.verify import first_outputs

Feeds = list[dict[str, np.ndarray]]


def _loss_function(src: ir.Model, feeds: Feeds, show_progress: bool) -> tuple[str, Callable[[Any], float]]:
    """Cross-entropy when the model is a language model (input_ids -> logits over the vocabulary),
    else mean squared error against the float model's outputs."""
    if all("input_ids" in f for f in feeds):

        def cross_entropy(sess: Any) -> float:
            name = sess.get_outputs()[0].name
            nll = [token_nll(sess.run([name], f)[0][0], f["input_ids"][0]) for f in feeds]
            return float(np.concatenate(nll).mean())

        return "cross_entropy", cross_entropy
    reference = first_outputs(src, feeds, "float reference", show_progress)

    def mse(sess: Any) -> float:
        name = sess.get_outputs()[0].name
        errs = [np.mean((sess.run([name], f)[0] - ref) ** 2) for f, ref in zip(feeds, reference, strict=True)]
        return float(np.mean(errs))

    return "output_mse", mse


def search_alpha_model(
    src: ir.Model,
    analysis: Analysis,
    plans: list[LinearPlan],
    recipe: Recipe,
    stats: dict[str, np.ndarray],
    feeds: Feeds,
    show_progress: bool = False,
) -> tuple[float, dict[str, Any]]:
    """Return the best α and the search record {loss, unsmoothed, curve: [{alpha, loss}]}; each candidate
    smooths and quantizes its own copy of ``src`` (``analysis`` and ``plans`` found on ``src``)."""
    kind, loss_of = _loss_function(src, feeds, show_progress)
    fixed = replace(recipe, alpha_search="none", gptq=False)  # candidates: the fast quantizer

    def score(alpha: float | None) -> float:
        smoothed = smooth_copy(src, analysis, plans, stats, alpha)
        inputs = activation_ranges(recipe, stats, smoothed)
        quantize_graph(smoothed.model, fixed, smoothed.plans, static_ranges=inputs)
        with in_memory_session(smoothed.model) as sess:
            return loss_of(sess)

    curve = []
    for alpha in track(
        recipe.alpha_grid(), "searching alpha", total=len(recipe.alpha_grid()), enabled=show_progress
    ):
        curve.append({"alpha": alpha, "loss": score(alpha)})
    best = min(curve, key=lambda c: c["loss"])
    return best["alpha"], {"method": "model", "loss": kind, "samples": len(feeds), "curve": curve}


def _fake_quant_weight(w: np.ndarray, action: str, recipe: Recipe) -> np.ndarray:
    """What the kernel will see for a [K, N] weight under the plan's action."""
    if action in ("w4", "w8"):
        return quantize_blockwise(
            w, 4 if action == "w4" else 8, recipe.block_size, recipe.symmetric
        ).dequantize()
    if action == "w8a8":
        return fake_per_channel(w)
    return w


def _fake_quant_rows(x: np.ndarray, action: str, act: str, static_absmax: float) -> np.ndarray:
    """W8A8 activations as the kernel will see them (per token; one dynamic range over the tensor; or the
    calibrated static range of the smoothed tensor, ``static_absmax``); weight-only schemes see X unchanged."""
    if action != "w8a8":
        return x
    if act == "static":
        return fake_static(x, max(static_absmax, EPS) / 127.0)
    return fake_dynamic_uint8(x) if act == "per-tensor" else fake_per_token(x)


def group_error(
    group: SmoothGroup,
    x: np.ndarray,
    act_absmax: np.ndarray,
    alpha: float,
    actions: dict[str, str],
    recipe: Recipe,
    cache: dict | None = None,
) -> float:
    """Relative output error of the group's consumers at this α: ||XW − Q(X/s)·Q(sW)||² / ||XW||².
    ``cache`` (one dict per group and row sample) keeps the α-independent parts between calls."""
    cache = {} if cache is None else cache
    if not cache:
        cache["weights"] = [c.weight_kn().astype(np.float32) for c in group.consumers]
        cache["w_absmax"] = weight_row_absmax(group)
        cache["refs"] = [x @ w for w in cache["weights"]]
    s = tied_scales(group, act_absmax, cache["w_absmax"], alpha)
    xs = x / s
    static_absmax = float(np.max(act_absmax / s))  # the range the static quantizer will calibrate
    num = den = 0.0
    for consumer, w, ref in zip(group.consumers, cache["weights"], cache["refs"], strict=True):
        action = actions.get(consumer.name, "keep")
        rows = _fake_quant_rows(xs, action, recipe.act, static_absmax)
        out = rows @ _fake_quant_weight(w * s[:, None], action, recipe)
        num += float(np.sum((ref - out) ** 2))
        den += float(np.sum(ref**2))
    return num / den if den > 0 else 0.0


def search_alpha_layer(
    groups: list[SmoothGroup],
    plans: list[LinearPlan],
    stats: dict[str, np.ndarray],
    rows: dict[str, np.ndarray],
    recipe: Recipe,
    show_progress: bool = False,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-group best α on sampled rows; returns ({tensor: α}, record with each group's error curve)."""
    actions = {p.name: p.action for p in plans}
    grid = recipe.alpha_grid()
    chosen: dict[str, float] = {}
    record = []
    for group in track(groups, "searching alpha per group", total=len(groups), enabled=show_progress):
        x = rows[group.name]
        cache: dict = {}
        errors = [group_error(group, x, stats[group.name], a, actions, recipe, cache) for a in grid]
        best = int(np.argmin(errors))
        chosen[group.name] = grid[best]
        record.append({"group": group.name, "alpha": grid[best], "error": errors[best], "curve": errors})
    return chosen, {
        "method": "layer",
        "rows": int(min(len(r) for r in rows.values())) if rows else 0,
        "grid": grid,
        "groups": record,
    }
