"""The level-4 failure case and its fix: a real model with a few outlier channels raised, converted to W4
without and with smoothing, evaluated at MatMulNBits accuracy_level 0 and 4.

    python tools/level4_outliers.py [--gain 50] [--split test] [--windows 8]

Trained LLMs carry activation outliers as a few norm channels with large γ and small weight rows; level 4
quantizes each block of activations to int8, so one such channel crushes its block's neighbours
(onnxruntime issue 29849). The tool raises channels 3, 17 and 42 of every norm's γ GAIN-fold in SmolLM2 and
lowers the rows of the linears they feed as much (an exact rewrite: the float model is unchanged), converts
the result with the default W4 recipe and with --no-smooth, and prints, per variant and level, what
--accuracy-level auto chose and the perplexity over fp32 per domain, mean KL and mean top-1 agreement.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from accuracy_level_table import at_level
from domain_table import domain_row, print_markdown

CHANNELS = (3, 17, 42)


def with_outliers(src: Path, out: Path, gain: float) -> Path:
    """``src`` with CHANNELS of every norm group raised ``gain``-fold and the consumers' rows lowered."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from sq_onnx.passes.analyze import analyze
    from sq_onnx.passes.smooth import apply_smoothing
    from sq_onnx.runtime.model_io import load_model, save_model

    if out.exists():
        return out
    model = load_model(src)
    for group in analyze(model.graph).groups:
        s = np.ones(group.channels, np.float32)
        s[list(CHANNELS)] = 1.0 / gain  # smoothing in reverse: γ / s = γ * gain, rows * s = rows / gain
        apply_smoothing(model.graph, group, s)
    RemoveUnusedNodesPass()(model)  # the replaced γ and weights
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(model, out, external_data=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        if (src.parent / name).exists():
            (out.parent / name).write_bytes((src.parent / name).read_bytes())
    return out


def converted(model: Path, out: Path, extra: list[str]) -> dict:
    """Convert once (default W4 recipe, --accuracy-level auto) and return its --json result."""
    record = out.with_suffix(".convert.json")
    if not record.exists():
        cmd = [sys.executable, "-m", "sq_onnx", "convert", str(model), "-o", str(out), "--json", *extra]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        record.write_text(proc.stdout)
    return json.loads(record.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", type=Path, default=Path("demo_out/fp32/model.onnx"))
    parser.add_argument("--out", type=Path, default=Path("demo_out/level4-outliers"))
    parser.add_argument("--gain", type=float, default=50.0)
    parser.add_argument("--split", default="test")
    parser.add_argument("--yardstick", type=Path, default=Path("yardstick"))
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()
    args.reference = args.model  # the raised model computes what the original does
    folder = args.out / f"gain-{args.gain:g}"
    raised = with_outliers(args.model, folder / "fp32" / "model.onnx", args.gain)
    rows = []
    for label, extra in (("no smoothing", ["--no-smooth"]), ("smoothed (default)", [])):
        result = converted(raised, folder / f"w4-{'smooth' if not extra else 'plain'}.onnx", extra)
        auto = result["accuracy_level"]
        for level in (0, 4):
            path = at_level(Path(result["output"]), level)
            first = {"W4": label, "level": level, "auto chose": auto["level"] if auto else "-"}
            rows.append(domain_row(path, args, first))
        print(f"{label}: auto chose level {auto['level']}: {auto['reason']}", flush=True)
    print_markdown(rows)


if __name__ == "__main__":
    main()
