"""Accuracy table on the real model, per text domain: sq-onnx against ONNX Runtime's own quantizers.

    python tools/accuracy_table.py [--split test|validation|builtin] [--windows 8] [--only REGEX]

Exports SmolLM2-135M-Instruct first when the model is missing (as tools/demo.py does) and writes the
multi-domain yardstick (tools/yardstick.py) when it is missing. Each conversion runs in its own process (so
its peak RSS is its own) and is kept under demo_out/accuracy/ (``--reuse`` skips conversions already
there); each row is evaluated like ``sq-onnx eval --texts yardstick/SPLIT --compare fp32`` (512-token
windows): per domain, the perplexity increase over fp32 and the mean KL divergence from fp32's next-token
distribution (the steadier of the two); then the mean and worst KL. Tune on ``validation``, report on
``test``. Prints the table and writes markdown beside the model (accuracy-SPLIT.md).
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

W4 = ["convert", "--scheme", "w4"]
S128 = ["--gptq-samples", "128"]  # the default until 2026-12-04 (evening): 256
OLD = [*W4, "--calib-mix", "docs", "--gptq-damp", "0.01", *S128]  # the default until 2026-12-04
W8A8 = ["convert", "--scheme", "w8a8"]
STATIC_QDQ = [*W8A8, "--act", "static", "--format", "qdq"]
IN_DOMAIN = "yardstick/calib/fiction.txt"  # tools/yardstick.py: other stretches of the novels than the test's
ROWS: dict[str, list[str] | None] = {
    "fp32": None,
    "ORT MatMulNBitsQuantizer (RTN, b128, asym)": ["ort-rtn"],
    "sq-onnx w4 --no-gptq, docs calibration (old)": [*OLD, "--no-gptq"],
    "sq-onnx w4 default until 2026-12-04 (GPTQ asym + 4 refine, docs calibration)": OLD,
    "sq-onnx w4 --no-gptq (built-in mix)": [*W4, "--no-gptq"],
    "sq-onnx w4, built-in mix, GPTQ damp 0.01": [*W4, "--gptq-damp", "0.01", *S128],
    "sq-onnx w4, built-in mix, GPTQ damp 0.1": [*W4, "--gptq-damp", "0.1", *S128],
    "sq-onnx w4, built-in mix, GPTQ damp 0.3, 128 samples": [*W4, *S128],
    "sq-onnx w4 default (built-in mix, GPTQ damp 0.3, 256 samples)": W4,
    "sq-onnx w4, --calib fiction (in-domain text), damp 0.01, 128 samples": [
        *W4,
        "--gptq-damp",
        "0.01",
        *S128,
        "--calib",
        IN_DOMAIN,
    ],
    "sq-onnx w4, --calib fiction (in-domain text)": [*W4, "--calib", IN_DOMAIN],
    "sq-onnx w8a8 default": W8A8,
    # static per-tensor W8A8 as standard QDQ ops (--format qdq): where smoothing matters most
    "ORT quantize_static (QDQ, per-channel, symmetric activations, same calibration text)": ["ort-static"],
    "sq-onnx w8a8 static QDQ, --act16 down_proj": [*STATIC_QDQ, "--act16", "down_proj"],
    "sq-onnx w8a8 static QDQ, no smoothing": [*W8A8, "--act", "static", "--format", "qdq", "--no-smooth"],
    "sq-onnx w8a8 static QDQ, alpha 0.5 (default)": [*W8A8, "--act", "static", "--format", "qdq"],
    "sq-onnx w8a8 static QDQ, alpha 0.8": [*W8A8, "--act", "static", "--format", "qdq", "--alpha", "0.8"],
    "sq-onnx w8a8 static QDQ, --alpha auto": [*W8A8, "--act", "static", "--format", "qdq", "--alpha", "auto"],
    # linear-producer folds (issue 27): up_proj -> down_proj (down_proj's input carries the largest
    # activations), v_proj -> o_proj
    "sq-onnx w8a8 static QDQ, alpha 0.5, linear folds": [*STATIC_QDQ, "--linear-folds"],
    "sq-onnx w8a8 static QDQ, alpha 0.8, linear folds": [*STATIC_QDQ, "--alpha", "0.8", "--linear-folds"],
    "sq-onnx w8a8 static QDQ, alpha 0.9, linear folds": [*STATIC_QDQ, "--alpha", "0.9", "--linear-folds"],
    "sq-onnx w8a8 static QDQ, --alpha auto, linear folds": [*STATIC_QDQ, "--alpha", "auto", "--linear-folds"],
    "sq-onnx w8a8 static QDQ, layer α search, linear folds": [
        *STATIC_QDQ,
        "--alpha-search",
        "layer",
        "--linear-folds",
    ],
    "sq-onnx w8a8 default, linear folds": [*W8A8, "--linear-folds"],
    "sq-onnx w4 default, linear folds": [*W4, "--linear-folds"],
}


class _Feeds:
    """onnxruntime.quantization's CalibrationDataReader over sq-onnx's calibration feeds."""

    def __init__(self, feeds: list[dict]):
        self._it = iter(feeds)

    def get_next(self):
        return next(self._it, None)


def ort_static(src: str, dst: str) -> None:
    """ONNX Runtime's own static quantizer on the calibration samples sq-onnx's default draws (the built-in
    mix, 16 x 256 tokens): QDQ, per-channel int8 weights, symmetric int8 activations, MatMuls."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from sq_onnx.calibration.calibration_data import load_calibration
    from sq_onnx.recipe import Recipe
    from sq_onnx.runtime.model_inputs import input_specs
    from sq_onnx.runtime.model_io import load_model

    recipe = Recipe(scheme="w8a8")
    feeds, _ = load_calibration(
        None,
        input_specs(load_model(src)),
        model_path=src,
        tokenizer_dir=None,
        count=recipe.samples,
        seq_len=recipe.seq_len,
    )
    reader = type("Reader", (_Feeds, CalibrationDataReader), {})(feeds)
    quantize_static(
        src,
        dst,
        reader,
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        op_types_to_quantize=["MatMul", "Gemm"],
        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
    )


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
    elif kind == "ort-static":
        ort_static(src, dst)
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


def slug(label: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")[:80]


def convert_row(
    label: str, spec: list[str], src: Path, out_dir: Path, reuse: bool, console
) -> tuple[Path, dict]:
    path = out_dir / f"{slug(label)}.onnx"
    cost_file = path.with_suffix(".cost.json")
    if reuse and path.exists() and cost_file.exists():
        return path, json.loads(cost_file.read_text())
    console.print(f"converting: {label} ...")
    cmd = [sys.executable, __file__, "--worker", spec[0], str(src), str(path), *spec[1:]]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{label}: {proc.stderr.strip().splitlines()[-1:]}")
    cost = json.loads(proc.stdout.strip().splitlines()[-1])
    cost_file.write_text(json.dumps(cost))
    return path, cost


def evaluate_cached(path: Path, texts: dict, windows: int, ref: Path, split: str, reuse: bool) -> dict:
    """``evaluate_domains`` against the reference, kept beside the model per split and window count."""
    from sq_onnx.lm.evaluate import evaluate_domains

    cache = path.with_suffix(f".eval-{split}-{windows}.json")
    if reuse and cache.exists() and cache.stat().st_mtime > path.stat().st_mtime:
        return json.loads(cache.read_text())
    result = evaluate_domains(path, texts, windows=windows, compare=ref).to_dict()
    cache.write_text(json.dumps(result))
    return result


def texts_for(split: str, yardstick: Path) -> dict[str, Path | None]:
    from sq_onnx.lm.evaluate import text_sources

    if split == "builtin":
        return {"python-docs (held out)": None}
    folder = yardstick / split
    if not folder.is_dir():
        subprocess.run(
            [sys.executable, str(Path(__file__).with_name("yardstick.py")), "--out", str(yardstick)],
            check=True,
        )
    return dict(text_sources([folder]))


def markdown(rows: list[dict], domains: list[str]) -> str:
    cols = ["method", *domains, "mean KL", "worst KL", "convert s", "peak MB", "size MB"]
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    for r in rows:
        md += "| " + " | ".join(str(r.get(c, "-")) for c in cols) + " |\n"
    return md


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="demo_out/fp32/model.onnx")
    parser.add_argument("--split", choices=("test", "validation", "builtin"), default="test")
    parser.add_argument("--yardstick", default="yardstick", help="folder of tools/yardstick.py's texts")
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument(
        "--only",
        default=None,
        help="regex: run only the matching built-in rows (fp32 and --row rows always run)",
    )
    parser.add_argument("--reuse", action="store_true", help="reuse conversions already written")
    parser.add_argument(
        "--row",
        action="append",
        default=[],
        metavar="LABEL=ARGS",
        help="an extra row: a label, '=', then convert arguments (e.g. 'ridge=--scheme w4 --no-gptq')",
    )
    args = parser.parse_args()
    src = Path(args.model)
    if not src.exists():
        sys.path.insert(0, str(Path(__file__).parent))
        from demo import find_gguf

        from sq_onnx.lm.export import export

        export(find_gguf(), src.parent)
    out_dir = src.parent.parent / "accuracy"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json"):
        if (src.parent / name).exists():
            (out_dir / name).write_bytes((src.parent / name).read_bytes())
    from rich.console import Console

    from sq_onnx.lm.evaluate import evaluate_domains

    rows_spec = {k: v for k, v in ROWS.items() if not args.only or re.search(args.only, k)}
    for extra in args.row:
        label, _, rest = extra.partition("=")
        rows_spec[label] = ["convert", *shlex.split(rest)]
    console = Console(stderr=True)
    texts = texts_for(args.split, Path(args.yardstick))
    rows = []
    base = evaluate_domains(src, texts, windows=args.windows)
    fp32_ppl = {d.domain: d.perplexity for d in base.domains}
    rows.append({"method": "fp32 (perplexity)", **{k: f"{v:.2f}" for k, v in fp32_ppl.items()}})
    for label, spec in rows_spec.items():
        if spec is None:
            continue
        try:
            path, cost = convert_row(label, spec, src, out_dir, args.reuse, console)
        except RuntimeError as exc:
            console.print(f"  failed: {exc}")
            continue
        ev = evaluate_cached(path, texts, args.windows, src, args.split, args.reuse)
        row = {"method": label}
        for d in ev["domains"]:
            ratio, kl = d["perplexity"] / fp32_ppl[d["domain"]] - 1, d["compare"]["kl_divergence"]
            row[d["domain"]] = f"{100 * ratio:+.1f}% ({kl:.3f})"
        row["mean KL"] = f"{ev['mean']['kl_divergence']:.4f}"
        row["worst KL"] = f"{ev['worst']['kl_divergence']:.4f} ({ev['worst']['kl_divergence_domain']})"
        row.update({"convert s": cost["seconds"], "peak MB": cost["peak_rss_mb"], "size MB": size_mb(path)})
        rows.append(row)
        console.print(f"  {label}: " + ", ".join(f"{k} {v}" for k, v in row.items() if k != "method"))
    domains = list(fp32_ppl)
    md = markdown(rows, domains)
    print(md)
    note = (
        f"{args.split} domains, {args.windows} x 512 tokens each; cell = perplexity increase over fp32 (KL)"
    )
    (out_dir / f"accuracy-{args.split}.md").write_text(f"{note}\n\n{md}")
    console.print(f"markdown written to {out_dir / f'accuracy-{args.split}.md'}")


if __name__ == "__main__":
    main()
