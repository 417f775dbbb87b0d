"""A W4 model at MatMulNBits accuracy_level 0 and 4, per text domain: what int8 activations cost.

    python tools/accuracy_level_table.py demo_out/w4/model.onnx [--split test] [--windows 8]

accuracy_level is an attribute ORT reads at session creation (level 4: activations quantized to int8 in blocks,
integer dot products), so the same converted weights are evaluated both ways: the level-4 copy is written beside
the model with every MatMulNBits at level 4. Each is evaluated like ``sq-onnx eval --texts yardstick/SPLIT
--compare demo_out/fp32/model.onnx``; prints a markdown table (perplexity over fp32 per domain, mean KL).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def at_level(src: Path, level: int) -> Path:
    """``src`` with every MatMulNBits at ``level`` (written beside it once)."""
    import onnx_ir as ir

    from sq_onnx.runtime.model_io import load_model, save_model

    out = src.with_name(f"{src.stem}.level-{level}.onnx")
    if not out.exists():
        model = load_model(src)
        for node in model.graph:
            if node.op_type == "MatMulNBits":
                node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
        save_model(model, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("model", type=Path)
    parser.add_argument("--reference", type=Path, default=Path("demo_out/fp32/model.onnx"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--yardstick", type=Path, default=Path("yardstick"))
    parser.add_argument("--windows", type=int, default=8)
    args = parser.parse_args()
    from sq_onnx.lm.evaluate import evaluate_domains, text_sources

    texts = dict(text_sources([args.yardstick / args.split]))
    rows = []
    for level in (0, 4):
        path = at_level(args.model, level)
        cache = path.with_suffix(f".eval-{args.split}-{args.windows}.json")
        if cache.exists() and cache.stat().st_mtime > path.stat().st_mtime:
            result = json.loads(cache.read_text())
        else:
            result = evaluate_domains(path, texts, windows=args.windows, compare=args.reference).to_dict()
            cache.write_text(json.dumps(result))
        row = {"accuracy_level": level}
        for d in result["domains"]:
            row[d["domain"]] = f"{100 * (d['compare']['perplexity_ratio'] - 1):+.2f}%"
        row["mean KL"] = round(result["mean"]["kl_divergence"], 4)
        row["mean top-1"] = round(result["mean"]["top1_agreement"], 4)
        rows.append(row)
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")


if __name__ == "__main__":
    main()
