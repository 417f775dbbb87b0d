"""The built-in calibration mix (docs, code, the model's own samples) and verification on held-out text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from sq_onnx import Recipe, convert
from sq_onnx.calibration.builtin_text import builtin_text
from sq_onnx.calibration.calibration_data import builtin_feeds, builtin_heldout_feeds
from sq_onnx.calibration.self_text import TOP_K, _softmax_sample, sample_windows
from sq_onnx.cli import main
from sq_onnx.errors import CalibrationError, RecipeError
from sq_onnx.runtime.model_inputs import input_specs
from sq_onnx.runtime.model_io import load_model
from sq_onnx.runtime.ort_session import session


def _decode(tok_file, feed) -> str:
    return Tokenizer.from_file(str(tok_file)).decode(feed["input_ids"][0].tolist())


def test_sampler_follows_the_top_k_softmax():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, 100).astype(np.float32)
    draws = _softmax_sample(np.tile(logits, (200_000, 1)), np.random.default_rng(1), temperature=1.0)
    top = np.argsort(-logits)[:TOP_K]
    assert set(np.unique(draws)) <= set(top.tolist()), "only the top-k tokens may be drawn"
    expected = np.exp(logits[top] - logits[top].max())
    expected /= expected.sum()
    freq = np.array([(draws == t).mean() for t in top])
    # total variation: sampling noise here is below 0.007; a sampler that loses 10% of the mass is 0.1 off
    assert 0.5 * np.abs(freq - expected).sum() < 0.025


def test_sampled_windows_at_low_temperature_are_torchs_greedy_continuation(llama_kv):
    # A near-zero temperature makes sampling greedy: every step must then be torch's argmax, which
    # fails if the KV cache, positions or mask are fed wrongly at any step.
    model, folder = llama_kv
    path = folder / "model.onnx"
    specs = input_specs(load_model(path))
    first = np.array([5, 17, 40], dtype=np.int64)
    windows = sample_windows(session(path), specs, first, seq_len=12, temperature=1e-6, batch=2)
    assert [w.shape for w in windows] == [(1, 12)] * 3
    for start, window in zip(first, windows, strict=True):
        ids = torch.tensor([[int(start)]])
        with torch.no_grad():
            for _ in range(11):
                nxt = model(input_ids=ids).logits[0, -1].argmax()
                ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
        assert window[0].tolist() == ids[0].tolist()


def test_mix_interleaves_domains_and_samples_from_the_model(llama_kv, capsys):
    _, folder = llama_kv
    path, tok = folder / "model.onnx", folder / "tokenizer.json"
    specs = input_specs(load_model(path))
    feeds, origin = builtin_feeds(
        ("docs", "code", "self"), 7, 24, path, tok, specs, seed=3, show_progress=True
    )
    # the model's own samples take minutes on a large model: they report progress (stderr is not a terminal here)
    assert "sq-onnx: sampling calibration text: 1/1 done in" in capsys.readouterr().err
    assert origin == (
        "built-in mix: Python docs (pydoc_data.topics), standard-library code, the model's own samples"
    )
    assert len(feeds) == 7 and all(f["input_ids"].shape == (1, 24) for f in feeds)
    # in turn: docs, code, self, docs, ...; each text window comes from its domain's calibration part
    docs, code = builtin_text("calibration", "docs"), builtin_text("calibration", "code")
    assert _decode(tok, feeds[0]) in docs and _decode(tok, feeds[3]) in docs
    assert _decode(tok, feeds[1]) in code and _decode(tok, feeds[4]) in code
    assert _decode(tok, feeds[2]) not in docs + code
    again, _ = builtin_feeds(("docs", "code", "self"), 7, 24, path, tok, specs, seed=3)
    assert all(np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(feeds, again, strict=True))


def test_heldout_verification_text_is_not_in_the_calibration_part(llama_kv):
    _, folder = llama_kv
    tok = folder / "tokenizer.json"
    feeds, origin = builtin_heldout_feeds(4, 200, tok)
    assert len(feeds) == 4 and "held-out" in origin
    calibration = builtin_text("calibration", "docs") + builtin_text("calibration", "code")
    texts = [_decode(tok, f) for f in feeds]
    assert texts[0] in builtin_text("heldout", "docs") and texts[1] in builtin_text("heldout", "code")
    assert not any(t in calibration for t in texts)


def test_mix_without_a_kv_cache_drops_self_and_says_so(llama_dir):
    path, tok = llama_dir / "model.onnx", llama_dir / "tokenizer.json"
    specs = input_specs(load_model(path))
    feeds, origin = builtin_feeds(("docs", "self"), 3, 16, path, tok, specs)
    assert origin == "built-in mix: Python docs (pydoc_data.topics)" and len(feeds) == 3
    with pytest.raises(CalibrationError, match="cannot sample"):
        builtin_feeds(("self",), 3, 16, path, tok, specs)


def test_convert_default_calibrates_on_the_mix_and_verifies_on_heldout_text(llama_kv, tmp_path):
    _, folder = llama_kv
    result = convert(
        folder / "model.onnx", tmp_path / "w.onnx", Recipe(samples=3, seq_len=16, gptq_samples=6)
    )
    assert result.calibration["source"].endswith("the model's own samples")
    assert result.calibration["verify_source"].startswith("held-out built-in text")
    assert result.verify["samples"] == Recipe().verify_samples == 16


def test_bad_mix_is_one_sentence_and_exit_2(llama_dir, tmp_path, capsys):
    with pytest.raises(RecipeError, match="--calib-mix"):
        Recipe(calib_mix=("docs", "news"))
    code = main(
        ["convert", str(llama_dir / "model.onnx"), "-o", str(tmp_path / "o.onnx"), "--calib-mix", "web"]
    )
    assert code == 2 and "--calib-mix" in capsys.readouterr().err
