"""Graphs from onnxruntime-genai's model builder (SkipSimplifiedLayerNormalization, GroupQueryAttention, fused
qkv_proj): the same smoothing groups as sq-onnx's own torch.onnx export of the same model, and the converted
folder still runs in onnxruntime-genai, greedily decoding what sq-onnx's runner decodes from it."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.passes.analyze import analyze

import tiny_models

pytest.importorskip("onnxruntime_genai", reason="onnxruntime-genai is not installed")
if importlib.util.find_spec("onnxruntime_genai.models.builder") is None:
    pytest.skip("this onnxruntime-genai has no model builder", allow_module_level=True)

import onnxruntime_genai as og  # noqa: E402
from test_genai import PROMPT, assert_same_tokens  # noqa: E402


@pytest.fixture(scope="module")
def builder_folder(tmp_path_factory) -> Path:
    """The builder's fp32 CPU folder of the tiny Llama that the llama_kv fixture exports with torch.onnx."""
    root = tmp_path_factory.mktemp("genai_builder")
    hf = tiny_models.save_hf_folder(tiny_models.build_torch_model("llama", seed=4, layers=2), root / "hf")
    out = root / "builder"
    cmd = [
        sys.executable,
        "-m",
        "onnxruntime_genai.models.builder",
        "-m",
        str(hf),
        "-i",
        str(hf),
        "-o",
        str(out),
    ]
    subprocess.run(
        [*cmd, "-p", "fp32", "-e", "cpu", "-c", str(root / "cache")], check=True, capture_output=True
    )
    # the builder adds the test tokenizer's <|endoftext|> (id 256, outside the tiny vocabulary) as an end token,
    # which genai then refuses: keep the model's own
    config = json.loads((out / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = 2
    (out / "genai_config.json").write_text(json.dumps(config))
    return out


def _roles(consumers: list[str]) -> tuple[str, ...]:
    """Which projections a group feeds, in either exporter's names (the builder fuses q, k and v)."""
    roles = []
    for name in consumers:
        for role, keys in (
            ("qkv", ("q_proj", "k_proj", "v_proj", "qkv_proj")),
            ("mlp_in", ("gate_proj", "up_proj")),
        ):
            if any(k in name for k in keys):
                roles.append(role)
                break
        else:
            roles.append(next((k for k in ("down_proj", "o_proj", "lm_head") if k in name), name))
    return tuple(sorted(set(roles)))


def test_builder_and_torch_onnx_graphs_have_the_same_groups(builder_folder, llama_kv):
    _, torch_folder = llama_kv
    found = {}
    for label, path in (
        ("builder", builder_folder / "model.onnx"),
        ("torch.onnx", torch_folder / "model.onnx"),
    ):
        groups = analyze(ir.load(path).graph, through_linears=True).groups
        found[label] = [_roles([c.module for c in g.consumers]) for g in groups]
    # per layer norm -> q, k, v; v -> o (GroupQueryAttention on the builder's packed qkv_proj, repeat_kv in
    # torch.onnx's); norm -> gate, up; up -> down through the gated product; final norm -> lm_head
    layer = [("qkv",), ("o_proj",), ("mlp_in",), ("down_proj",)]
    assert found["builder"] == found["torch.onnx"] == [*layer, *layer, ("lm_head",)]
    builder_norms = analyze(ir.load(builder_folder / "model.onnx").graph).groups
    assert {g.kind for g in builder_norms} == {
        "SimplifiedLayerNormalization",
        "SkipSimplifiedLayerNormalization",
    }


def test_a_converted_builder_folder_runs_in_genai(builder_folder, tmp_path, calib_ids):
    out = tmp_path / "w4" / "model.onnx"
    result = convert(
        builder_folder / "model.onnx", out, Recipe(samples=4, block_size=32), calibration=calib_ids
    )
    assert result.genai is not None and result.genai["written"]
    assert len(result.smoothed_groups) == 5
    assert_same_tokens(out.parent, out)


def _genai_logits(folder: Path, steps: int = 4) -> np.ndarray:
    """The last position's logits at each greedy step of onnxruntime-genai (the prompt, then through the cache)."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + steps, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    logits = []
    while not generator.is_done():
        logits.append(np.array(generator.get_logits()).reshape(-1))
        generator.generate_next_token()
    return np.stack(logits)


def test_the_builders_attention_values_fold_exactly_through_its_kv_cache(builder_folder, tmp_path, calib_ids):
    """v -> o through GroupQueryAttention: the cache then holds V / s, which genai feeds back step after step;
    the smoothed float model must still compute what the builder's does."""
    out = tmp_path / "smooth" / "model.onnx"
    recipe = Recipe(scheme="smooth", linear_folds="on", samples=4)
    result = convert(builder_folder / "model.onnx", out, recipe, calibration=calib_ids)
    assert sum("GroupQueryAttention" in g["kind"] for g in result.smoothed_groups) == 2
    before, after = _genai_logits(builder_folder), _genai_logits(out.parent)
    assert before.shape == after.shape and before.shape[0] > 1
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 1e-5
