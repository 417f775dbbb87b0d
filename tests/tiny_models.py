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
                if "final" in name or name.endswith("model.norm.weight") or param.numel() != HIDDEN:
                    continue  # the final norm, and Qwen3 / Gemma 3's per-head q / k norms
                param.mul_(torch.empty_like(param).uniform_(0.7, 1.3))
                param[list(OUTLIER_CHANNELS)] *= OUTLIER_GAIN


def _randomize_biases(model) -> None:
    """transformers initialises every bias to 0, and a zero bias cannot show that a quantizer dropped it:
    give each linear and norm bias (Qwen2's q/k/v, all of OPT's) random values of a realistic size."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.1)


def build_torch_model(arch: str = "llama", seed: int = 0, layers: int = 2):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    decoder = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    if arch == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**decoder, tie_word_embeddings=True))
    elif arch == "llama_bias":  # biased q/k/v/o and MLP linears, as Qwen2's attention has
        cfg = tf.LlamaConfig(**decoder, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**decoder, tie_word_embeddings=False))
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
    _randomize_biases(model)
    return model


FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3", "gpt2", "opt")
# Families beyond issue 27's list, checked more lightly (groups, exact smoothing, W8A8 and W4 convert): parallel
# attention + MLP blocks (Phi-2, GPT-NeoX, Falcon), LayerNorm with bias and partial rotary (StableLM), scaled
# residuals (Granite), NoPE layers (SmolLM3) and norms after each block instead of before it (OLMo 2)
MORE_FAMILIES = ("phi", "gpt_neox", "falcon", "stablelm", "granite", "smollm3", "olmo2")


def build_family(family: str, seed: int = 0):
    """A tiny random model of one of ``FAMILIES`` or ``MORE_FAMILIES`` (2 layers, GQA where the family has it),
    with outliers."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    dec = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
    ids = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
    mha = {k: v for k, v in dec.items() if k != "num_key_value_heads"}  # families without grouped queries
    builders = {
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**dec, **ids)),
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(**dec, **ids, head_dim=16)),
        # Gemma: norms before and after each block, RMSNorm scaled by (1 + w), GeGLU, soft-capping, sliding windows
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(**dec, **ids, head_dim=16, sliding_window=8)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(
            tf.Gemma3TextConfig(**dec, **ids, head_dim=16, sliding_window=8)
        ),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(**dec, **ids)),  # fused qkv_proj and gate_up_proj
        "gpt2": lambda: tf.GPT2LMHeadModel(  # Conv1D, fused c_attn, LayerNorm with bias, GELU
            tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=2, n_head=4, n_positions=128, **ids)
        ),
        "phi": lambda: tf.PhiForCausalLM(tf.PhiConfig(**mha, **ids, partial_rotary_factor=0.5)),
        "gpt_neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**mha, **ids, rotary_pct=0.25)),
        "falcon": lambda: tf.FalconForCausalLM(  # multi-query, parallel attention and MLP
            tf.FalconConfig(**mha, **ids, new_decoder_architecture=False, multi_query=True, bias=False)
        ),
        "stablelm": lambda: tf.StableLmForCausalLM(tf.StableLmConfig(**dec, **ids)),
        "granite": lambda: tf.GraniteForCausalLM(tf.GraniteConfig(**dec, **ids)),
        "smollm3": lambda: tf.SmolLM3ForCausalLM(tf.SmolLM3Config(**dec, **ids)),
        "olmo2": lambda: tf.Olmo2ForCausalLM(tf.Olmo2Config(**dec, **ids)),
    }
    if family not in builders:
        return build_torch_model(family, seed=seed)
    model = builders[family]().eval()
    _inject_outliers(model)
    _randomize_biases(model)
    return model


def export_torch(model, path: Path) -> Path:
    """torch.onnx (dynamo) export without KV cache, through sq-onnx's own exporter."""
    from sq_onnx.lm.export import export_model
    from sq_onnx.runtime.model_io import save_model

    path.parent.mkdir(parents=True, exist_ok=True)
    save_model(export_model(model, kv_cache=False), path)
    return path


def export_torchscript(model, path: Path) -> Path:
    """torch.onnx's TorchScript exporter (``dynamo=False``, as optimum and many users' scripts still export),
    without KV cache: decomposed norms, attention shapes read from the normed hidden states (``Shape``),
    dynamic Reshape targets, and no types on most intermediate values."""
    import warnings

    import torch

    class Logits(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask):
            return self.inner(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.tensor(random_ids(1, 16))
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Logits(model.eval()),
            (ids, torch.ones_like(ids)),
            str(path),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": dynamic, "attention_mask": dynamic, "logits": dynamic},
            opset_version=17,
            dynamo=False,
        )
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

    from sq_onnx.calibration.builtin_text import builtin_text

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


def _permute_qk(w, n_head: int):
    """llama.cpp's convert script permutes q/k rows (rotary halves interleaved); transformers undoes it."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(model, tokenizer_json: Path, path: Path) -> Path:
    """Write a tiny Llama as an F32 GGUF file, as llama.cpp's converter lays it out."""
    import json

    import gguf

    cfg = model.config
    tok = json.loads(tokenizer_json.read_text())
    vocab = sorted(tok["model"]["vocab"].items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(float(getattr(cfg, "rope_theta", None) or cfg.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([gguf.TokenType.NORMAL] * len(vocab))
    writer.add_token_scores([0.0] * len(vocab))
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = {
            "attn_norm": "input_layernorm",
            "ffn_norm": "post_attention_layernorm",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        for g, h in names.items():
            writer.add_tensor(f"blk.{i}.{g}.weight", sd[p + h + ".weight"])
        writer.add_tensor(
            f"blk.{i}.attn_q.weight", _permute_qk(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads)
        )
        writer.add_tensor(
            f"blk.{i}.attn_k.weight", _permute_qk(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads)
        )
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def to_float_type(src: Path, dst: Path, dtype) -> Path:
    """The float32 model at ``src`` with every float32 tensor, value, Constant and Cast target made ``dtype``
    (an onnx_ir DataType: BFLOAT16 or FLOAT16)."""
    import onnx_ir as ir

    model = ir.load(src)
    graph = model.graph
    for value in graph.initializers.values():
        if value.const_value is not None and value.const_value.dtype == ir.DataType.FLOAT:
            value.const_value = ir.tensor(value.const_value.numpy().astype(dtype.numpy()), name=value.name)
    for value in [
        *graph.inputs,
        *graph.outputs,
        *graph.initializers.values(),
        *(o for n in graph for o in n.outputs),
    ]:
        if value.dtype == ir.DataType.FLOAT:
            value.type = ir.TensorType(dtype)
    for node in graph:
        if node.op_type == "Cast" and node.attributes["to"].as_int() == int(ir.DataType.FLOAT):
            node.attributes["to"] = ir.AttrInt64("to", int(dtype))
        if node.op_type == "Constant" and "value" in node.attributes:
            tensor = node.attributes["value"].as_tensor()
            if tensor.dtype == ir.DataType.FLOAT:
                node.attributes["value"] = ir.AttrTensor(
                    "value", ir.tensor(tensor.numpy().astype(dtype.numpy()))
                )
    ir.save(model, dst)
    return dst


def to_bfloat16(src: Path, dst: Path) -> Path:
    import onnx_ir as ir

    return to_float_type(src, dst, ir.DataType.BFLOAT16)
