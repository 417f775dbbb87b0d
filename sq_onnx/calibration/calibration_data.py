"""Turn the user's calibration source into model feeds (one sample each, batch 1).

Sources: None (the built-in text), a .txt / .jsonl file (tokenized with the model's tokenizer), a .npz
file or a dict of arrays (one array per input name, first axis = samples), or a list of feeds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sq_onnx.calibration.builtin_text import builtin_text
from sq_onnx.calibration.self_text import sample_windows, word_tokens
from sq_onnx.errors import CalibrationError, TokenizerNotFoundError
from sq_onnx.runtime.model_inputs import InputSpec, check_feed, complete_feed, is_language_model
from sq_onnx.runtime.ort_session import session

Feeds = list[dict[str, np.ndarray]]
TOKENIZER_FILE = "tokenizer.json"


def find_tokenizer(model_path: str | os.PathLike | None, tokenizer_dir: str | os.PathLike | None) -> Path:
    """The tokenizer.json given with --tokenizer, or the one beside the model."""
    if tokenizer_dir is not None:
        d = Path(tokenizer_dir)
        cand = d if d.is_file() else d / TOKENIZER_FILE
        if not cand.is_file():
            raise TokenizerNotFoundError(f"no {TOKENIZER_FILE} found in {str(d)!r}.")
        return cand
    if model_path is not None:
        cand = Path(model_path).resolve().parent / TOKENIZER_FILE
        if cand.is_file():
            return cand
    raise TokenizerNotFoundError(
        f"text calibration needs a tokenizer: put {TOKENIZER_FILE} beside the model, pass --tokenizer DIR, "
        "or give --calib FILE.npz."
    )


def tokenize(text: str, tokenizer_file: Path) -> np.ndarray:
    """Token ids of ``text`` (no special tokens), encoded paragraph by paragraph to stay fast."""
    from tokenizers import Tokenizer

    try:
        tok = Tokenizer.from_file(str(tokenizer_file))
    except Exception as exc:
        raise TokenizerNotFoundError(f"could not read tokenizer {str(tokenizer_file)!r} ({exc}).") from None
    paragraphs = [p + "\n\n" for p in text.split("\n\n") if p.strip()]
    ids: list[int] = []
    for enc in tok.encode_batch(paragraphs, add_special_tokens=False):
        ids.extend(enc.ids)
    return np.asarray(ids, dtype=np.int64)


def read_text_file(path: Path) -> str:
    """Plain text, or JSON Lines with a "text" field (or a bare string) per line."""
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"cannot read calibration file {str(path)!r} ({exc}).") from None
    if path.suffix.lower() != ".jsonl":
        return raw
    texts = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            raise CalibrationError(f"{str(path)!r} line {lineno} is not valid JSON.") from None
        text = obj.get("text") if isinstance(obj, dict) else obj
        if not isinstance(text, str):
            raise CalibrationError(f'{str(path)!r} line {lineno} has no "text" string.')
        texts.append(text)
    return "\n\n".join(texts)


def windows_from_ids(ids: np.ndarray, count: int, seq_len: int, min_count: int = 1) -> Feeds:
    """Non-overlapping windows of ``seq_len`` tokens; fewer tokens than one window is an error."""
    available = len(ids) // seq_len
    if available < min_count:
        raise CalibrationError(
            f"the calibration text has {len(ids)} tokens, too short for {min_count} window(s) of {seq_len}; "
            "give more text or a smaller --seq-len."
        )
    n = min(count, available)
    return [{"input_ids": ids[i * seq_len : (i + 1) * seq_len][None, :]} for i in range(n)]


BUILTIN_MIX = ("docs", "code", "self")
BUILTIN_NAMES = {
    "docs": "Python docs (pydoc_data.topics)",
    "code": "standard-library code",
    "self": "the model's own samples",
}


def interleave(parts: list[Feeds], count: int) -> Feeds:
    """The first ``count`` of parts[0][0], parts[1][0], ..., parts[0][1], ...: every source early on."""
    longest = max((len(p) for p in parts), default=0)
    return [part[i] for i in range(longest) for part in parts if i < len(part)][:count]


def builtin_feeds(
    mix: Sequence[str],
    count: int,
    seq_len: int,
    model_path: str | os.PathLike | None,
    tokenizer_file: Path,
    specs: list[InputSpec],
    seed: int = 0,
    show_progress: bool = False,
) -> tuple[Feeds, str]:
    """``count`` windows drawn in turn from the built-in domains of ``mix``: the calibration parts of
    Python's docs and standard-library code (``builtin_text``), and text the model samples itself
    (``self_text``; only from a model file with a KV cache, else that share goes to the others).
    Interleaved, so the first samples (the smoothing statistics) already span every domain."""
    unknown = sorted(set(mix) - set(BUILTIN_MIX))
    if unknown or not mix:
        raise CalibrationError(
            f"the built-in calibration mix takes {', '.join(BUILTIN_MIX)}; got {', '.join(mix) or 'nothing'}."
        )
    domains = list(dict.fromkeys(mix))
    can_sample = model_path is not None and any(s.is_past_kv for s in specs)
    if "self" in domains and not can_sample:
        domains.remove("self")
        if not domains:
            raise CalibrationError(
                "the model cannot sample its own calibration text (no KV cache, or no model file); "
                "add docs or code to the built-in mix, or give --calib FILE."
            )
    per = -(-count // len(domains))
    parts = []
    for domain in domains:
        if domain == "self":
            parts.append(self_windows(model_path, tokenizer_file, specs, per, seq_len, seed, show_progress))
        else:
            parts.append(
                windows_from_ids(tokenize(builtin_text("calibration", domain), tokenizer_file), per, seq_len)
            )
    return interleave(parts, count), "built-in mix: " + ", ".join(BUILTIN_NAMES[d] for d in domains)


def self_windows(
    model_path: str | os.PathLike,
    tokenizer_file: Path,
    specs: list[InputSpec],
    count: int,
    seq_len: int,
    seed: int,
    show_progress: bool = False,
) -> Feeds:
    """``count`` windows the float model samples from random word starts (``sq_onnx.calibration.self_text``)."""
    rng = np.random.default_rng(seed)
    first = word_tokens(tokenizer_file, rng, count)
    sess = session(model_path)
    windows = sample_windows(sess, specs, first, seq_len, seed=seed, show_progress=show_progress)
    return [{"input_ids": w} for w in windows]


def builtin_heldout_feeds(count: int, seq_len: int, tokenizer_file: Path) -> tuple[Feeds, str]:
    """Verification windows from the held-out parts of the built-in texts (docs and code in turn),
    which the built-in calibration never reads."""
    parts = [
        windows_from_ids(tokenize(builtin_text("heldout", d), tokenizer_file), count, seq_len)
        for d in ("docs", "code")
    ]
    return interleave(
        parts, count
    ), "held-out built-in text (Python docs, standard-library modules calibration never reads)"


def feeds_from_arrays(arrays: Mapping[str, np.ndarray], specs: list[InputSpec]) -> Feeds:
    """Split arrays along their first axis into per-sample feeds (batch 1 where the model has a batch axis)."""
    if not arrays:
        raise CalibrationError("the calibration arrays are empty.")
    counts = {name: np.asarray(a).shape[0] if np.asarray(a).ndim else 0 for name, a in arrays.items()}
    if len(set(counts.values())) != 1:
        raise CalibrationError(f"calibration arrays disagree on the number of samples: {counts}.")
    n = next(iter(counts.values()))
    if n == 0:
        raise CalibrationError("the calibration arrays hold no samples.")
    ranks = {s.name: len(s.dims) for s in specs}
    feeds = []
    for i in range(n):
        feed = {}
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            keep_batch = name in ranks and ranks[name] == arr.ndim
            feed[name] = arr[i : i + 1] if keep_batch else arr[i]
        feeds.append(feed)
    return feeds


def load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except Exception as exc:
        raise CalibrationError(
            f"cannot read calibration file {str(path)!r} as .npz ({type(exc).__name__})."
        ) from None


def load_calibration(
    source: Any,
    specs: list[InputSpec],
    *,
    model_path: str | os.PathLike | None,
    tokenizer_dir: str | os.PathLike | None,
    count: int,
    seq_len: int,
    mix: Sequence[str] = BUILTIN_MIX,
    seed: int = 0,
    show_progress: bool = False,
) -> tuple[Feeds, str]:
    """Return up to ``count`` complete, checked feeds and a one-line description of their origin.
    ``mix``: the built-in domains the default calibration draws on (see ``builtin_feeds``)."""
    if source is None or isinstance(source, (str, os.PathLike)):
        if source is None:
            if not is_language_model(specs):
                raise CalibrationError(
                    "the model has no input_ids input, so the built-in text cannot calibrate it; give --calib FILE.npz."
                )
            tokenizer = find_tokenizer(model_path, tokenizer_dir)
            feeds, origin = builtin_feeds(
                mix, count, seq_len, model_path, tokenizer, specs, seed, show_progress
            )
        else:
            path = Path(source)
            if not path.is_file():
                raise CalibrationError(f"calibration file {str(path)!r} does not exist.")
            if path.suffix.lower() == ".npz":
                feeds, origin = feeds_from_arrays(load_npz(path), specs)[:count], f"arrays from {path.name}"
            elif path.suffix.lower() in (".txt", ".jsonl", ".text", ".md"):
                if not is_language_model(specs):
                    raise CalibrationError(
                        "the model has no input_ids input, so it cannot be calibrated with text."
                    )
                text = read_text_file(path)
                if not text.strip():
                    raise CalibrationError(f"calibration file {str(path)!r} is empty.")
                ids = tokenize(text, find_tokenizer(model_path, tokenizer_dir))
                feeds, origin = windows_from_ids(ids, count, seq_len), f"text from {path.name}"
            else:
                raise CalibrationError(f"calibration file {str(path)!r} must be .txt, .jsonl or .npz.")
    elif isinstance(source, Mapping):
        feeds, origin = feeds_from_arrays(source, specs)[:count], "arrays (API)"
    elif isinstance(source, Sequence):
        feeds, origin = [dict(f) for f in source][:count], "feeds (API)"
        if not feeds:
            raise CalibrationError("the calibration feed list is empty.")
    else:
        raise CalibrationError(f"unsupported calibration source of type {type(source).__name__}.")
    return [complete_feed(check_feed(f, specs), specs) for f in feeds], origin
