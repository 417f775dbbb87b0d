"""``--keep-8bit N``: mixed precision under a budget, measured rather than by name.

Each W4 linear's 4-bit weight (round-to-nearest with the clip search, on the smoothed weights) is scored on
calibration rows by its relative output error ||X W − X Ŵ||² / ||X W||², the share of that layer's output the
4-bit weight loses, divided by the bytes that 8 bits would add. The N linears with the highest score get
8-bit weights (MatMulNBits bits 8, same blocks): the most error removed per byte spent. 8-bit weights lose
about 1/256 of the 4-bit error, so the score is what the promotion buys.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from sq_onnx.passes.quantize_w4 import quantize_weight
from sq_onnx.plan import LinearPlan
from sq_onnx.recipe import Recipe


@dataclass(frozen=True)
class LayerCost:
    """One W4 linear: its 4-bit relative output error on the rows, and the bytes 8 bits would add."""

    name: str
    relative_error: float
    extra_bytes: int

    @property
    def error_per_mb(self) -> float:
        return self.relative_error / (self.extra_bytes / 1e6)


def layer_costs(
    plans: list[LinearPlan], rows: dict[str, np.ndarray], scales: dict[str, np.ndarray], recipe: Recipe
) -> list[LayerCost]:
    """The cost of every W4 linear (not the lm_head) whose input has calibration rows, worst per byte first.
    ``rows`` are the original model's; ``scales`` the smoothing s of each smoothed tensor."""
    costs = []
    for plan in plans:
        if plan.action != "w4" or plan.lm_head:
            continue
        x = rows.get(plan.linear.input.name or "")
        if x is None:
            continue
        s = scales.get(plan.linear.input.name or "")
        xs = (x / s if s is not None else x).astype(np.float32)
        w = plan.linear.weight_kn().astype(np.float32)
        bq = quantize_weight(w, 4, recipe.block_size, recipe.symmetric, clip_search=recipe.clip_search)
        ref = xs @ w
        err = float(np.square(xs @ bq.dequantize() - ref).sum() / max(float(np.square(ref).sum()), 1e-30))
        plan.linear.release()
        k, n = w.shape
        costs.append(LayerCost(plan.name, err, k * n // 2))
    return sorted(costs, key=lambda c: c.error_per_mb, reverse=True)


def promote(plans: list[LinearPlan], names: set[str]) -> list[LinearPlan]:
    """``plans`` with the named W4 linears turned into 8-bit weight-only ones."""
    return [
        replace(p, action="w8", reason="8-bit by --keep-8bit (most 4-bit error per byte)")
        if p.name in names
        else p
        for p in plans
    ]
