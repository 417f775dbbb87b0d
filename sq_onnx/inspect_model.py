"""What ``sq-onnx inspect`` reports: groups, consumers, skips with reasons, and each scheme's plan."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np

from sq_onnx.calibration.calibrate import calibrate
from sq_onnx.calibration.calibration_data import load_calibration
from sq_onnx.passes.analyze import analyze
from sq_onnx.passes.fuse_norm_quant import FuseNormQuantPass, fusion_record
from sq_onnx.passes.linears import Linear
from sq_onnx.passes.quantize_w8a8_custom import per_token_inputs
from sq_onnx.plan import ACTION_LABELS, plan_linears
from sq_onnx.recipe import Recipe
from sq_onnx.runtime.model_inputs import input_specs
from sq_onnx.runtime.model_io import load_model, weight_bytes

TOP_OUTLIERS = 5
USE_BUILTIN = "builtin"


def group_outliers(absmax: np.ndarray, top: int = TOP_OUTLIERS) -> dict[str, Any]:
    """The largest channels of one group's calibrated abs-max, and how far they stand above the median."""
    order = np.argsort(absmax)[::-1][:top]
    median = float(np.median(absmax))
    return {
        "median_absmax": median,
        "top": [
            {
                "channel": int(c),
                "absmax": float(absmax[c]),
                "x_median": float(absmax[c] / median) if median > 0 else None,
            }
            for c in order
        ],
    }


def _calibrated_outliers(
    path: str | os.PathLike,
    model: Any,
    groups: list[Any],
    calib: Any,
    tokenizer: str | os.PathLike | None,
    samples: int,
    seq_len: int,
) -> dict[str, Any]:
    """Run the calibration data through the float model once and rank each group's channels."""
    feeds, origin = load_calibration(
        None if calib == USE_BUILTIN else calib,
        input_specs(model),
        model_path=path,
        tokenizer_dir=tokenizer,
        count=samples,
        seq_len=seq_len,
    )
    stats = calibrate(model, {g.name: g.channels for g in groups}, feeds, show_progress=False).absmax
    return {
        "source": origin,
        "samples": len(feeds),
        "groups": {g.name: group_outliers(stats[g.name]) for g in groups},
    }


def fusion_preview(model: Any, linears: list[Linear]) -> dict[str, Any]:
    """What ``--kernels sq_onnx`` would fuse, without quantizing a weight: each linear is pointed at the
    per-token quantization of its input, as the real pass leaves it, and the fusion rules run. Rewrites
    ``model`` (inspect's own copy)."""
    activations = per_token_inputs(model.graph, linears)
    for linear, (xq, _) in zip(linears, activations, strict=True):
        linear.node.replace_input_with(0, xq)
    fuse = FuseNormQuantPass()
    fuse(model)
    return fusion_record(fuse.fused, fuse.refused)


def inspect_model(
    path: str | os.PathLike,
    recipe: Recipe | None = None,
    calib: Any = None,
    tokenizer: str | os.PathLike | None = None,
    samples: int = 8,
    seq_len: int = 256,
) -> dict[str, Any]:
    """A JSON-able description of what conversion would do to the model at ``path``; with ``calib``
    ("builtin" for the built-in text, or a calibration file) also each group's outlier channels."""
    model = load_model(path)
    graph = model.graph
    base = recipe or Recipe()
    analysis = analyze(graph, through_linears=base.uses_linear_folds)
    schemes = {}
    w8a8_linears: list[Linear] = []
    for scheme in ("w4", "w8a8"):
        r = Recipe(**{**base.to_dict(), "scheme": scheme})
        plans = plan_linears(graph, analysis.linears, r)
        if scheme == "w8a8":
            w8a8_linears = [p.linear for p in plans if p.action == "w8a8"]
        counts = Counter(ACTION_LABELS[p.action] for p in plans)
        schemes[scheme] = {
            "counts": dict(counts),
            "layers": [
                {"node": p.name, "action": ACTION_LABELS[p.action], "reason": p.reason, "lm_head": p.lm_head}
                for p in plans
            ],
        }
    outliers = (
        _calibrated_outliers(path, model, analysis.groups, calib, tokenizer, samples, seq_len)
        if calib is not None and analysis.groups
        else None
    )
    info = {
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
                "modules": [c.module for c in g.consumers],
            }
            for g in analysis.groups
        ],
        "skipped": [asdict(s) for s in analysis.skipped],
        "schemes": schemes,
        "outliers": outliers,
    }
    info["fusions"] = (
        fusion_preview(model, w8a8_linears) if w8a8_linears else None
    )  # last: rewrites the graph
    return info


def render_inspection(info: dict[str, Any]) -> None:
    """Print the inspection as rich tables on stdout."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{info['model']}[/]: opset {info['opset']}, {info['nodes']} nodes, "
        f"{info['weight_bytes'] / 1e6:.1f} MB of weights, {info['linears']} linear layers"
    )
    table = Table(title="Op counts")
    table.add_column("op")
    table.add_column("nodes", justify="right")
    for op, n in info["op_counts"].items():
        table.add_row(op, str(n))
    console.print(table)
    table = Table(title="Smoothing groups (norm -> linears, one shared scale each)")
    for col in ("tensor", "kind", "channels", "consumers"):
        table.add_column(col, overflow="fold")
    for g in info["groups"]:
        table.add_row(g["tensor"], g["kind"], str(g["channels"]), ", ".join(g["modules"]))
    console.print(table)
    if info.get("outliers"):
        feeds = {g["tensor"]: os.path.commonprefix(g["modules"]).rstrip("._") for g in info["groups"]}
        _render_outliers(console, info["outliers"], feeds)
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
    fusions = info.get("fusions")
    if fusions:
        console.print(f"--kernels sq_onnx: {fusions['fused']} norm(s) fused with their quantization")
    if fusions and fusions["not_fused"]:
        table = Table(title="Norms --kernels sq_onnx does not fuse (their output is written, then quantized)")
        for col in ("norm", "tensor", "why not fused"):
            table.add_column(col, overflow="fold")
        for r in fusions["not_fused"]:
            table.add_row(r["norm"], r["tensor"], r["reason"])
        console.print(table)


def _render_outliers(console: Any, outliers: dict[str, Any], feeds: dict[str, str]) -> None:
    """Top outlier channels per group: the channels smoothing exists for."""
    from rich.table import Table

    table = Table(
        title=f"Activation outliers per group ({outliers['samples']} samples of {outliers['source']})"
    )
    for col in ("tensor", "feeds", "median |x|", "top channels: |x| (x median)"):
        table.add_column(col, overflow="fold")
    for tensor, data in outliers["groups"].items():
        tops = []
        for t in data["top"]:
            ratio = "" if t["x_median"] is None else f" ({t['x_median']:.0f}x)"
            style = "bold red" if (t["x_median"] or 0) >= 20 else ""
            text = f"#{t['channel']}: {t['absmax']:.3g}{ratio}"
            tops.append(f"[{style}]{text}[/]" if style else text)
        table.add_row(tensor, feeds.get(tensor, ""), f"{data['median_absmax']:.3g}", ", ".join(tops))
    console.print(table)
