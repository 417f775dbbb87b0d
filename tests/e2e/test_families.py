"""Every common LLM family, exported with its KV cache: the smoothing groups each layer must have (which norm
feeds which linears, what folds into a linear producer, what cannot be smoothed and why), smoothing that
keeps the function, and W8A8 conversion. The README's family table is this file's EXPECTED."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.passes.analyze import analyze
from sq_onnx.passes.linears import find_linears
from sq_onnx.runtime.model_io import save_model

import tiny_models

LLAMA_LIKE = {
    "norms": {("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("lm_head",)},
    "folds": {("up_proj", "down_proj"), ("v_proj", "o_proj")},
    "unsmoothed": 0,
}
# per family: the consumers of each norm group (module suffixes), the (producer, consumer) of each fold
# into a linear producer, and how many linear inputs stay unsmoothed per layer (with folds on)
EXPECTED = {
    "llama": LLAMA_LIKE,
    "mistral": LLAMA_LIKE,
    "qwen2": LLAMA_LIKE,
    "qwen3": LLAMA_LIKE,
    "gemma2": LLAMA_LIKE,
    "gemma3": LLAMA_LIKE,
    # fused projections: v and up are column slices of one linear's output, which absorb 1/s in those columns
    "phi3": {
        "norms": {("qkv_proj",), ("gate_up_proj",), ("lm_head",)},
        "folds": {("gate_up_proj", "down_proj"), ("qkv_proj", "o_proj")},
        "unsmoothed": 0,
    },
    # Conv1D flattens [B, S, C] before its addmm (looked through, both ways: c_attn's v columns fold through
    # the Split of its unflattened output); GELU is not positively homogeneous, so mlp c_proj stays unsmoothed
    "gpt2": {
        "norms": {("c_attn",), ("c_fc",), ("lm_head",)},
        "folds": {("c_attn", "c_proj")},
        "unsmoothed": 1,
    },
    "opt": {
        "norms": {("q_proj", "k_proj", "v_proj"), ("fc1",), ("lm_head",)},
        "folds": {("fc1", "fc2"), ("v_proj", "out_proj")},
        "unsmoothed": 0,
    },
}


def _suffix(module: str) -> str:
    return module.split(".")[-1] if "." in module else module


@pytest.fixture(scope="module", params=tiny_models.FAMILIES)
def family_model(request, tmp_path_factory):
    from sq_onnx.lm.export import export_model

    folder = tmp_path_factory.mktemp(request.param)
    save_model(export_model(tiny_models.build_family(request.param), kv_cache=True), folder / "model.onnx")
    tiny_models.write_tokenizer(folder)
    return request.param, folder / "model.onnx"


def test_groups_per_layer(family_model):
    family, path = family_model
    expected = EXPECTED[family]
    analysis = analyze(ir.load(path).graph, through_linears=True)
    norms = [g for g in analysis.groups if not g.through_linear]
    folds = [g for g in analysis.groups if g.through_linear]
    consumers = {tuple(_suffix(c.module) for c in g.consumers) for g in norms}
    lm_head = {g for g in consumers if len(g) == 1 and g[0] not in {n[0] for n in expected["norms"]}}
    assert consumers - lm_head | ({("lm_head",)} if lm_head else set()) == expected["norms"]
    assert len(norms) == 2 * 2 + 1  # two per layer and the final norm
    pairs = {(_suffix(g.fold_columns[0].module), _suffix(g.consumers[0].module)) for g in folds}
    assert pairs == expected["folds"] and len(folds) == 2 * len(expected["folds"])
    assert len(analysis.skipped) == 2 * expected["unsmoothed"]
    assert all("cannot absorb" in s.reason for s in analysis.skipped)


def test_smoothing_with_folds_keeps_the_function_and_w8a8_converts(family_model, tmp_path):
    _, path = family_model
    ids = {"input_ids": tiny_models.random_ids(6, 16)}
    smooth = convert(path, tmp_path / "s.onnx", Recipe(scheme="smooth", samples=4, linear_folds="on"), ids)
    assert smooth.smoothing_check["equivalent"], smooth.smoothing_check
    w8a8 = convert(path, tmp_path / "q.onnx", Recipe(scheme="w8a8", samples=4, linear_folds="on"), ids)
    assert w8a8.verify["top1_agreement"] > 0.5
    assert np.isfinite(w8a8.verify["relative_error"]) and w8a8.verify["relative_error"] < 0.5


def test_w4_converts_and_evaluates_and_generates_with_its_cache(family_model, tmp_path):
    """The default W4 recipe (smoothed, GPTQ) on each family; the output evaluates (perplexity on the built-in
    held-out text, against the float model) and decodes greedily through its KV cache."""
    from sq_onnx.lm.evaluate import perplexity
    from sq_onnx.lm.generate import generate

    _, path = family_model
    ids = {"input_ids": tiny_models.random_ids(6, 16)}
    out = tmp_path / "w4.onnx"
    w4 = convert(path, out, Recipe(samples=4, gptq_samples=4, block_size=32), ids, tokenizer=path.parent)
    assert w4.verify["top1_agreement"] > 0.5 and w4.verify["relative_error"] < 0.5
    result = perplexity(out, seq_len=32, windows=2, tokenizer=path.parent, compare=path)
    assert np.isfinite(result.perplexity) and 0.8 < result.compare["perplexity_ratio"] < 1.5
    gen = generate(out, "The", max_new_tokens=4, tokenizer_dir=path.parent)
    assert gen["kv_cache"] and 1 <= gen["new_tokens"] <= 4


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_window_layers_decode_past_the_window_as_torch_does(family, tmp_path):
    """Prefill 5 tokens, then decode one at a time through the KV cache to 14, past the tiny Gemmas' window of
    8: every step's logits are torch's full forward pass at that position (which masks by the window)."""
    import torch

    from sq_onnx.lm.export import export_model
    from sq_onnx.lm.lm_runner import LMRunner
    from sq_onnx.runtime.model_inputs import input_specs
    from sq_onnx.runtime.ort_session import session

    model = tiny_models.build_family(family)
    save_model(export_model(model, kv_cache=True), tmp_path / "model.onnx")
    ids = tiny_models.random_ids(1, 14, seed=3)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids)).logits.numpy()[0]
    runner = LMRunner(session(tmp_path / "model.onnx"), input_specs(ir.load(tmp_path / "model.onnx")))
    got = [runner.prefill(ids[:, :5])] + [runner.step(int(t)) for t in ids[0, 5:]]
    np.testing.assert_allclose(np.stack(got), ref[4:], atol=1e-4, rtol=1e-4)


def test_inspect_and_the_fused_kernels_on_each_family(family_model, tmp_path):
    """`inspect` describes each family (its groups with outliers from calibration) and W8A8 with the sq_onnx
    kernels converts, fusing the norms it can and saying why not for the rest."""
    from sq_onnx.inspect_model import inspect_model
    from sq_onnx.runtime import custom_ops

    family, path = family_model
    ids = {"input_ids": tiny_models.random_ids(6, 16)}
    info = inspect_model(path, calib=ids, samples=4, seq_len=16)
    assert len(info["groups"]) == 2 * 2 + 1 and len(info["outliers"]["groups"]) == len(info["groups"])
    assert info["schemes"]["w4"]["counts"] and info["schemes"]["w8a8"]["counts"]
    if not custom_ops.available():
        pytest.skip("custom-op library not built (no ONNX Runtime headers at install time)")
    out = tmp_path / "k.onnx"
    result = convert(path, out, Recipe(scheme="w8a8", kernels="sq_onnx", samples=4), ids)
    assert result.verify["top1_agreement"] > 0.5 and result.verify["relative_error"] < 0.5
    fusions = result.fusions
    # both norms of each layer fuse with their quantization; GPT-2's through Conv1D's flattening Reshape
    assert fusions is not None and fusions["fused"] == 2 * 2
    if family == "gpt2":  # the fused norms with the reshapes moved after them compute what the stock ops do
        stock_out = tmp_path / "stock.onnx"
        convert(path, stock_out, Recipe(scheme="w8a8", samples=4), ids)
        from sq_onnx.lm.lm_runner import LMRunner
        from sq_onnx.runtime.model_inputs import input_specs
        from sq_onnx.runtime.ort_session import session

        ids = tiny_models.random_ids(1, 12, seed=3)
        ref, stock, fused = (
            LMRunner(session(p), input_specs(ir.load(p))).prefill(ids) for p in (path, stock_out, out)
        )
        assert np.linalg.norm(stock - fused) < 0.1 * np.linalg.norm(ref - stock) + 1e-5 * np.linalg.norm(ref)
    assert all(r["reason"] for r in fusions["not_fused"])


def test_masked_attention_keeps_each_family(family_model, tmp_path):
    """``--kernels sq_onnx``'s attention fusion on each family's float export: every layer's attention becomes
    MaskedAttention but Gemma 2's (its soft-capping sits between the scale and the mask), and prefill then
    decode through the KV cache give the same logits to float rounding."""
    from sq_onnx.lm.lm_runner import LMRunner
    from sq_onnx.passes.fuse_masked_attention import FuseMaskedAttentionPass
    from sq_onnx.runtime import custom_ops
    from sq_onnx.runtime.model_inputs import input_specs
    from sq_onnx.runtime.ort_session import session

    if not custom_ops.available():
        pytest.skip("custom-op library not built (no ONNX Runtime headers at install time)")
    family, path = family_model
    model = ir.load(path)
    fuse = FuseMaskedAttentionPass()
    fuse(model)
    assert fuse.fused == (0 if family == "gemma2" else 2)
    ir.save(model, tmp_path / "fused.onnx")
    ids = tiny_models.random_ids(1, 10, seed=3)
    logits = []
    for p in (path, tmp_path / "fused.onnx"):
        runner = LMRunner(session(p), input_specs(ir.load(p)))
        steps = [runner.prefill(ids)]
        steps += [runner.step(int(steps[-1].argmax())) for _ in range(5)]
        logits.append(np.stack(steps))
    assert np.linalg.norm(logits[0] - logits[1]) <= 1e-5 * np.linalg.norm(logits[0])


# Beyond issue 27's list: per family the consumers of each norm group, the folds, and what stays unsmoothed per
# layer with the words of its reason. Parallel blocks (Phi-2, GPT-NeoX, Falcon) give one norm group feeding
# attention and MLP; GPT-NeoX keeps each head's q, k and v side by side in query_key_value (V's columns fold),
# Falcon's multi-query layout slices heads instead, not looked through (its dense stays unsmoothed); OLMo 2's q, k, v, gate and up read the
# residual stream itself (its norms come after each block), which also feeds the residual Add.
MORE_EXPECTED = {
    "phi": {
        "norms": {("q_proj", "k_proj", "v_proj", "fc1"), ("lm_head",)},
        "folds": {("v_proj", "dense")},
        "unsmoothed": {"fc2": "cannot absorb"},
    },
    # V is columns [2D, 3D) of each head's slice of query_key_value: its columns h*3D + 2D + d fold into dense
    "gpt_neox": {
        "norms": {("query_key_value",), ("dense_h_to_4h",), ("lm_head",)},
        "folds": {("query_key_value", "dense")},
        "unsmoothed": {"dense_4h_to_h": "Gelu"},
    },
    "falcon": {
        "norms": {("query_key_value", "dense_h_to_4h"), ("lm_head",)},
        "folds": set(),
        "unsmoothed": {"dense": "Reshape", "dense_4h_to_h": "Gelu"},
    },
    "stablelm": {**LLAMA_LIKE, "unsmoothed": {}},
    "granite": {**LLAMA_LIKE, "unsmoothed": {}},
    "smollm3": {**LLAMA_LIKE, "unsmoothed": {}},
    "olmo2": {
        "norms": {("lm_head",)},
        "folds": {("up_proj", "down_proj"), ("v_proj", "o_proj")},
        "unsmoothed": {n: "feeds Add" for n in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")},
    },
}


@pytest.fixture(scope="module", params=tiny_models.MORE_FAMILIES)
def more_family_model(request, tmp_path_factory):
    from sq_onnx.lm.export import export_model

    folder = tmp_path_factory.mktemp(request.param)
    model = tiny_models.build_family(request.param)
    save_model(export_model(model, kv_cache=True), folder / "model.onnx")
    tiny_models.write_tokenizer(folder)
    return request.param, folder / "model.onnx"


def test_more_families_groups_exact_smoothing_and_conversion(more_family_model, tmp_path):
    family, path = more_family_model
    expected = MORE_EXPECTED[family]
    graph = ir.load(path).graph
    analysis = analyze(graph, through_linears=True)
    module = {lin.node.name: lin.module for lin in find_linears(graph)}
    norms = [g for g in analysis.groups if not g.through_linear]
    folds = [g for g in analysis.groups if g.through_linear]
    consumers = [tuple(_suffix(c.module) for c in g.consumers) for g in norms]
    head = consumers.pop()  # the final norm's group comes last: the lm_head, under whatever name
    assert len(head) == 1 and set(consumers) | {("lm_head",)} == expected["norms"]
    assert len(consumers) == 2 * (len(expected["norms"]) - 1)  # every layer's, two layers
    pairs = {(_suffix(g.fold_columns[0].module), _suffix(g.consumers[0].module)) for g in folds}
    assert pairs == expected["folds"] and len(folds) == 2 * len(expected["folds"])
    skipped = {}
    for s in analysis.skipped:
        for c in s.consumers:
            skipped.setdefault(_suffix(module[c]), set()).add(s.reason)
    assert set(skipped) == set(expected["unsmoothed"]), skipped
    for name, words in expected["unsmoothed"].items():
        assert all(words in reason for reason in skipped[name]), skipped[name]
    ids = {"input_ids": tiny_models.random_ids(6, 16)}
    smooth = convert(path, tmp_path / "s.onnx", Recipe(scheme="smooth", samples=4, linear_folds="on"), ids)
    assert smooth.smoothing_check["equivalent"], smooth.smoothing_check
    w8a8 = convert(path, tmp_path / "q.onnx", Recipe(scheme="w8a8", samples=4), ids)
    assert w8a8.verify["top1_agreement"] > 0.5 and w8a8.verify["relative_error"] < 0.5
    w4 = convert(path, tmp_path / "w4.onnx", Recipe(samples=4, gptq_samples=4, block_size=32), ids)
    assert np.isfinite(w4.verify["relative_error"]) and w4.quantized_matmuls
