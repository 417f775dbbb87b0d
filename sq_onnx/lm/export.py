"""Export a local Hugging Face folder or a GGUF file to ONNX with torch.onnx (dynamo), offline.

Writes DIR/model.onnx with the tokenizer and config beside it, so ``convert``, ``eval``, ``bench`` and
``generate`` find them. Inputs and outputs follow optimum's naming (past_key_values.N.key -> present.N.key),
but the exporter is torch.onnx: with transformers 5 it exports Llama-family models exactly, while
optimum-onnx pins transformers 4.57, which misreads rope settings saved by transformers 5 (DESIGN.md).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sq_onnx.errors import ModelLoadError, OutputError, SqOnnxError
from sq_onnx.lm.genai_folder import derive_config, write_config
from sq_onnx.runtime.model_io import save_model


def _load_hf(src: Path, dtype: str):
    try:
        import torch
        import transformers
    except ImportError:
        raise SqOnnxError("export needs torch and transformers: pip install 'sq-onnx[export]'.") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    if src.is_file() and src.suffix.lower() == ".gguf":
        kwargs = {"gguf_file": src.name}
        folder = str(src.parent)
    elif src.is_dir() and (src / "config.json").is_file():
        kwargs, folder = {}, str(src)
    else:
        raise ModelLoadError(
            f"{str(src)!r} is neither a .gguf file nor a Hugging Face model folder with config.json."
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    except Exception as exc:  # transformers raises many types for unreadable or unsupported files
        raise ModelLoadError(
            f"could not load {str(src)!r} with transformers ({str(exc).splitlines()[0]})."
        ) from None
    model.eval()
    return model, tokenizer


def _num_layers_and_kv_shape(config) -> tuple[int, int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return text.num_hidden_layers, kv_heads, head_dim


def _wrapper(model, kv_cache: bool):
    """A module with flat tensor inputs/outputs, named like optimum's ONNX exports."""
    import torch

    if not kv_cache:

        class Logits(torch.nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, input_ids, attention_mask):
                return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        return Logits(model)

    from transformers.cache_utils import DynamicCache

    layers = _num_layers_and_kv_shape(model.config)[0]

    class WithCache(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask, position_ids, *past):
            # a full cache in every layer, also the sliding-window ones: their window is in the mask. A cache built
            # from the config keeps a sliding layer's last window - 1 positions, a choice that depends on the
            # length, which the trace fixes at the example's (short) one: past the window the graph indexed its
            # mask out of range (a GatherND error in ONNX Runtime, Gemma 2)
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
            )
            flat = []
            for layer in out.past_key_values.layers[:layers]:
                flat += [layer.keys, layer.values]
            return (out.logits, *flat)

    return WithCache(model)


def export_model(model, kv_cache: bool):
    """torch.onnx (dynamo) export of a loaded causal LM; returns an onnx_ir.Model."""
    import logging
    import warnings

    import torch

    # Eager attention: torch.onnx writes SDPA with a NaN guard (IsNaN + Where over every attention matrix, a fifth
    # of a 512-token prefill on SmolLM2) that eager attention's finite mask does not need (tools/RESULTS.md).
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    ids = torch.ones((1, 4), dtype=torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    if kv_cache:
        layers, kv_heads, head_dim = _num_layers_and_kv_shape(model.config)
        past_len = 3
        dtype = next(model.parameters()).dtype
        past = [torch.zeros((1, kv_heads, past_len, head_dim), dtype=dtype) for _ in range(2 * layers)]
        names = [f"past_key_values.{i}.{kind}" for i in range(layers) for kind in ("key", "value")]
        args = (
            ids,
            torch.ones((1, 4 + past_len), dtype=torch.int64),
            torch.arange(past_len, past_len + 4)[None],
            *past,
        )
        past_dim, total = torch.export.Dim("past_sequence"), torch.export.Dim("total_sequence")
        dyn = {
            "input_ids": {0: batch, 1: seq},
            "attention_mask": {0: batch, 1: total},
            "position_ids": {0: batch, 1: seq},
            "past": tuple({0: batch, 2: past_dim} for _ in names),
        }
        input_names = ["input_ids", "attention_mask", "position_ids", *names]
        output_names = ["logits", *[n.replace("past_key_values", "present") for n in names]]
    else:
        args = (ids, torch.ones_like(ids))
        dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
        input_names, output_names = ["input_ids", "attention_mask"], ["logits"]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _wrapper(model, kv_cache),
            args,
            dynamo=True,
            input_names=input_names,
            output_names=output_names,
            dynamic_shapes=dyn,
            verbose=False,
            optimize=True,
        )
    return program.model


def export(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "fp32",
    kv_cache: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Export ``src`` to ``out_dir/model.onnx`` and save its tokenizer and config beside it.

    With ``kv_cache`` (default) the model takes input_ids, attention_mask, position_ids and
    past_key_values.N.key/value and returns logits and present.N.key/value (optimum's names); without,
    it is input_ids, attention_mask -> logits.
    """
    src, out = Path(src), Path(out_dir)
    target = out / "model.onnx"
    if target.exists() and not overwrite:
        raise OutputError(f"{str(target)!r} already exists; pass --overwrite to replace it.")
    if dtype not in ("fp32", "fp16"):
        raise SqOnnxError(f"--dtype must be fp32 or fp16, got {dtype!r}.")
    if not src.exists():
        raise ModelLoadError(f"{str(src)!r} does not exist.")
    start = time.perf_counter()
    _say(quiet, f"loading {src.name} with transformers ...")
    model, tokenizer = _load_hf(src, dtype)
    form = "with KV cache" if kv_cache else "without KV cache"
    _say(quiet, f"exporting {form} with torch.onnx (dynamo) after {time.perf_counter() - start:.0f}s ...")
    onnx_model = export_model(model, kv_cache)
    out.mkdir(parents=True, exist_ok=True)
    save_model(onnx_model, target)
    tokenizer.save_pretrained(str(out))
    model.config.save_pretrained(str(out))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(str(out))
    if kv_cache:  # genai runs decoders with a KV cache only
        hf = {**model.config.to_dict(), **_token_ids(model)}
        names = (
            [v.name or "" for v in onnx_model.graph.inputs],
            [v.name or "" for v in onnx_model.graph.outputs],
        )
        write_config(out, derive_config(*names, hf, target.name))
    _say(quiet, f"wrote {target} in {time.perf_counter() - start:.0f}s")
    return target


def _token_ids(model) -> dict:
    """bos / eos / pad ids of the generation config, which often holds them when config.json does not."""
    generation = getattr(model, "generation_config", None)
    ids = {k: getattr(generation, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    return {k: v for k, v in ids.items() if v is not None}


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        import sys

        print(text, file=sys.stderr)
