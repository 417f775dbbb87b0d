"""A self-contained ``report.html``: every figure embedded as a base64 PNG, no scripts, no links out."""

from __future__ import annotations

import base64
import html
import json
from typing import Any


def _img(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(rows: list[tuple[str, str]]) -> str:
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    return f"<table>{cells}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1200px; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; }
th { background: #f4f4f4; }
img { max-width: 100%; display: block; margin: 0.5em 0 1.5em; }
h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
"""


def render_html(report: dict[str, Any], plots: dict[str, bytes]) -> str:
    """The whole page; ``plots`` maps each name in ``report['plots']`` to its PNG bytes."""
    sizes = report["sizes"]
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>sq-onnx report: {html.escape(report['output'])}</title><style>{STYLE}</style></head><body>",
        f"<h1>sq-onnx {html.escape(report['version'])} conversion report</h1>",
        _table(
            [
                ("input", report["model"]),
                ("output", report["output"]),
                ("scheme", report["scheme"]),
                ("alpha", _fmt(report["alpha"])),
                ("size before", f"{sizes['input_bytes'] / 1e6:.2f} MB"),
                ("size after", f"{sizes['output_bytes'] / 1e6:.2f} MB"),
                ("calibration", _fmt(report["calibration"])),
            ]
        ),
        "<h2>Verification (float model vs converted, held-out samples)</h2>",
        _table([(k, _fmt(v)) for k, v in (report["verify"] or {}).items()] or [("verify", "not run")]),
    ]
    if report["smoothing_check"]:
        parts += [
            "<h2>Smoothing check (smoothed float model vs original)</h2>",
            _table([(k, _fmt(v)) for k, v in report["smoothing_check"].items()]),
        ]
    if "alpha_search" in plots:
        parts += ["<h2>α search</h2>", _img(plots["alpha_search"], "alpha search curve")]
    parts.append("<h2>Per-layer output error (worst first)</h2>")
    if "layers" in plots:
        parts.append(_img(plots["layers"], "per-layer relative error"))
    layer_rows = [
        (
            f"{layer['module']} ({layer['name']})",
            f"{layer['op']}: {layer['relative_error']:.4g} on {layer['rows']} rows",
        )
        for layer in report["layers"]
    ]
    parts.append(_table(layer_rows) if layer_rows else "<p>No quantized layer could be measured.</p>")
    if report.get("skipped"):
        parts.append("<h2>Not smoothed (quantized without smoothing)</h2>")
        parts.append(
            _table([(f"{s['tensor']} → {', '.join(s['consumers'])}", s["reason"]) for s in report["skipped"]])
        )
    fusions = report.get("fusions")
    if fusions:
        parts.append(f"<h2>Norms fused with their quantization: {fusions['fused']}</h2>")
        if fusions["not_fused"]:
            parts.append(
                _table([(f"{r['norm']} → {r['tensor']}", r["reason"]) for r in fusions["not_fused"]])
            )
    parts.append("<h2>Smoothing groups</h2>")
    if not report["groups"]:
        parts.append("<p>No group was smoothed.</p>")
    for i, group in enumerate(report["groups"]):
        parts.append(
            f"<h3>{html.escape(group['tensor'])} → {html.escape(', '.join(group['modules']))}</h3>"
            f"<p>{html.escape(group['kind'])}, α {group['alpha']:.2f}, "
            f"activation abs-max {max(group['act_absmax_before']):.4g} → {max(group['act_absmax_after']):.4g}; "
            f"top outlier channels {html.escape(str(group['top_channels']))}</p>"
        )
        parts.append(_img(plots[f"group_{i}"], f"group {group['tensor']}"))
    parts.append("</body></html>")
    return "\n".join(parts)
