"""Accuracy table on the real model: sq-onnx against ONNX Runtime's own quantizers, one command.

    python tools/accuracy_table.py [--model demo_out/fp32/model.onnx] [--windows 16]

Exports SmolLM2-135M-Instruct first when the model is missing (as tools/demo.py does). Each conversion
runs in its own process (so its peak RSS is its own); each row is evaluated with ``sq-onnx eval --compare
fp32`` on the held-out built-in text (never used for calibration), 512-token windows: perplexity and the
mean KL divergence from fp32's next-token distribution (the steadier of the two). Prints a table and writes
markdown beside the model (accuracy.md).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

W4 = ["convert", "--scheme", "w4"]
W4_RTN = [*W4, "--no-gptq", "--no-clip-search"]
PLAIN = [*W4, "--no-gptq-asymmetric"]  # GPTQ on its own layer loss (the default before 2026-11-24)
W8A8 = ["convert", "--scheme", "w8a8"]
ROWS: dict[str, list[str] | None] = {
    "fp32": None,
    "ORT MatMulNBitsQuantizer (RTN, b128, asym)": ["ort-rtn"],
    "sq-onnx w4, no smoothing, RTN": [*W4_RTN, "--no-smooth"],
    "sq-onnx w4, alpha 0.4, RTN": W4_RTN,
    "sq-onnx w4, --alpha auto, RTN": [*W4_RTN, "--alpha", "auto"],
    "sq-onnx w4, --alpha-search layer, RTN": [*W4_RTN, "--alpha-search", "layer"],
    "sq-onnx w4, alpha 0.4 + clip search": [*W4, "--no-gptq"],
    "sq-onnx w4, alpha 0.4 + clip + plain GPTQ, 128 samples": [*PLAIN, "--gptq-refine", "0"],
    "sq-onnx w4, alpha 0.4 + clip + plain GPTQ + 4 refine rounds": PLAIN,
    "sq-onnx w4, alpha 0.4 + clip + plain GPTQ, --gptq-sequential": [*PLAIN, "--gptq-sequential"],
    "sq-onnx w4, clip + asymmetric GPTQ, --gptq-refine 0": [*W4, "--gptq-refine", "0"],
    "sq-onnx w4, alpha 0.4 + clip + asymmetric GPTQ + 4 refine rounds (default, 128 samples)": W4,
    "sq-onnx w4, clip + asymmetric GPTQ, 256 samples": [*W4, "--gptq-samples", "256"],
    "sq-onnx w4, no smoothing, clip + asymmetric GPTQ": [*W4, "--no-smooth"],
    "sq-onnx w4, --alpha auto, clip + asymmetric GPTQ": [*W4, "--alpha", "auto"],
    "sq-onnx w4, clip + asymmetric GPTQ, every sample": [*W4, "--gptq-samples", "512"],
    "ORT quantize_dynamic (int8 weights)": ["ort-dynamic"],
    "sq-onnx w8a8, no smoothing": [*W8A8, "--no-smooth"],
    "sq-onnx w8a8, alpha 0.5 (default)": W8A8,
    "sq-onnx w8a8, --alpha auto": [*W8A8, "--alpha", "auto"],
}


def worker(argv: list[str]) -> None:
    """Run one conversion in this process and print {seconds, peak_rss_mb} as JSON."""
    kind, src, dst, *rest = argv
    start = time.perf_counter()
    if kind == "ort-rtn":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quant = MatMulNBitsQuantizer(onnx.load(src), bits=4, block_size=128, is_symmetric=False)
        quant.process()
        quant.model.save_model_to_file(dst, use_external_data_format=False)
    elif kind == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
    else:
        from sq_onnx.cli import main

        code = main(["convert", src, "-o", dst, "--overwrite", "--quiet", *rest])
        if code:
            sys.exit(code)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(json.dumps({"seconds": round(seconds, 1), "peak_rss_mb": round(peak)}))


def size_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return round((path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6, 1)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo_out/fp32/model.onnx")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--only", default=None, help="regex: run only matching rows (fp32 always runs)")
    args = parser.parse_args()
    src = Path(args.model)
    if not src.exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from demo import find_gguf

        from sq_onnx.export import export

        export(find_gguf(), src.parent)
    out_dir = src.parent.parent / "accuracy"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_bytes((src.parent / "tokenizer.json").read_bytes())
    import re

    from rich.console import Console
    from rich.table import Table

    from sq_onnx.evaluate import perplexity

    console = Console(stderr=True)
    rows = []
    for i, (label, spec) in enumerate(ROWS.items()):
        if spec is not None and args.only and not re.search(args.only, label):
            continue
        if spec is None:
            path, cost = src, {"seconds": None, "peak_rss_mb": None}
        else:
            path = out_dir / f"row{i}.onnx"
            console.print(f"[{i + 1}/{len(ROWS)}] {label} ...")
            kind = spec[0]
            cmd = [sys.executable, __file__, "--worker", kind, str(src), str(path), *spec[1:]]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                console.print(f"  failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            cost = json.loads(proc.stdout.strip().splitlines()[-1])
        ev = perplexity(path, windows=args.windows, compare=None if spec is None else src)
        # KL to fp32: perplexity moves by tenths of a point with rounding luck, KL does not
        kl = None if ev.compare is None else round(ev.compare["kl_divergence"], 4)
        rows.append(
            {
                "method": label,
                "perplexity": round(ev.perplexity, 3),
                "kl_to_fp32": kl,
                "size_mb": size_mb(path),
                **cost,
            }
        )
        console.print(f"  perplexity {ev.perplexity:.3f}, KL to fp32 {kl}")
    base = rows[0]["perplexity"]
    for row in rows:
        row["vs_fp32"] = f"{100 * (row['perplexity'] / base - 1):+.1f}%"
    table = Table(title=f"SmolLM2-135M-Instruct, held-out text, {args.windows} x 512 tokens")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*["-" if v is None else str(v) for v in row.values()])
    Console().print(table)
    cols = list(rows[0])
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    md += "".join("| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |\n" for r in rows)
    (out_dir / "accuracy.md").write_text(md)
    console.print(f"markdown written to {out_dir / 'accuracy.md'}")


if __name__ == "__main__":
    main()
