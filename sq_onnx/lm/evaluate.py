"""Perplexity of an ONNX language model through ONNX Runtime, on held-out text.

The default text is the held-out part of the built-in text, which calibration never sees.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from sq_onnx.calibration.builtin_text import builtin_text
from sq_onnx.calibration.calibration_data import find_tokenizer, read_text_file, tokenize, windows_from_ids
from sq_onnx.errors import SqOnnxError
from sq_onnx.runtime.model_inputs import complete_feed, input_specs, is_language_model
from sq_onnx.runtime.model_io import load_model
from sq_onnx.runtime.ort_session import session
from sq_onnx.runtime.progress import track


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
    domain: str = ""

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


def _load(model_path, threads):
    specs = input_specs(load_model(model_path), model_path)
    if not is_language_model(specs):
        raise SqOnnxError("eval needs a language model with an input_ids input.")
    return session(model_path, threads=threads), specs


def _score(feeds, model, other, show_progress: bool, label: str) -> tuple[np.ndarray, dict | None]:
    """NLL of every window's tokens under ``model``; with ``other`` (the reference), its perplexity, the
    ratio, top-1 agreement and the mean KL divergence from its next-token distribution to ``model``'s."""
    sess, specs = model
    nll, other_nll, agree, kl = [], [], [], []
    for feed in track(feeds, label, total=len(feeds), enabled=show_progress):
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
    if other is None:
        return all_nll, None
    other_ppl = float(np.exp(np.concatenate(other_nll).mean()))
    return all_nll, {
        "perplexity": other_ppl,
        "perplexity_ratio": float(np.exp(all_nll.mean())) / other_ppl,
        "top1_agreement": float(np.concatenate(agree).mean()),
        "kl_divergence": float(np.concatenate(kl).mean()),
    }


def text_sources(texts: Sequence[str | os.PathLike]) -> dict[str, Path]:
    """Named texts for ``evaluate_domains``: each file by its stem; a folder gives each .txt in it."""
    named: dict[str, Path] = {}
    for item in texts:
        path = Path(item)
        if path.is_dir():
            files = sorted(path.glob("*.txt"))
            if not files:
                raise SqOnnxError(f"the folder {str(path)!r} holds no .txt files.")
        elif path.is_file():
            files = [path]
        else:
            raise SqOnnxError(f"text file {str(path)!r} does not exist.")
        for f in files:
            if f.stem in named:
                raise SqOnnxError(f"two texts are named {f.stem!r}: {named[f.stem]} and {f}.")
            named[f.stem] = f
    return named


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
    texts = {"text": Path(text_file)} if text_file else {"built-in held-out text": None}
    return evaluate_domains(
        model_path, texts, seq_len, windows, tokenizer, threads, show_progress, compare
    ).domains[0]


@dataclass
class DomainsResult:
    """One ``EvalResult`` per text, and the mean and worst over them of each comparison figure."""

    domains: list[EvalResult]
    mean: dict | None
    worst: dict | None

    def to_dict(self) -> dict:
        return {"domains": [d.to_dict() for d in self.domains], "mean": self.mean, "worst": self.worst}


def summarize(domains: list[EvalResult]) -> tuple[dict | None, dict | None]:
    """Mean and worst over the domains: perplexity ratio and KL (worst = highest), top-1 (worst = lowest)."""
    if not domains or any(d.compare is None for d in domains):
        return None, None
    keys = {"perplexity_ratio": max, "kl_divergence": max, "top1_agreement": min}
    mean = {k: float(np.mean([d.compare[k] for d in domains])) for k in keys}
    worst = {}
    for key, pick in keys.items():
        chosen = pick(domains, key=lambda d, k=key: d.compare[k])
        worst[key] = chosen.compare[key]
        worst[f"{key}_domain"] = chosen.domain
    return mean, worst


def evaluate_domains(
    model_path: str | os.PathLike,
    texts: Mapping[str, Path | None],
    seq_len: int = 512,
    windows: int = 16,
    tokenizer: str | os.PathLike | None = None,
    threads: int | None = None,
    show_progress: bool = False,
    compare: str | os.PathLike | None = None,
) -> DomainsResult:
    """``perplexity`` on each named text (None = the built-in held-out text), both sessions made once.
    A quantizer that holds on one kind of text can fail on another: read the worst row, not the mean."""
    model = _load(model_path, threads)
    other = _load(compare, threads) if compare is not None else None
    tok_file = find_tokenizer(model_path, tokenizer)
    results = []
    for name, path in texts.items():
        start = time.perf_counter()
        text = read_text_file(path) if path is not None else builtin_text("heldout")
        feeds = windows_from_ids(tokenize(text, tok_file), windows, seq_len)
        nll, comparison = _score(feeds, model, other, show_progress, f"evaluating {name}")
        if comparison is not None:
            comparison = {"model": str(compare), **comparison}
        results.append(
            EvalResult(
                model=str(model_path),
                perplexity=float(np.exp(nll.mean())),
                tokens=int(nll.size),
                windows=len(feeds),
                seq_len=seq_len,
                seconds=round(time.perf_counter() - start, 2),
                text=str(path) if path is not None else "built-in held-out text",
                compare=comparison,
                domain=name,
            )
        )
    return DomainsResult(results, *summarize(results))
