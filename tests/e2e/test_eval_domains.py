"""`sq-onnx eval` on several texts: one row per domain, their mean and worst, against torch's own loss."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from sq_onnx import Recipe, convert
from sq_onnx.cli import main
from sq_onnx.errors import SqOnnxError
from sq_onnx.lm.evaluate import evaluate_domains, text_sources

TEXTS = {
    "prose": "The quick brown fox jumps over the lazy dog. " * 60,
    "code": "def add(a, b):\n    return a + b\n\nclass Point:\n    x: int = 0\n\n" * 40,
}


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    folder = tmp_path_factory.mktemp("domains")
    for name, text in TEXTS.items():
        (folder / f"{name}.txt").write_text(text)
    return folder


@pytest.fixture(scope="module")
def w4(llama_kv, tmp_path_factory):
    _, folder = llama_kv
    out = tmp_path_factory.mktemp("w4_domains") / "model.onnx"
    convert(folder / "model.onnx", out, Recipe(samples=2, seq_len=16, gptq=False, calib_mix=("docs",)))
    (out.parent / "tokenizer.json").write_bytes((folder / "tokenizer.json").read_bytes())
    return out


def _torch_window_stats(model, tok_file, text, seq_len, windows):
    """Per window: torch's NLL of every next token and its log-probabilities (independent of sq-onnx)."""
    ids = Tokenizer.from_file(str(tok_file)).encode(text, add_special_tokens=False).ids
    out = []
    for i in range(windows):
        chunk = torch.tensor([ids[i * seq_len : (i + 1) * seq_len]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=chunk).logits[0, :-1].double(), -1)
        out.append((-logp[torch.arange(seq_len - 1), chunk[0, 1:]]).numpy())
    return np.concatenate(out)


def test_each_domain_is_torchs_perplexity_on_that_text(llama_kv, texts):
    model, folder = llama_kv
    result = evaluate_domains(folder / "model.onnx", text_sources([texts]), seq_len=32, windows=3)
    assert [d.domain for d in result.domains] == ["code", "prose"]
    for d in result.domains:
        nll = _torch_window_stats(model, folder / "tokenizer.json", TEXTS[d.domain], 32, 3)
        assert d.tokens == nll.size == 3 * 31
        np.testing.assert_allclose(d.perplexity, np.exp(nll.mean()), rtol=1e-4)
    assert result.mean is None and result.worst is None  # nothing to compare with


def test_mean_and_worst_over_domains_against_a_reference(llama_kv, w4, texts):
    _, folder = llama_kv
    result = evaluate_domains(w4, text_sources([texts]), seq_len=32, windows=3, compare=folder / "model.onnx")
    kls = {d.domain: d.compare["kl_divergence"] for d in result.domains}
    top1 = {d.domain: d.compare["top1_agreement"] for d in result.domains}
    assert all(v > 0 for v in kls.values()) and kls["code"] != kls["prose"]
    assert result.mean["kl_divergence"] == pytest.approx((kls["code"] + kls["prose"]) / 2)
    assert result.worst["kl_divergence"] == max(kls.values())
    assert result.worst["kl_divergence_domain"] == max(kls, key=kls.get)
    assert result.worst["top1_agreement_domain"] == min(top1, key=top1.get)


def test_cli_prints_a_row_per_domain_and_json(llama_kv, w4, texts, capsys):
    _, folder = llama_kv
    ref = str(folder / "model.onnx")
    assert (
        main(["eval", str(w4), "--texts", str(texts), "--seq-len", "32", "--windows", "2", "--compare", ref])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["domain", "perplexity"]
    assert [ln.split()[0] for ln in lines[2:]] == ["code", "prose", "mean", "worst"]
    args = ["eval", str(w4), "--text", str(texts / "prose.txt"), "--text", str(texts / "code.txt"), "--json"]
    assert main([*args, "--seq-len", "32", "--windows", "2"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [d["domain"] for d in data["domains"]] == ["prose", "code"]


def test_bad_texts_are_user_errors(tmp_path, texts):
    with pytest.raises(SqOnnxError, match="does not exist"):
        text_sources([tmp_path / "nope.txt"])
    with pytest.raises(SqOnnxError, match="no .txt"):
        text_sources([tmp_path])
    with pytest.raises(SqOnnxError, match="two texts are named"):
        text_sources([texts, texts / "code.txt"])
