"""``convert --report DIR``: what smoothing and quantization did, as report.json and a self-contained report.html.

report.json fields (arrays are per channel, in channel order):
  version, model, output, scheme, alpha, recipe, calibration, verify, smoothing_check, alpha_search,
  sizes {input_bytes, output_bytes, ratio},
  groups [{tensor, kind, alpha, consumers, modules, act_absmax_before, act_absmax_after, scales,
           weight_absmax_before, weight_absmax_after, top_channels}],
  layers [{name, module, op, relative_error, rows}] (worst first), plots [figure names embedded in report.html].
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from sq_onnx.errors import OutputError
from sq_onnx.passes.analyze import SmoothGroup
from sq_onnx.passes.smooth import weight_row_absmax
from sq_onnx.reporting.layer_error import LayerError
from sq_onnx.runtime.model_io import write_refused
from sq_onnx.runtime.progress import track

REPORT_FILES = ("report.html", "report.json")
TOP_CHANNELS = 8


def check_report_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Create the report folder up front so a bad path fails before minutes of work, never after."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise OutputError(
            "--report draws with matplotlib, which is not installed: pip install 'sq-onnx[report]'."
        )
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"report path {str(folder)!r} exists and is not a folder.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create report folder {str(folder)!r}: {exc.strerror}.") from exc
    refused = write_refused(folder)
    if refused:
        raise OutputError(f"report folder {str(folder)!r} is not writable ({refused}).")
    clash = [name for name in REPORT_FILES if (folder / name).exists()]
    if clash and not overwrite:
        raise OutputError(f"{folder / clash[0]} already exists; pass --overwrite to replace the report.")
    return folder


def group_record(
    group: SmoothGroup, act_absmax: np.ndarray, scales: np.ndarray, alpha: float
) -> dict[str, Any]:
    """One smoothing group's before/after picture; ``group`` is analysed on the original (unsmoothed) graph."""
    w_before = weight_row_absmax(group)
    top = np.argsort(act_absmax)[::-1][:TOP_CHANNELS]
    return {
        "tensor": group.name,
        "kind": group.kind,
        "alpha": float(alpha),
        "consumers": [c.name for c in group.consumers],
        "modules": [c.module for c in group.consumers],
        "act_absmax_before": act_absmax.astype(float).tolist(),
        "act_absmax_after": (act_absmax / scales).astype(float).tolist(),
        "scales": scales.astype(float).tolist(),
        "weight_absmax_before": w_before.astype(float).tolist(),
        "weight_absmax_after": (w_before * scales).astype(float).tolist(),
        "top_channels": [int(c) for c in top],
    }


def build_report(
    result: dict[str, Any], model: str, groups: list[dict[str, Any]], layers: list[LayerError]
) -> dict[str, Any]:
    """The report.json object from a ConvertResult dict, group records and measured layer errors."""
    from sq_onnx.version import __version__

    size_in, size_out = result["input_bytes"], result["output_bytes"]
    return {
        "version": __version__,
        "model": model,
        "output": result["output"],
        "scheme": result["scheme"],
        "alpha": result["alpha"],
        "recipe": result["recipe"],
        "calibration": result["calibration"],
        "verify": result["verify"],
        "smoothing_check": result["smoothing_check"],
        "alpha_search": result["alpha_search"],
        "skipped": result["skipped"],
        "fusions": result["fusions"],
        "joined_linears": result["joined_linears"],  # layers below by linear; the file joins these per input
        "nbits_a8_kernels": result["nbits_a8_kernels"],
        "masked_attention": result["masked_attention"],
        "sizes": {
            "input_bytes": size_in,
            "output_bytes": size_out,
            "ratio": round(size_out / size_in, 4) if size_in else None,
        },
        "groups": groups,
        "layers": [
            {
                "name": e.name,
                "module": e.module,
                "op": e.op,
                "relative_error": e.relative_error,
                "rows": e.rows,
            }
            for e in layers
        ],
        "plots": [],
    }


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_report(folder: Path, report: dict[str, Any], show_progress: bool = False) -> list[Path]:
    """Draw every figure, then write report.json and report.html (each atomically)."""
    import json

    from sq_onnx.reporting.report_html import render_html
    from sq_onnx.reporting.report_plots import alpha_figure, group_figure, layers_figure

    plots: dict[str, bytes] = {}
    if report["alpha_search"]:
        plots["alpha_search"] = alpha_figure(report["alpha_search"])
    if report["layers"]:
        plots["layers"] = layers_figure(report["layers"])
    groups = report["groups"]
    for i, group in track(enumerate(groups), "drawing report", total=len(groups), enabled=show_progress):
        plots[f"group_{i}"] = group_figure(group)
    report["plots"] = list(plots)
    paths = [folder / name for name in REPORT_FILES]
    _atomic_write(paths[0], render_html(report, plots).encode("utf-8"))
    _atomic_write(paths[1], json.dumps(report, separators=(",", ":")).encode("utf-8"))
    return paths
