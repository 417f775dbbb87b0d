"""Size and accuracy of a converted model with its token embedding in float, 8-bit and 4-bit rows.

    python tools/embedding_table.py demo_out/accuracy/W4.onnx [--split test] [--windows 8]

The model must have been converted with ``--embedding fp`` (or before that option existed). The embedding pass
runs last and reads only the float table (``QuantizeEmbeddingPass``), so applying it to the converted model
writes what ``sq-onnx convert --embedding 8|4`` would have: the expensive W4 conversion is done once. Each
variant is evaluated like ``sq-onnx eval --texts yardstick/SPLIT --compare demo_out/fp32/model.onnx``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from domain_table import add_eval_options, domain_row, print_markdown


def variant(src: Path, bits: int, block_size: int) -> Path:
    """``src`` with its embedding Gathers quantized to ``bits``, written beside it (kept for re-runs)."""
    import onnx_ir as ir
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    from sq_onnx.passes.quantize_embedding import QuantizeEmbeddingPass
    from sq_onnx.runtime.model_io import load_model, save_model

    out = src.with_name(f"{src.stem}.embedding-{bits}.onnx")
    if not out.exists():
        model = load_model(src)
        embed = QuantizeEmbeddingPass(bits, block_size)
        ir.passes.Sequential(embed, RemoveUnusedNodesPass())(model)
        if not embed.replaced:
            raise SystemExit(f"{src} has no float embedding Gather to quantize")
        save_model(model, out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_eval_options(parser)
    parser.add_argument("--block-size", type=int, default=128)
    args = parser.parse_args()
    rows = []
    for label, path in [
        ("float embedding", args.model),
        ("8-bit embedding", variant(args.model, 8, args.block_size)),
        ("4-bit embedding", variant(args.model, 4, args.block_size)),
    ]:
        data = path.with_name(path.name + ".data")
        size = path.stat().st_size + (data.stat().st_size if data.exists() else 0)
        rows.append(domain_row(path, args, {"variant": label, "MB": round(size / 1e6, 1)}))
    print_markdown(rows)


if __name__ == "__main__":
    main()
