"""Conversion time and peak memory on random-weight models of real shapes (issue: 1B-class models in bounded time).

    python tools/bench_scale.py                                   # every shape, W4 and W8A8 defaults
    python tools/bench_scale.py --shapes smollm2-135m --schemes w4
    python tools/bench_scale.py --keep demo_out/scale              # keep the exported models for a rerun
    python tools/bench_scale.py --shapes llama-3.2-1b --layers 2   # the shape's widths, 2 layers: per-layer cost
    python tools/bench_scale.py --shapes llama-3.1-8b --schemes w4 --device cuda   # the GPU target (GPU machine)

Each shape is built with transformers from its real config (layers, widths, heads, vocabulary, tied
embeddings) with random weights (timing does not depend on them), exported with KV cache by sq-onnx's own
exporter (weights in an external-data file), and converted in a fresh process with the default recipe of
each scheme (`sq-onnx convert --json`; the calibration is random token ids in the same number and length of
samples as the built-in text, since a random model has no tokenizer). Prints seconds per stage (the result's
``stage_seconds``), the total, peak RSS against the fp32 weights, and seconds per 100M parameters (cost
should grow no faster than the parameter count).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

# Real configurations (their config.json on the Hugging Face hub), random weights.
SHAPES: dict[str, tuple[str, dict]] = {
    "smollm2-135m": (
        "LlamaConfig",
        dict(
            hidden_size=576,
            intermediate_size=1536,
            num_hidden_layers=30,
            num_attention_heads=9,
            num_key_value_heads=3,
            vocab_size=49152,
            tie_word_embeddings=True,
            rope_theta=100000.0,
        ),
    ),
    "qwen2.5-0.5b": (
        "Qwen2Config",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1000000.0,
        ),
    ),
    "llama-3.2-1b": (
        "LlamaConfig",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            vocab_size=128256,
            tie_word_embeddings=True,
            rope_theta=500000.0,
        ),
    ),
    # Issue 27's GPU target: a 7B-class default W4 in 15 minutes on one H100 (30 GB of fp32 weights: a GPU
    # machine's disk and memory, not a 2-core one's).
    "llama-3.1-8b": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=128256,
            tie_word_embeddings=False,
            rope_theta=500000.0,
        ),
    ),
}
GPU_ONLY = "llama-3.1-8b"  # only on request: its export and conversion need a GPU machine's memory
SEQ_LEN = 256


def export_shape(name: str, folder: Path, layers: int | None = None) -> tuple[Path, int]:
    """The random model of ``name`` (with ``layers`` decoder layers instead of its own number) exported to
    ``folder/model.onnx`` (kept when already there); its parameter count."""
    import torch
    import transformers as tf

    from sq_onnx.lm.export import export_model
    from sq_onnx.runtime.model_io import save_model

    config_class, dims = SHAPES[name]
    dims = dims | ({"num_hidden_layers": layers} if layers else {})
    config = getattr(tf, config_class)(**dims, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2)
    target = folder / "model.onnx"
    params_file = folder / "params.json"
    if target.exists() and params_file.exists():
        return target, json.loads(params_file.read_text())["params"]
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = tf.AutoModelForCausalLM.from_config(config).eval()
    params = sum(p.numel() for p in model.parameters())
    folder.mkdir(parents=True, exist_ok=True)
    save_model(export_model(model, kv_cache=True), target, external_data=True)
    config.save_pretrained(str(folder))
    params_file.write_text(json.dumps({"params": params}))
    return target, params


def convert(model: Path, scheme: str, vocab: int, workdir: Path, device: str = "auto") -> dict:
    """``sq-onnx convert --json`` in a fresh process, calibrated on random ids (default sample counts), on
    ``device`` (``--device``: auto, cpu or cuda)."""
    from sq_onnx.recipe import Recipe

    recipe = Recipe(scheme=scheme)
    count = max(recipe.samples, recipe.gptq_samples if recipe.uses_gptq else 0) + recipe.verify_samples
    calib = workdir / "ids.npz"
    ids = np.random.default_rng(0).integers(3, vocab, (count, 1, SEQ_LEN), dtype=np.int64)
    np.savez(calib, input_ids=ids)
    out = workdir / f"out-{scheme}" / "model.onnx"
    cmd = [sys.executable, "-m", "sq_onnx", "convert", str(model), "-o", str(out), "--scheme", scheme]
    cmd += ["--calib", str(calib), "--json", "--overwrite", "--device", device]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"convert failed: {done.stderr.strip()[-2000:]}")
    shutil.rmtree(out.parent, ignore_errors=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shapes",
        default=",".join(s for s in SHAPES if s != GPU_ONLY),
        help=f"comma-separated, of {', '.join(SHAPES)} (default: all but {GPU_ONLY})",
    )
    parser.add_argument("--schemes", default="w4,w8a8")
    parser.add_argument("--keep", type=Path, help="folder to keep the exported models in (reused when there)")
    parser.add_argument(
        "--layers",
        type=int,
        help="decoder layers instead of the shape's own (its widths and vocabulary kept)",
    )
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="convert's --device"
    )
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise SystemExit(f"unknown shape(s) {', '.join(unknown)}; known: {', '.join(SHAPES)}")
    rows = []
    with tempfile.TemporaryDirectory(prefix="sq-onnx-scale-") as tmp:
        for shape in shapes:
            label = f"{shape}-{args.layers}-layers" if args.layers else shape
            folder = (args.keep or Path(tmp)) / label
            model, params = export_shape(shape, folder, args.layers)
            weights = sum(f.stat().st_size for f in folder.glob("model.onnx*"))
            for scheme in args.schemes.split(","):
                result = convert(model, scheme, SHAPES[shape][1]["vocab_size"], Path(tmp), args.device)
                rows.append((label, params, weights, scheme, result))
                print(
                    f"{label} {scheme}: {result['seconds']:.0f}s, peak RSS {result['peak_rss_mb']:.0f} MB",
                    flush=True,
                )
            if args.keep is None:
                shutil.rmtree(folder, ignore_errors=True)
    stages = list(dict.fromkeys(name for *_, r in rows for name in r["stage_seconds"]))
    table = Table(title="sq-onnx convert, default recipes, random weights of real shapes")
    for col in (
        "shape",
        "params (M)",
        "scheme",
        "device",
        *stages,
        "total s",
        "s / 100M params",
        "peak RSS (GB)",
        "peak - fp32 (GB)",
    ):
        table.add_column(col, justify="right")
    for shape, params, weights, scheme, r in rows:
        peak = r["peak_rss_mb"] * 1024**2
        table.add_row(
            shape,
            f"{params / 1e6:.0f}",
            scheme,
            str(r.get("device", "?")),
            *(f"{r['stage_seconds'].get(s, 0.0):.0f}" for s in stages),
            f"{r['seconds']:.0f}",
            f"{r['seconds'] / (params / 1e8):.0f}",
            f"{peak / 1e9:.2f}",
            f"{(peak - weights) / 1e9:+.2f}",
        )
    Console(width=240).print(table)


if __name__ == "__main__":
    main()
