"""`sq-onnx export` from a local HF folder and `sq-onnx eval` perplexity on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sq_onnx.cli import main
from sq_onnx.evaluate import perplexity, token_nll

import tiny_models
from conftest import ids_feed, run


def test_token_nll_matches_direct_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6, 11))
    ids = rng.integers(0, 11, 6)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -np.log(p[np.arange(5), ids[1:]])
    np.testing.assert_allclose(token_nll(logits, ids), expected, rtol=1e-10)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf")
    model = tiny_models.build_torch_model("llama", seed=3, layers=1)
    model.save_pretrained(folder)
    tok = tiny_models.write_tokenizer(folder)
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=str(tok)).save_pretrained(folder)
    return folder, model


def test_export_hf_folder_matches_torch(hf_folder, tmp_path):
    import torch

    folder, model = hf_folder
    out = tmp_path / "onnx"
    assert main(["export", str(folder), "-o", str(out), "--quiet"]) == 0
    assert (out / "model.onnx").exists() and (out / "tokenizer.json").exists()
    feed = ids_feed(seq=20)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(feed["input_ids"])).logits.numpy()
    np.testing.assert_allclose(run(out / "model.onnx", feed), ref, atol=1e-4, rtol=1e-4)
    assert main(["export", str(folder), "-o", str(out), "--quiet"]) == 2  # refuses to overwrite


def test_eval_perplexity_and_json(llama_dir, capsys):
    result = perplexity(llama_dir / "model.onnx", seq_len=64, windows=3)
    assert result.windows == 3 and result.tokens == 3 * 63
    # an untrained model with a 256-token vocabulary is close to uniform, never better than ~1
    assert 10 < result.perplexity < 2000
    assert main(["eval", str(llama_dir / "model.onnx"), "--seq-len", "64", "--windows", "2", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["windows"] == 2 and data["perplexity"] > 1
