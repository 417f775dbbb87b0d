"""Calibration text the float model writes itself: sampled continuations of random first tokens.

Text in one domain teaches GPTQ one domain (measured: the Python-docs calibration fits Python docs and
nothing else). The model's own samples follow the distribution it was trained on, whatever that was, with
no data to ship or choose (as data-free quantization methods do, e.g. LLM-QAT). Sequences are sampled in a
batch through ONNX Runtime with the model's KV cache; a model without one is too slow to sample from and
gets none (the caller falls back to the built-in text).
"""

from __future__ import annotations

import numpy as np

from sq_onnx.runtime.model_inputs import InputSpec, complete_feed
from sq_onnx.runtime.progress import track

TOP_K = 64  # the long tail of a small model's distribution is noise, not language


def _softmax_sample(logits: np.ndarray, rng: np.random.Generator, temperature: float) -> np.ndarray:
    """One token per row from the top-``TOP_K`` of ``logits`` [B, V] at ``temperature``."""
    top = np.argpartition(-logits, TOP_K, axis=-1)[:, :TOP_K]
    picked = np.take_along_axis(logits, top, axis=-1).astype(np.float64) / temperature
    p = np.exp(picked - picked.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    u = rng.random((len(p), 1))
    choice = np.minimum((p.cumsum(axis=-1) < u).sum(axis=-1), TOP_K - 1)
    return top[np.arange(len(top)), choice]


def sample_windows(
    sess,
    specs: list[InputSpec],
    first_tokens: np.ndarray,
    seq_len: int,
    seed: int = 0,
    temperature: float = 1.0,
    batch: int = 16,
    show_progress: bool = False,
) -> list[np.ndarray]:
    """One [1, seq_len] int64 window per entry of ``first_tokens``, the rest sampled from the model.

    ``sess`` must run the model with its KV cache (past_key_values.* in, present.* out). Progress per batch
    when ``show_progress``: a 1B model takes minutes to write its share of a W4 calibration on 2 cores."""
    kv = [s.name for s in specs if s.is_past_kv]
    if not kv:
        raise ValueError("sampling needs a model with a KV cache")
    names = {s.name for s in specs}
    outputs = [sess.get_outputs()[0].name, *(n.replace("past_key_values", "present") for n in kv)]
    rng = np.random.default_rng(seed)
    windows: list[np.ndarray] = []
    starts = range(0, len(first_tokens), batch)
    for start in track(starts, "sampling calibration text", total=len(starts), enabled=show_progress):
        ids = np.asarray(first_tokens[start : start + batch], dtype=np.int64)[:, None]
        out = sess.run(outputs, complete_feed({"input_ids": ids}, specs))
        for _ in range(seq_len - 1):
            token = _softmax_sample(out[0][:, -1], rng, temperature)[:, None]
            ids = np.concatenate([ids, token], axis=1)
            total = ids.shape[1]
            feed = {"input_ids": token, **dict(zip(kv, out[1:], strict=True))}
            if "attention_mask" in names:
                feed["attention_mask"] = np.ones((len(ids), total), dtype=np.int64)
            if "position_ids" in names:
                feed["position_ids"] = np.full((len(ids), 1), total - 1, dtype=np.int64)
            out = sess.run(outputs, feed)
        windows.extend(row[None, :] for row in ids)
    return windows


def word_tokens(tokenizer_file, rng: np.random.Generator, count: int) -> np.ndarray:
    """``count`` random token ids that decode to a word (two letters or more, after an optional space):
    starts of text a model can continue, drawn from its own vocabulary so no domain is preferred."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    special = set(tok.get_added_tokens_decoder())  # id -> AddedToken
    ids = [i for i in range(tok.get_vocab_size()) if i not in special]
    words = [i for i in ids if len(w := tok.decode([i]).strip()) >= 2 and w.isalpha()]
    pool = np.asarray(words or ids, dtype=np.int64)  # a tiny vocabulary may have no whole words
    return rng.choice(pool, size=count, replace=len(pool) < count)
