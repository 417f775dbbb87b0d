"""Perplexity of an ONNX language model through ONNX Runtime, on held-out text.

The default text is the held-out part of the built-in text, which calibration never sees.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sq_onnx.builtin_text import builtin_text
from sq_onnx.calibration_data import find_tokenizer, read_text_file, tokenize, windows_from_ids
from sq_onnx.errors import SqOnnxError
from sq_onnx.model_inputs import complete_feed, input_specs, is_language_model
from sq_onnx.model_io import load_model
from sq_onnx.ort_session import session
from sq_onnx.progress import track


@dataclass
class EvalResult:
    model: str
    perplexity: float
    tokens: int
    windows: int
    seq_len: int
    seconds: float
    text: str
    compare: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float64 (stable)."""
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def nll_of(logprobs: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ids[1:] given the log-probabilities at positions [:-1]."""
    target = ids[1:]
    return -logprobs[np.arange(len(target)), target]


def kl_of(reference: np.ndarray, logprobs: np.ndarray) -> np.ndarray:
    """KL(p_reference || p) per position, from [T, V] log-probabilities. Unlike a perplexity difference
    it cannot gain from lucky rounding on the text at hand: it measures how far the distribution moved."""
    return np.sum(np.exp(reference) * (reference - logprobs), axis=-1)


def token_nll(logits: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of ids[1:] given logits[:-1] (one sequence)."""
    return nll_of(log_softmax(logits[:-1]), ids)


def token_kl(reference: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(p_reference || p) per position, for [T, V] logits."""
    return kl_of(log_softmax(reference), log_softmax(logits))


def perplexity(
    model_path: str | os.PathLike,
    text_file: str | os.PathLike | None = None,
    seq_len: int = 512,
    windows: int = 16,
    tokenizer: str | os.PathLike | None = None,
    threads: int | None = None,
    show_progress: bool = False,
    compare: str | os.PathLike | None = None,
) -> EvalResult:
    """exp(mean NLL) over non-overlapping ``seq_len`` windows of the text. With ``compare``, the other
    model runs on the same windows: its perplexity, the ratio, top-1 agreement of the two, and the mean
    KL divergence from the other model's next-token distribution to this one's."""
    start = time.perf_counter()
    specs = input_specs(load_model(model_path))
    if not is_language_model(specs):
        raise SqOnnxError("eval needs a language model with an input_ids input.")
    text = read_text_file(Path(text_file)) if text_file else builtin_text("heldout")
    ids = tokenize(text, find_tokenizer(model_path, tokenizer))
    feeds = windows_from_ids(ids, windows, seq_len)
    sess = session(model_path, threads=threads)
    other = None
    if compare is not None:
        other_specs = input_specs(load_model(compare))
        other = (session(compare, threads=threads), other_specs)
    nll, other_nll, agree, kl = [], [], [], []
    for feed in track(feeds, "evaluating", total=len(feeds), enabled=show_progress):
        ids = feed["input_ids"][0]
        logits = sess.run([sess.get_outputs()[0].name], complete_feed(feed, specs))[0][0]
        logprobs = log_softmax(logits[:-1])  # once per window: NLL and KL both read it
        nll.append(nll_of(logprobs, ids))
        if other is not None:
            osess, ospecs = other
            ologits = osess.run([osess.get_outputs()[0].name], complete_feed(feed, ospecs))[0][0]
            ologprobs = log_softmax(ologits[:-1])
            other_nll.append(nll_of(ologprobs, ids))
            agree.append(logits.argmax(-1) == ologits.argmax(-1))
            kl.append(kl_of(ologprobs, logprobs))
    all_nll = np.concatenate(nll)
    comparison = None
    if other is not None:
        other_ppl = float(np.exp(np.concatenate(other_nll).mean()))
        comparison = {
            "model": str(compare),
            "perplexity": other_ppl,
            "perplexity_ratio": float(np.exp(all_nll.mean())) / other_ppl,
            "top1_agreement": float(np.concatenate(agree).mean()),
            "kl_divergence": float(np.concatenate(kl).mean()),
        }
    return EvalResult(
        model=str(model_path),
        perplexity=float(np.exp(all_nll.mean())),
        tokens=int(all_nll.size),
        windows=len(feeds),
        seq_len=seq_len,
        seconds=round(time.perf_counter() - start, 2),
        text=str(text_file) if text_file else "built-in held-out text",
        compare=comparison,
    )
