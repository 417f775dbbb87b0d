"""`sq-onnx export` (with and without KV cache), `eval`, `bench` and `generate` on tiny models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from sq_onnx.cli import main
from sq_onnx.lm.evaluate import perplexity, token_kl, token_nll
from sq_onnx.lm.generate import generate
from sq_onnx.lm.lm_runner import LMRunner
from sq_onnx.runtime.model_inputs import input_specs
from sq_onnx.runtime.model_io import load_model
from sq_onnx.runtime.ort_session import session

import tiny_models
from conftest import run


def test_token_nll_matches_direct_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (6, 11))
    ids = rng.integers(0, 11, 6)
    p = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    expected = -np.log(p[np.arange(5), ids[1:]])
    np.testing.assert_allclose(token_nll(logits, ids), expected, rtol=1e-10)


def test_token_kl_matches_direct_computation():
    rng = np.random.default_rng(1)
    ref, other = rng.normal(0, 3, (2, 5, 9))
    p = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True)
    q = np.exp(other) / np.exp(other).sum(-1, keepdims=True)
    np.testing.assert_allclose(token_kl(ref, other), np.sum(p * np.log(p / q), -1), rtol=1e-10)
    np.testing.assert_allclose(token_kl(ref, ref + 5.0), 0.0, atol=1e-12)  # a shift is the same distribution


@pytest.fixture(scope="module", params=["llama", "qwen2", "opt"])
def exported(request, tmp_path_factory):
    """(torch model, folder with model.onnx exported with KV cache, folder exported without)."""
    arch = request.param
    folder = tmp_path_factory.mktemp(f"hf_{arch}")
    model = tiny_models.build_torch_model(arch, seed=3, layers=2)
    tiny_models.save_hf_folder(model, folder)
    kv, plain = folder.parent / f"{arch}_kv", folder.parent / f"{arch}_plain"
    assert main(["export", str(folder), "-o", str(kv), "--quiet"]) == 0
    assert main(["export", str(folder), "-o", str(plain), "--no-kv-cache", "--quiet"]) == 0
    return model, kv, plain


def test_export_matches_torch_with_and_without_cache(exported):
    model, kv, plain = exported
    ids = tiny_models.random_ids(1, 20, seed=9)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    out = run(plain / "model.onnx", {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=1e-4)
    # with the cache: prefill 19 tokens, then one decode step, must equal the full forward pass
    runner = LMRunner(session(kv / "model.onnx"), input_specs(load_model(kv / "model.onnx")))
    assert runner.has_cache
    np.testing.assert_allclose(runner.prefill(ids[:, :19]), ref[0, 18], atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(runner.step(int(ids[0, 19])), ref[0, 19], atol=1e-4, rtol=1e-4)


def test_export_refuses_existing_output_and_bad_source(exported, tmp_path, capsys):
    _, kv, _ = exported
    assert main(["export", str(kv), "-o", str(kv), "--quiet"]) == 2
    assert main(["export", str(tmp_path / "nothing"), "-o", str(tmp_path / "x"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("sq-onnx: error:") == 2 and "Traceback" not in err


def _torch_greedy_text(model, folder, prompt: str, new_tokens: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad():
        for _ in range(new_tokens):
            nxt = model(input_ids=ids).logits[0, -1].argmax()
            if int(nxt) == tok.eos_token_id:
                break
            ids = torch.cat([ids, nxt.view(1, 1)], dim=1)
    return tok.decode(ids[0, len(tok(prompt)["input_ids"]) :].tolist(), skip_special_tokens=True)


def _torch_perplexity(model, folder, seq_len: int, windows: int) -> float:
    from tokenizers import Tokenizer

    from sq_onnx.calibration.builtin_text import builtin_text

    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    paragraphs = [p + "\n\n" for p in builtin_text("heldout").split("\n\n") if p.strip()]
    ids = [i for enc in tok.encode_batch(paragraphs, add_special_tokens=False) for i in enc.ids]
    losses = []
    for w in range(windows):
        chunk = torch.tensor([ids[w * seq_len : (w + 1) * seq_len]])
        with torch.no_grad():
            losses.append(model(input_ids=chunk, labels=chunk).loss.item())
    return float(np.exp(np.mean(losses)))


def test_eval_bench_generate_on_kv_and_plain_models(exported, capsys):
    model, kv, plain = exported
    expected_ppl = _torch_perplexity(model, kv, 64, 2)
    expected_text = _torch_greedy_text(model, kv, "The module", 5)
    for folder in (kv, plain):
        result = perplexity(folder / "model.onnx", seq_len=64, windows=2)
        assert result.windows == 2 and result.tokens == 2 * 63
        assert result.perplexity == pytest.approx(expected_ppl, rel=1e-4)  # torch's loss on the same ids
        gen = generate(folder / "model.onnx", "The module", max_new_tokens=5)
        assert gen["kv_cache"] == (folder == kv)
        assert gen["text"] == expected_text  # torch's greedy continuation, token for token
    a = generate(kv / "model.onnx", "The module", max_new_tokens=6)
    b = generate(plain / "model.onnx", "The module", max_new_tokens=6)
    assert a["text"] == b["text"]
    assert (
        main(
            [
                "bench",
                str(kv / "model.onnx"),
                "--prompt-lengths",
                "8,16",
                "--decode-tokens",
                "4",
                "--repeats",
                "1",
                "--json",
            ]
        )
        == 0
    )
    data = json.loads(capsys.readouterr().out)
    assert (
        set(data["prefill_ms"]) == {"8", "16"} and data["decode_tokens_per_s"] > 0 and data["peak_rss_mb"] > 0
    )
    assert main(["eval", str(kv / "model.onnx"), "--seq-len", "32", "--windows", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["windows"] == 1
    # the same function exported two ways: ratio 1, full agreement
    cmp = perplexity(kv / "model.onnx", seq_len=32, windows=2, compare=plain / "model.onnx").compare
    assert abs(cmp["perplexity_ratio"] - 1) < 1e-4 and cmp["top1_agreement"] == 1.0
    assert 0 <= cmp["kl_divergence"] < 1e-6


def test_convert_kv_cache_model(exported, tmp_path):
    """Calibration derives position_ids and an empty cache; the quantized model still decodes."""
    from sq_onnx import Recipe, convert

    _, kv, _ = exported
    out = tmp_path / "w8.onnx"
    result = convert(kv / "model.onnx", out, Recipe(scheme="w8a8", samples=2, seq_len=32))
    assert result.quantized_matmuls and result.verify["cosine"] > 0.9
    (tmp_path / "tokenizer.json").write_bytes((kv / "tokenizer.json").read_bytes())
    assert generate(out, "The module", max_new_tokens=3)["kv_cache"]


def test_gguf_round_trip(tmp_path):
    """A tiny Llama written as GGUF (the gguf package, llama.cpp's layout) exports to the same function."""
    model = tiny_models.build_torch_model("llama", seed=4, layers=1)
    tok = tiny_models.write_tokenizer(tmp_path / "tok")
    gguf_path = tiny_models.write_llama_gguf(model, tok, tmp_path / "tiny.gguf")
    out = tmp_path / "onnx"
    assert main(["export", str(gguf_path), "-o", str(out), "--no-kv-cache", "--quiet"]) == 0
    assert (out / "tokenizer.json").exists()
    ids = tiny_models.random_ids(1, 12, seed=2)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()
    got = run(out / "model.onnx", {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4)


def test_fp16_export_converts_to_w4_and_w8a8(tmp_path):
    """fp16 weights are supported: smoothing re-rounds them (checked at fp16 tolerance), both schemes run."""
    from sq_onnx import Recipe, convert

    folder = tiny_models.save_hf_folder(
        tiny_models.build_torch_model("llama", seed=5, layers=1), tmp_path / "hf"
    )
    assert (
        main(
            [
                "export",
                str(folder),
                "-o",
                str(tmp_path / "fp16"),
                "--dtype",
                "fp16",
                "--no-kv-cache",
                "--quiet",
            ]
        )
        == 0
    )
    for scheme in ("w4", "w8a8"):
        out = tmp_path / f"{scheme}.onnx"
        result = convert(tmp_path / "fp16" / "model.onnx", out, Recipe(scheme=scheme, samples=3, seq_len=32))
        assert result.smoothing_check["equivalent"] and result.smoothing_check["tolerance"] == 1e-2
        assert result.verify["cosine"] > 0.9
        logits = run(
            out, {"input_ids": tiny_models.random_ids(1, 8), "attention_mask": np.ones((1, 8), np.int64)}
        )
        assert logits.dtype == np.float16 and np.isfinite(logits).all()
