"""GPTQ variants scored on calibration rows they did not see: a fast, low-noise stand-in for perplexity.

    python tools/gptq_heldout_loss.py [--model demo_out/fp32/model.onnx] [--train 64] [--held-out 256]

The Hessians of every 4-bit linear's input (α 0.4 smoothing, as ``convert`` does) are summed over two
disjoint sets of built-in calibration samples. Each variant quantizes every layer from the training
Hessians and is scored by the layer loss tr(ΔWᵀ H ΔW) / tr(Wᵀ H W) under the held-out Hessian
(geometric mean over layers). End-to-end perplexity moves by a few tenths of a
point between equally good variants (which codes happen to round which way); this loss does not, so it
tells whether a change to GPTQ helps beyond that noise before an hour of conversions is spent on it.
"oracle" quantizes from the held-out Hessian itself: no layer-wise method reaches below it.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from sq_onnx.calibration.calibrate import calibrate
from sq_onnx.calibration.calibration_data import load_calibration
from sq_onnx.calibration.hessian import collect_hessians, smoothed_hessian
from sq_onnx.passes.analyze import analyze
from sq_onnx.plan import plan_linears
from sq_onnx.quant.gptq import gptq_quantize
from sq_onnx.quantize_model import smooth_copy
from sq_onnx.recipe import Recipe
from sq_onnx.runtime.model_inputs import input_specs
from sq_onnx.runtime.model_io import load_model

# name -> (gptq_quantize keyword arguments, extra relative weight of diag(H) added to H, use held-out H)
VARIANTS: dict[str, tuple[dict, float, bool]] = {
    "GPTQ (damp 0.01, the default)": ({}, 0.0, False),
    "damp 0.05": ({"damp": 0.05}, 0.0, False),
    "damp 0.2": ({"damp": 0.2}, 0.0, False),
    "H + 0.02 diag(H)": ({}, 0.02, False),
    "H + 0.1 diag(H)": ({}, 0.1, False),
    "--gptq-refine 1": ({"refine_rounds": 1}, 0.0, False),
    "--gptq-refine 2": ({"refine_rounds": 2}, 0.0, False),
    "--gptq-refine 4": ({"refine_rounds": 4}, 0.0, False),
    "oracle (held-out H)": ({}, 0.0, True),
}


def layer_hessians(model_path: Path, train: int, held_out: int) -> tuple[list, dict, dict]:
    """[(name, input, smoothed [K, N] weight)] of the 4-bit linears and their train / held-out Hessians."""
    src = load_model(model_path)
    recipe = Recipe(scheme="w4")
    analysis = analyze(src.graph)
    feeds, _ = load_calibration(
        None, input_specs(src), model_path=model_path, tokenizer_dir=None, count=train + held_out, seq_len=256
    )
    if len(feeds) < train + held_out:
        raise SystemExit(f"the built-in text holds {len(feeds)} samples; ask for fewer")
    calib = calibrate(src, {g.name: g.channels for g in analysis.groups}, feeds[: recipe.samples], [])
    plans = plan_linears(src.graph, analysis.linears, recipe)
    smoothed = smooth_copy(src, analysis, plans, calib.absmax, recipe.effective_alpha)
    plans, scales = smoothed.plans, smoothed.scales
    layers = [
        (p.name, p.linear.input.name, p.linear.weight_kn().astype(np.float32))
        for p in plans
        if p.action == "w4"
    ]
    inputs = {p.linear.input.name: p.linear.shape[0] for p in plans if p.action == "w4"}
    sets = []
    for part in (feeds[:train], feeds[train : train + held_out]):
        raw = collect_hessians(src, inputs, part, show_progress=True)
        sets.append({name: smoothed_hessian(h, scales.get(name)) for name, h in raw.items()})
    return layers, sets[0], sets[1]


def relative_loss(w: np.ndarray, deq: np.ndarray, h: np.ndarray) -> float:
    """tr(ΔWᵀ H ΔW) / tr(Wᵀ H W): the share of the layer's output energy that quantization loses."""
    h = h.astype(np.float64)
    dw = (w - deq).astype(np.float64)
    w = w.astype(np.float64)
    return float(np.einsum("kn,kn->", dw, h @ dw) / np.einsum("kn,kn->", w, h @ w))


def score(layers: list, train: dict, held: dict, kwargs: dict, shrink: float, oracle: bool) -> float:
    """Geometric mean over the layers of the held-out relative loss."""
    losses = []
    for _, name, w in layers:
        h = held[name] if oracle else train[name]
        if shrink:
            h = h + shrink * np.diag(np.diag(h))
        bq = gptq_quantize(w, h, 4, 128, False, clip_search=True, act_order=True, **kwargs)
        losses.append(relative_loss(w, bq.dequantize(), held[name]))
    return float(np.exp(np.mean(np.log(losses))))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("demo_out/fp32/model.onnx"))
    parser.add_argument("--train", type=int, default=64, help="samples behind the Hessians GPTQ uses")
    parser.add_argument("--held-out", type=int, default=256, help="samples behind the scoring Hessians")
    parser.add_argument("--only", default="", help="run the variants whose name contains this")
    args = parser.parse_args()
    console = Console()
    layers, train, held = layer_hessians(args.model, args.train, args.held_out)
    table = Table(title=f"held-out layer loss, {len(layers)} linears (geometric mean; lower is better)")
    for col in ("variant", "held-out loss", "vs first row", "seconds"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    base = None
    for label, (kwargs, shrink, oracle) in VARIANTS.items():
        if args.only not in label:
            continue
        start = time.perf_counter()
        loss = score(layers, train, held, kwargs, shrink, oracle)
        base = base or loss
        seconds = f"{time.perf_counter() - start:.0f}"
        table.add_row(label, f"{loss:.4e}", f"{100 * (loss / base - 1):+.1f}%", seconds)
        console.print(f"{label}: {loss:.4e}")
    console.print(table)


if __name__ == "__main__":
    main()
