"""Every common LLM family, exported with its KV cache: the smoothing groups each layer must have (which norm
feeds which linears, what folds into a linear producer, what cannot be smoothed and why), smoothing that
keeps the function, and W8A8 conversion. The README's family table is this file's EXPECTED."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.passes.analyze import analyze
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
    # fused projections: v and up are column slices of one linear's output, not a linear's own columns
    "phi3": {"norms": {("qkv_proj",), ("gate_up_proj",), ("lm_head",)}, "folds": set(), "unsmoothed": 2},
    # Conv1D flattens [B, S, C] before its addmm (looked through); GELU is not positively homogeneous
    "gpt2": {"norms": {("c_attn",), ("c_fc",), ("lm_head",)}, "folds": set(), "unsmoothed": 2},
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
