"""Fingerprints of the models sq-onnx writes, to show a refactor changed no output.

    python tools/model_hashes.py [--out hashes.json] [--model PATH ...] [--keep DIR]

Builds the tiny test models (tests/tiny_models.py: Llama, Llama with biases, OPT, the ORT-fused Llama, the
KV-cache export), converts each with fixed recipes (W4 default, W4 --no-gptq, W4 --alpha-search layer,
W8A8 stock per-token and static, W8A8 --kernels sq_onnx, smooth) and prints one line per model: the sha256
of every initializer's bytes (by name order) and of the outputs on fixed inputs (ORT, CPU, one thread).
``--model`` adds real models (e.g. demo_out/fp32/model.onnx) with the quick recipes. Run it before and after
a change and diff the two JSON files; ``--source`` runs an older checkout (``git worktree add /tmp/old REV``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

S128 = ["--gptq-samples", "128"]  # the default until 2026-12-04, pinned so older checkouts compare
TINY_RECIPES = {
    "w4": ["--scheme", "w4", *S128],
    "w4-no-gptq": ["--scheme", "w4", "--no-gptq"],
    "w4-one-pass-gptq": ["--scheme", "w4", "--no-gptq-asymmetric", *S128],
    "w4-gptq-holdout": ["--scheme", "w4", "--gptq-holdout", "4", *S128],
    "w4-alpha-layer": ["--scheme", "w4", "--no-gptq", "--alpha-search", "layer"],
    "w8a8": ["--scheme", "w8a8"],
    "w8a8-static": ["--scheme", "w8a8", "--act", "static"],
    "w8a8-kernels": ["--scheme", "w8a8", "--kernels", "sq_onnx"],
    "smooth": ["--scheme", "smooth"],
}
REAL_RECIPES = {
    "w4-no-gptq": ["--scheme", "w4", "--no-gptq"],
    "w8a8": ["--scheme", "w8a8"],
    "w8a8-kernels": ["--scheme", "w8a8", "--kernels", "sq_onnx"],
    "smooth": ["--scheme", "smooth"],
}


def initializer_hash(path: Path) -> str:
    """sha256 over (name, dtype, shape, bytes) of every initializer, names sorted."""
    import onnx_ir as ir

    model = ir.load(path)
    digest = hashlib.sha256()
    for name in sorted(model.graph.initializers):
        value = model.graph.initializers[name]
        array = value.const_value.numpy()
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def output_hash(path: Path) -> str:
    """sha256 of every output on fixed token ids (batch 1, 12 tokens; empty KV cache where there is one)."""
    import onnx_ir as ir

    try:
        from sq_onnx.runtime.model_inputs import complete_feed, input_specs
        from sq_onnx.runtime.ort_session import session
    except ImportError:  # a checkout from before the subpackages (--source)
        from sq_onnx.model_inputs import complete_feed, input_specs
        from sq_onnx.ort_session import session

    specs = input_specs(ir.load(path))
    ids = np.random.default_rng(0).integers(3, 60, size=(1, 12)).astype(np.int64)
    feed = complete_feed({"input_ids": ids}, specs)
    sess = session(path, threads=1)
    digest = hashlib.sha256()
    for out in sess.run(None, feed):
        digest.update(np.ascontiguousarray(out).tobytes())
    return digest.hexdigest()[:16]


def tiny_models_in(folder: Path) -> dict[str, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from sq_onnx.cli import main

    import tiny_models

    made = {}
    for arch in ("llama", "llama_bias", "opt"):
        sub = folder / arch
        sub.mkdir()
        tiny_models.export_torch(tiny_models.build_torch_model(arch), sub / "model.onnx")
        tiny_models.write_tokenizer(sub)
        made[arch] = sub / "model.onnx"
    fused = folder / "llama_fused"
    fused.mkdir()
    tiny_models.fuse_for_ort(made["llama"], fused / "model.onnx")
    (fused / "tokenizer.json").write_bytes((folder / "llama" / "tokenizer.json").read_bytes())
    made["llama_fused"] = fused / "model.onnx"
    hf = folder / "hf_llama"
    tiny_models.save_hf_folder(tiny_models.build_torch_model("llama", seed=4, layers=2), hf)
    if main(["export", str(hf), "-o", str(folder / "llama_kv"), "--quiet"]) == 0:
        made["llama_kv"] = folder / "llama_kv" / "model.onnx"
    return made


def fingerprints(models: dict[str, Path], recipes: dict[str, list[str]], work: Path) -> dict[str, dict]:
    from sq_onnx.cli import main

    result = {}
    for name, src in models.items():
        for label, flags in recipes.items():
            out = work / f"{name}-{label}" / "model.onnx"
            code = main(["convert", str(src), "-o", str(out), "--quiet", *flags])
            key = f"{name} {label}"
            if code:
                result[key] = {"exit": code}
            else:
                result[key] = {"initializers": initializer_hash(out), "outputs": output_hash(out)}
            print(f"{key:34s} {json.dumps(result[key])}", flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default=None, help="write the fingerprints as JSON here")
    parser.add_argument("--model", action="append", default=[], help="a real model to add (quick recipes)")
    parser.add_argument("--no-tiny", action="store_true", help="only the --model models")
    parser.add_argument("--keep", default=None, help="keep the converted models in this folder")
    parser.add_argument(
        "--source",
        default=None,
        help="import sq_onnx from this checkout instead (e.g. a git worktree of the commit before a change)",
    )
    args = parser.parse_args()
    if args.source:  # the editable install's finder would win over sys.path: drop it
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__]
        sys.path.insert(0, str(Path(args.source).resolve()))
    with tempfile.TemporaryDirectory(prefix="sq-onnx-hashes-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        result = {}
        if not args.no_tiny:
            built = work / "inputs"
            built.mkdir(exist_ok=True)
            result.update(fingerprints(tiny_models_in(built), TINY_RECIPES, work))
        real = {Path(m).parent.name: Path(m) for m in args.model}
        result.update(fingerprints(real, REAL_RECIPES, work))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
