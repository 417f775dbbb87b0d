"""Shared by the tools that evaluate variants of one converted model on the yardstick (embedding_table.py,
accuracy_level_table.py): the evaluation options, the cached evaluation (accuracy_table.evaluate_cached) and
one markdown row per variant."""

from __future__ import annotations

import argparse
from pathlib import Path

from accuracy_table import evaluate_cached


def add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", type=Path)
    parser.add_argument("--reference", type=Path, default=Path("demo_out/fp32/model.onnx"))
    parser.add_argument("--split", default="test")
    parser.add_argument("--yardstick", type=Path, default=Path("yardstick"))
    parser.add_argument("--windows", type=int, default=8)


def domain_row(path: Path, args: argparse.Namespace, first: dict) -> dict:
    """``first``'s columns, then each domain's perplexity over the reference, evaluated once per file."""
    from sq_onnx.lm.evaluate import text_sources

    texts = dict(text_sources([args.yardstick / args.split]))
    result = evaluate_cached(path, texts, args.windows, args.reference, args.split, reuse=True)
    row = dict(first)
    for d in result["domains"]:
        row[d["domain"]] = f"{100 * (d['compare']['perplexity_ratio'] - 1):+.2f}%"
    row["mean KL"] = round(result["mean"]["kl_divergence"], 4)
    row["mean top-1"] = round(result["mean"]["top1_agreement"], 4)
    return row


def print_markdown(rows: list[dict]) -> None:
    print("| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
