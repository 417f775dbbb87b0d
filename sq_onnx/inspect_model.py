"""What ``sq-onnx inspect`` reports: groups, consumers, skips with reasons, and each scheme's plan."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict
from typing import Any

from sq_onnx.model_io import load_model, weight_bytes
from sq_onnx.passes.analyze import analyze
from sq_onnx.plan import ACTION_LABELS, plan_linears
from sq_onnx.recipe import Recipe


def inspect_model(path: str | os.PathLike, recipe: Recipe | None = None) -> dict[str, Any]:
    """A JSON-able description of what conversion would do to the model at ``path``."""
    model = load_model(path)
    graph = model.graph
    analysis = analyze(graph)
    base = recipe or Recipe()
    schemes = {}
    for scheme in ("w4", "w8a8"):
        r = Recipe(**{**base.to_dict(), "scheme": scheme})
        plans = plan_linears(graph, analysis.linears, r)
        counts = Counter(ACTION_LABELS[p.action] for p in plans)
        schemes[scheme] = {
            "counts": dict(counts),
            "layers": [
                {"node": p.name, "action": ACTION_LABELS[p.action], "reason": p.reason, "lm_head": p.lm_head}
                for p in plans
            ],
        }
    return {
        "model": str(path),
        "opset": model.opset_imports.get("", None),
        "nodes": len(graph),
        "op_counts": dict(Counter(n.op_type for n in graph).most_common()),
        "weight_bytes": weight_bytes(model),
        "linears": len(analysis.linears),
        "groups": [
            {
                "tensor": g.name,
                "kind": g.kind,
                "producer": g.producer.name,
                "channels": g.channels,
                "consumers": [c.name for c in g.consumers],
            }
            for g in analysis.groups
        ],
        "skipped": [asdict(s) for s in analysis.skipped],
        "schemes": schemes,
    }


def render_inspection(info: dict[str, Any]) -> None:
    """Print the inspection as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{info['model']}[/]: opset {info['opset']}, {info['nodes']} nodes, "
        f"{info['weight_bytes'] / 1e6:.1f} MB of weights, {info['linears']} linear layers"
    )
    table = Table(title="Smoothing groups (norm -> linears, one shared scale each)")
    for col in ("tensor", "kind", "channels", "consumers"):
        table.add_column(col, overflow="fold")
    for g in info["groups"]:
        table.add_row(g["tensor"], g["kind"], str(g["channels"]), ", ".join(g["consumers"]))
    console.print(table)
    if info["skipped"]:
        table = Table(title="Not smoothable (quantized without smoothing)")
        for col in ("tensor", "consumers", "reason"):
            table.add_column(col, overflow="fold")
        for s in info["skipped"]:
            table.add_row(s["tensor"], ", ".join(s["consumers"]), s["reason"])
        console.print(table)
    table = Table(title="What each scheme quantizes")
    table.add_column("scheme")
    table.add_column("layers")
    for scheme, data in info["schemes"].items():
        table.add_row(scheme, ", ".join(f"{n} x {label}" for label, n in data["counts"].items()))
    console.print(table)
