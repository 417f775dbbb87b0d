"""A W4 model at MatMulNBits accuracy_level 0 and 4, per text domain: what int8 activations cost.

    python tools/accuracy_level_table.py demo_out/w4/model.onnx [--split test] [--windows 8]

accuracy_level is an attribute ORT reads at session creation (level 4: activations quantized to int8 in blocks,
integer dot products), so the same converted weights are evaluated both ways: the level-4 copy is written beside
the model with every MatMulNBits at level 4. Each is evaluated like ``sq-onnx eval --texts yardstick/SPLIT
--compare demo_out/fp32/model.onnx``; prints a markdown table (perplexity over fp32 per domain, mean KL).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from domain_table import add_eval_options, domain_row, print_markdown


def edited_copy(src: Path, tag: str, edit) -> Path:
    """``src`` with ``edit(model)`` applied, written beside it as ``STEM.TAG.onnx`` (again when ``src`` is newer)."""
    from sq_onnx.runtime.model_io import load_model, save_model

    out = src.with_name(f"{src.stem}.{tag}.onnx")
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        model = load_model(src)
        edit(model)
        save_model(model, out)
    return out


def at_level(src: Path, level: int) -> Path:
    """``src`` with its MatMulNBits at ``level``, as ``--accuracy-level LEVEL`` writes them: the lm_head (the one
    whose output is the logits) keeps its own level (``--lm-head-accuracy-level``, 4 by default; at level 0 the
    8-bit vocabulary projection alone cut decoding to a third)."""
    from sq_onnx import accuracy_level

    def relevel(model) -> None:
        accuracy_level.set_level(accuracy_level.linear_nodes_in_file(model.graph), level)

    return edited_copy(src, f"level-{level}", relevel)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_eval_options(parser)
    args = parser.parse_args()
    print_markdown(
        [domain_row(at_level(args.model, level), args, {"accuracy_level": level}) for level in (0, 4)]
    )


if __name__ == "__main__":
    main()
