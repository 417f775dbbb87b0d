"""Greedy generation through ONNX Runtime with the KV cache, streaming text as it is produced."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from sq_onnx.errors import SqOnnxError, TokenizerNotFoundError
from sq_onnx.lm.lm_runner import LMRunner
from sq_onnx.runtime.model_inputs import input_specs, is_language_model
from sq_onnx.runtime.model_io import load_model
from sq_onnx.runtime.ort_session import session


def _eos_ids(folder: Path, tokenizer) -> set[int]:
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text()).get("eos_token_id")
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, list):
                ids.update(int(v) for v in value)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids


def load_tokenizer(folder: Path):
    """transformers' tokenizer for the folder (for chat templates), else a plain ``tokenizers`` one."""
    if not (folder / "tokenizer.json").is_file():
        raise TokenizerNotFoundError(
            f"no tokenizer.json beside the model in {str(folder)!r}; pass --tokenizer DIR."
        )
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder))
    except Exception:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


def generate(
    model_path: str | os.PathLike,
    prompt: str,
    max_new_tokens: int = 64,
    chat: bool = False,
    tokenizer_dir: str | os.PathLike | None = None,
    on_text: Callable[[str], None] | None = None,
    threads: int | None = None,
) -> dict:
    """Greedy-decode up to ``max_new_tokens``; ``on_text`` receives each new piece of text."""
    path = Path(model_path)
    specs = input_specs(load_model(path), path)
    if not is_language_model(specs):
        raise SqOnnxError("generate needs a language model with an input_ids input.")
    folder = Path(tokenizer_dir) if tokenizer_dir else path.resolve().parent
    tok = load_tokenizer(folder)
    if chat:
        if not getattr(tok, "chat_template", None):
            raise SqOnnxError("the tokenizer has no chat template; drop --chat.")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    runner = LMRunner(session(path, threads=threads), specs)
    eos = _eos_ids(folder, tok)
    start = time.perf_counter()
    logits = runner.prefill(np.asarray([ids], dtype=np.int64))
    first = time.perf_counter()
    new: list[int] = []
    shown = ""
    for _ in range(max_new_tokens):
        token = int(np.argmax(logits))
        if token in eos:
            break
        new.append(token)
        text = tok.decode(new, skip_special_tokens=True)
        if on_text is not None and len(text) > len(shown) and not text.endswith("\ufffd"):
            on_text(text[len(shown) :])
            shown = text
        logits = runner.step(token)
    end = time.perf_counter()
    text = tok.decode(new, skip_special_tokens=True)
    if on_text is not None and len(text) > len(shown):
        on_text(text[len(shown) :])
    decode_s = end - first
    return {
        "prompt": prompt,
        "text": text,
        "prompt_tokens": len(ids),
        "new_tokens": len(new),
        "prefill_s": round(first - start, 4),
        "decode_tokens_per_s": round(len(new) / decode_s, 2) if decode_s > 0 and new else None,
        "kv_cache": runner.has_cache,
    }


def print_stream(piece: str) -> None:
    sys.stdout.write(piece)
    sys.stdout.flush()
