"""onnxruntime-genai model folders: ``genai_config.json`` and the tokenizer files beside the model.

``sq-onnx export`` writes the config from the graph (input and output names, KV-cache layout) and the Hugging
Face ``config.json``; ``sq-onnx convert`` carries the config beside its input (ours, the genai model builder's,
optimum's folder with one derived) over to its output folder with the new file name, copies the tokenizer
files, and for ``--kernels sq_onnx`` models copies the custom-op library into the folder and names it in the
decoder's session options, so the folder runs in ``onnxruntime_genai.Model(folder)`` as it is.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from sq_onnx.errors import SqOnnxError

CONFIG = "genai_config.json"
# What genai's tokenizer and chat template read, when present beside the model.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    "config.json",
)
KV_PATTERNS = {
    "past_key_names": r"past_key_values\.(\d+)\.key",
    "past_value_names": r"past_key_values\.(\d+)\.value",
    "present_key_names": r"present\.(\d+)\.key",
    "present_value_names": r"present\.(\d+)\.value",
}


# The decoder model types onnxruntime-genai runs by name (its src/models/model_type.h, ModelType::IsLLM, as of
# 0.18); any other decoder runs as genai's generic "decoder" (OPT, say, which has no type of its own there).
GENAI_LLM_TYPES = frozenset(
    ("chatglm", "decoder", "ernie4_5", "gemma", "gemma2", "gemma3_text", "gpt2", "gptoss", "granite")
    + ("internlm2", "llama", "mistral", "nemotron", "olmo", "phi", "phimoe", "phi3", "phi3small", "qwen2")
    + ("qwen3", "smollm3")
)


class GenaiConfigError(SqOnnxError):
    """A genai config that cannot be written or does not fit the graph."""


def _kv_layers(names: list[str], pattern: str) -> list[int]:
    return sorted(int(m.group(1)) for n in names if (m := re.fullmatch(pattern, n)))


def _first(config: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if config.get(key) is not None:
            return config[key]
    return None


def derive_config(
    inputs: list[str], outputs: list[str], hf_config: dict[str, Any], filename: str
) -> dict[str, Any]:
    """The genai config of a decoder with these graph input / output names and this Hugging Face config
    (``config.json``; ``generation_config.json`` entries may be merged in by the caller)."""
    layers = _first(hf_config, "num_hidden_layers", "n_layer", "num_layers")
    heads = _first(hf_config, "num_attention_heads", "n_head")
    hidden = _first(hf_config, "hidden_size", "n_embd", "d_model")
    missing = [k for k, v in (("layers", layers), ("heads", heads), ("hidden size", hidden)) if v is None]
    if missing or "model_type" not in hf_config:
        raise GenaiConfigError(f"config.json lacks the model's {', '.join(missing) or 'model_type'}.")
    if "input_ids" not in inputs or "logits" not in outputs:
        raise GenaiConfigError(
            "the graph has no input_ids input or no logits output: not a decoder genai can run."
        )
    found = {
        key: _kv_layers(inputs if key.startswith("past") else outputs, p) for key, p in KV_PATTERNS.items()
    }
    if any(found.values()) and any(layers_ != list(range(layers)) for layers_ in found.values()):
        raise GenaiConfigError(
            f"the graph's KV-cache inputs and outputs do not cover the {layers} layers config.json names."
        )
    graph_inputs = {"input_ids": "input_ids"}
    for name in ("attention_mask", "position_ids"):
        if name in inputs:
            graph_inputs[name] = name
    graph_outputs = {"logits": "logits"}
    if any(found.values()):
        graph_inputs |= {
            "past_key_names": "past_key_values.%d.key",
            "past_value_names": "past_key_values.%d.value",
        }
        graph_outputs |= {"present_key_names": "present.%d.key", "present_value_names": "present.%d.value"}
    context = _first(hf_config, "max_position_embeddings", "n_positions", "max_sequence_length") or 2048
    eos = hf_config.get("eos_token_id")
    pad = _first(hf_config, "pad_token_id")
    tokens = {
        "bos_token_id": hf_config.get("bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
    }
    return {
        "model": {
            # genai refuses a null id ("Expected a number"): a config.json without one leaves genai's default
            **{key: value for key, value in tokens.items() if value is not None},
            "context_length": context,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": filename,
                "head_size": _first(hf_config, "head_dim") or hidden // heads,
                "hidden_size": hidden,
                "inputs": graph_inputs,
                "outputs": graph_outputs,
                "num_attention_heads": heads,
                "num_hidden_layers": layers,
                "num_key_value_heads": _first(hf_config, "num_key_value_heads") or heads,
            },
            "type": hf_config["model_type"] if hf_config["model_type"] in GENAI_LLM_TYPES else "decoder",
            "vocab_size": hf_config.get("vocab_size"),
        },
        "search": {
            "diversity_penalty": 0.0,
            "do_sample": False,
            "early_stopping": True,
            "length_penalty": 1.0,
            "max_length": context,
            "min_length": 0,
            "no_repeat_ngram_size": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            # our exports concatenate past and new keys (present = past_sequence + sequence), so genai must
            # not hand the same buffer in and out
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 1,
            "top_p": 1.0,
        },
    }


def graph_names(model_path: Path) -> tuple[list[str], list[str]]:
    """The model's input and output names, read without its weights."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    return [i.name for i in proto.graph.input], [o.name for o in proto.graph.output]


def write_config(folder: Path, config: dict[str, Any]) -> Path:
    path = folder / CONFIG
    path.write_text(json.dumps(config, indent=2) + "\n")
    return path


def check_against_graph(config: dict[str, Any], inputs: list[str], outputs: list[str]) -> None:
    """A config that names graph inputs or outputs the model lacks would fail inside genai with a C++ error:
    say so before any work."""
    decoder = config.get("model", {}).get("decoder", {})
    named = [v for v in decoder.get("inputs", {}).values() if isinstance(v, str) and "%d" not in v]
    absent = sorted(v for v in named if v not in inputs)
    named = [v for v in decoder.get("outputs", {}).values() if isinstance(v, str) and "%d" not in v]
    absent += sorted(v for v in named if v not in outputs)
    if absent:
        raise GenaiConfigError(
            f"{CONFIG} beside the model names {', '.join(absent)}, which the graph does not have."
        )
    layers = decoder.get("num_hidden_layers")
    pattern = decoder.get("inputs", {}).get("past_key_names")
    if isinstance(layers, int) and isinstance(pattern, str):
        found = _kv_layers(inputs, re.escape(pattern).replace("%d", r"(\d+)"))
        if found != list(range(layers)):
            raise GenaiConfigError(
                f"{CONFIG} beside the model says {layers} layers; the graph has KV-cache inputs for {len(found)}."
            )


def genai_config_of(
    model_path: Path, inputs: list[str], outputs: list[str]
) -> tuple[dict[str, Any] | None, str]:
    """The config beside the model (checked against its graph) or one derived from config.json, and where it
    came from; (None, why) when the folder has neither."""
    folder = model_path.parent
    if (folder / CONFIG).is_file():
        config = json.loads((folder / CONFIG).read_text())
        check_against_graph(config, inputs, outputs)
        return config, f"{CONFIG} beside the input"
    if not (folder / "config.json").is_file():
        return (
            None,
            f"no {CONFIG} or config.json beside the input, so the output folder is not a genai folder",
        )
    hf = json.loads((folder / "config.json").read_text())
    generation = folder / "generation_config.json"
    if generation.is_file():
        hf = {**hf, **{k: v for k, v in json.loads(generation.read_text()).items() if k.endswith("token_id")}}
    try:
        return derive_config(inputs, outputs, hf, model_path.name), "derived from config.json and the graph"
    except GenaiConfigError as exc:  # not a decoder genai can run: convert still converts it
        return None, f"no genai config: {exc}"


def write_folder(
    config: dict[str, Any],
    source_folder: Path,
    out_model: Path,
    custom_ops_library: Path | None = None,
    tokenizer_folder: Path | None = None,
) -> list[str]:
    """Make ``out_model``'s folder a genai folder: ``config`` with the new file name (and the custom-op library
    copied in and named, when given), and the tokenizer files from ``source_folder``, or, for those it lacks,
    from ``tokenizer_folder`` (``--tokenizer``: optimum's export folders hold no tokenizer). A file already there
    with other content is left as it is. Returns the files written."""
    config = json.loads(json.dumps(config))  # the caller's stays as it was
    decoder = config["model"]["decoder"]
    decoder["filename"] = out_model.name
    folder = out_model.parent
    written = []
    if custom_ops_library is not None:
        target = folder / custom_ops_library.name
        shutil.copy2(custom_ops_library, target)
        # genai resolves a relative path against the folder, so the folder can move as a whole
        decoder.setdefault("session_options", {})["custom_ops_library"] = target.name
        written.append(target.name)
    elif "custom_ops_library" in decoder.get("session_options", {}):
        del decoder["session_options"]["custom_ops_library"]  # the output needs no library the input did
    for name in TOKENIZER_FILES:
        found = [
            f / name for f in (source_folder, tokenizer_folder) if f is not None and (f / name).is_file()
        ]
        dst = folder / name
        if found and not dst.exists():
            shutil.copy2(found[0], dst)
            written.append(name)
    existing = folder / CONFIG
    if existing.exists() and json.loads(existing.read_text()).get("model", {}).get("decoder", {}).get(
        "filename"
    ) not in (None, out_model.name):
        return written  # another model's config: not ours to replace
    write_config(folder, config)
    return [*written, CONFIG]
