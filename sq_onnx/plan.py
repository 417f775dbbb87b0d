"""Decide, per linear layer, what a recipe does to it. Shared by ``convert`` and ``inspect``."""

from __future__ import annotations

import re
from dataclasses import dataclass

import onnx_ir as ir

from sq_onnx.errors import RecipeError
from sq_onnx.passes.analyze import Analysis, Skip
from sq_onnx.passes.linears import Linear, is_lm_head
from sq_onnx.recipe import Recipe


@dataclass(frozen=True)
class LinearPlan:
    linear: Linear
    action: str  # "w4", "w8" (weight-only 8-bit), "w8a8", "keep"
    reason: str  # why kept, or "" when quantized
    lm_head: bool

    @property
    def name(self) -> str:
        return self.linear.name

    def carried_over(self, nodes: dict[ir.Node, ir.Node]) -> LinearPlan:
        """The same plan for the linear's counterpart in a copy of the graph."""
        return LinearPlan(Linear(nodes[self.linear.node]), self.action, self.reason, self.lm_head)


def matching_pattern(linear: Linear, patterns: tuple[str, ...]) -> str | None:
    """The first pattern that matches the node, weight or module name (torch.onnx names weights val_N, so
    the module path, e.g. model.layers.3.mlp.down_proj, is what a user knows)."""
    names = (linear.name, linear.weight_name, linear.module)
    for pattern in patterns:
        if any(re.search(pattern, name) for name in names):
            return pattern
    return None


def plan_linears(graph: ir.Graph, linears: list[Linear], recipe: Recipe) -> list[LinearPlan]:
    """One decision per linear: how the recipe's scheme, --lm-head and --exclude apply to it."""
    plans = []
    for lin in linears:
        head = is_lm_head(lin, graph)
        pattern = matching_pattern(lin, recipe.exclude)
        if recipe.scheme == "smooth":
            plans.append(LinearPlan(lin, "keep", "scheme smooth keeps float weights", head))
        elif pattern is not None:
            plans.append(LinearPlan(lin, "keep", f"excluded by --exclude {pattern!r}", head))
        elif head and recipe.lm_head == "fp":
            plans.append(LinearPlan(lin, "keep", "lm_head kept in float (--lm-head fp)", head))
        elif head and recipe.lm_head == "4":
            plans.append(LinearPlan(lin, "w4", "", head))
        elif head and recipe.lm_head == "8":
            # weight-only 8-bit MatMulNBits in both schemes: on CPU its int8 kernel (accuracy_level 4)
            # decodes ~7x faster than MatMulIntegerToFloat on a vocabulary-sized matrix (docs/EXPERIMENTS.md)
            plans.append(LinearPlan(lin, "w8", "", head))
        else:
            plans.append(LinearPlan(lin, "w4" if recipe.scheme == "w4" else "w8a8", "", head))
    if recipe.act16 and not act16_linears(plans, recipe):
        raise RecipeError(f"--act16 {' '.join(recipe.act16)} matches no linear that W8A8 quantizes.")
    return plans


def act16_linears(plans: list[LinearPlan], recipe: Recipe) -> frozenset[str]:
    """Names of the W8A8 linears whose input ``--act16`` quantizes to int16."""
    return frozenset(
        p.linear.name for p in plans if p.action == "w8a8" and matching_pattern(p.linear, recipe.act16)
    )


ACTION_LABELS = {
    "w4": "MatMulNBits 4-bit",
    "w8": "MatMulNBits 8-bit",
    "w8a8": "int8 W8A8",
    "keep": "float",
}


def without_act16_groups(analysis: Analysis, plans: list[LinearPlan], recipe: Recipe) -> Analysis:
    """``analysis`` less the groups whose every linear takes 16-bit activations (``--act16``): their inputs
    need no smoothing, and migrating the activations' range into the int8 weights would only cost accuracy."""
    wide = act16_linears(plans, recipe)
    if not wide:
        return analysis
    kept, skipped = [], list(analysis.skipped)
    for group in analysis.groups:
        if all(c.name in wide for c in group.consumers):
            reason = "its linears take 16-bit activations (--act16): nothing to migrate into their weights"
            skipped.append(Skip(group.name, [c.name for c in group.consumers], reason))
        else:
            kept.append(group)
    return Analysis(analysis.linears, kept, skipped)
