"""Old opsets: the ops a recipe emits need a minimum default-domain opset; upgrade the model when that is
provably safe (onnx's version converter succeeds and the upgraded float model computes the same outputs
in ONNX Runtime), otherwise say what to do instead."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir

from sq_onnx.errors import SqOnnxError
from sq_onnx.recipe import Recipe
from sq_onnx.verify import compare, first_outputs

# Round (per-token activation quantization) is opset 11; QuantizeLinear (static) is opset 10.
# The upgrade goes to 13, the oldest opset every current exporter and runtime treats as a baseline.
UPGRADE_TARGET = 13
QDQ_OPSET = 21
SAME_FUNCTION = 1e-6


class OpsetError(SqOnnxError):
    """The model's opset is too old for the emitted ops and cannot be upgraded safely."""


def required_opset(recipe: Recipe) -> int:
    """The oldest default-domain opset the recipe's emitted ops exist in (contrib ops need none)."""
    if recipe.format in ("qdq", "qoperator") and recipe.scheme != "smooth":
        return QDQ_OPSET  # blocked DequantizeLinear (int4 / uint4 and block_size) is opset 21
    if recipe.scheme == "w8a8" and recipe.act == "per-token":
        return 11
    if recipe.scheme == "w8a8" and recipe.act == "static":
        return 10
    return 1


def upgrade_if_needed(
    model: ir.Model, recipe: Recipe, feed: dict[str, np.ndarray] | None
) -> tuple[ir.Model, dict[str, Any] | None]:
    """``model`` itself when its opset suffices; else an upgraded copy and a record of the upgrade."""
    have = model.opset_imports.get("", 1)
    need = required_opset(recipe)
    if have >= need:
        return model, None
    written = f"--format {recipe.format}" if recipe.format != "contrib" else f"--act {recipe.act}"
    advice = f"the model uses opset {have}, but {recipe.scheme} with {written} emits ops from opset {need}"
    try:
        from onnx import version_converter

        upgraded = ir.from_proto(
            version_converter.convert_version(ir.to_proto(model), max(need, UPGRADE_TARGET))
        )
        _reattach_weights(model, upgraded)
        _reattach_node_metadata(model, upgraded)
        error = (
            compare(
                first_outputs(model, [feed], "opset", False), first_outputs(upgraded, [feed], "opset", False)
            ).relative_error
            if feed is not None
            else None
        )
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise OpsetError(
            f"{advice}, and onnx's version converter cannot upgrade it ({reason}); re-export the model at "
            f"opset {max(need, UPGRADE_TARGET)} or newer{_other_choice(recipe)}."
        ) from None
    if error is not None and not error < SAME_FUNCTION:
        raise OpsetError(
            f"{advice}; the upgraded model computes different outputs (relative error {error:.2e}), so it "
            f"was not used; re-export the model at opset {max(need, UPGRADE_TARGET)} or newer{_other_choice(recipe)}."
        )
    return upgraded, {"from": have, "to": max(need, UPGRADE_TARGET), "checked_relative_error": error}


def _other_choice(recipe: Recipe) -> str:
    """What the user can ask instead of an upgrade."""
    return ", or use --format contrib" if recipe.format != "contrib" else ", or use --act per-tensor"


def _reattach_weights(original: ir.Model, upgraded: ir.Model) -> None:
    """The round trip through protobuf loses where external data lives: point the upgraded graph's
    initializers back at the original (lazy) tensors."""
    for name, value in upgraded.graph.initializers.items():
        source = original.graph.initializers.get(name)
        if source is not None and source.const_value is not None:
            value.const_value = source.const_value


def _reattach_node_metadata(original: ir.Model, upgraded: ir.Model) -> None:
    """The version converter drops the nodes' metadata, where torch.onnx records each node's module path
    (what ``--exclude`` and the report read): copy it back by node name."""
    by_name = {node.name: node for node in original.graph if node.name}
    for node in upgraded.graph:
        old = by_name.get(node.name or "")
        if old is not None and old.op_type == node.op_type:
            for key, value in old.metadata_props.items():
                node.metadata_props.setdefault(key, value)
