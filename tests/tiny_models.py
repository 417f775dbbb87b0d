"""Tiny LLMs built by the tests themselves: transformers configs -> torch -> ONNX, with outlier channels.

Outliers are injected into the norms' γ (a few channels x ``OUTLIER_GAIN``), which is how real LLMs
get their activation outliers; smoothing must then move them into the weights.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

VOCAB = 256
HIDDEN = 64
OUTLIER_CHANNELS = (3, 17, 42)
OUTLIER_GAIN = 40.0


def _inject_outliers(model) -> None:
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1 and (
                "layernorm" in name or "layer_norm" in name or name.endswith("norm.weight")
            ):
                if "final" in name or name.endswith("model.norm.weight"):
                    continue
                param.mul_(torch.empty_like(param).uniform_(0.7, 1.3))
                param[list(OUTLIER_CHANNELS)] *= OUTLIER_GAIN


def build_torch_model(arch: str = "llama", seed: int = 0, layers: int = 2):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        cfg = tf.Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            intermediate_size=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        )
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "opt":
        cfg = tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            ffn_dim=128,
            num_hidden_layers=layers,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=HIDDEN,
            do_layer_norm_before=True,
        )
        model = tf.OPTForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.eval()
    _inject_outliers(model)
    return model


def export_torch(model, path: Path) -> Path:
    """torch.onnx (dynamo) export without KV cache, through sq-onnx's own exporter."""
    from sq_onnx.export import export_model
    from sq_onnx.model_io import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(export_model(model, kv_cache=False), path)
    return path


def fuse_for_ort(src: Path, dst: Path) -> Path:
    """The same model after onnxscript's ORT fusions (SimplifiedLayerNormalization, Skip* norms, ...)."""
    import onnx_ir as ir
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model = ir.load(src)
    optimize_for_ort(model)
    ir.save(model, dst)
    return dst


def write_tokenizer(folder: Path) -> Path:
    """A small byte-level BPE tokenizer (vocab = VOCAB) trained on the built-in text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from sq_onnx.builtin_text import builtin_text

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator([builtin_text("calibration")[:200_000]], trainer)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "tokenizer.json"
    tok.save(str(out))
    return out


def random_ids(samples: int, seq: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, (samples, seq), dtype=np.int64)


def save_hf_folder(model, folder: Path) -> Path:
    """A local Hugging Face folder (weights, config, tokenizer) as users have them."""
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    tok = write_tokenizer(folder)
    PreTrainedTokenizerFast(tokenizer_file=str(tok), eos_token="<|endoftext|>").save_pretrained(folder)
    return folder
