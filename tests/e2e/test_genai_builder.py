"""Graphs from onnxruntime-genai's model builder (SkipSimplifiedLayerNormalization, GroupQueryAttention, fused
qkv_proj): the same smoothing groups as sq-onnx's own torch.onnx export of the same model, and the converted
folder still runs in onnxruntime-genai, greedily decoding what sq-onnx's runner decodes from it."""

from __future__ import annotations

import importlib.util
import json
import shutil
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


def _built(root: Path, precision: str, provider: str, family: str = "llama") -> Path:
    """The builder's folder of a tiny model: the Llama that the llama_kv fixture exports with torch.onnx, or
    another of tiny_models.FAMILIES."""
    hf = root / f"hf-{family}"
    if not hf.exists():
        tiny_models.save_hf_folder(tiny_models.build_family(family, seed=4), hf)
    out = root / f"builder-{family}-{precision}-{provider}"
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
        [*cmd, "-p", precision, "-e", provider, "-c", str(root / "cache")], check=True, capture_output=True
    )
    # the builder adds the test tokenizer's <|endoftext|> (id 256, outside the tiny vocabulary) as an end token,
    # which genai then refuses: keep the model's own
    config = json.loads((out / "genai_config.json").read_text())
    config["model"]["eos_token_id"] = 2
    (out / "genai_config.json").write_text(json.dumps(config))
    return out


@pytest.fixture(scope="module")
def builder_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("genai_builder")


@pytest.fixture(scope="module")
def builder_folder(builder_root) -> Path:
    """The builder's fp32 CPU folder."""
    return _built(builder_root, "fp32", "cpu")


@pytest.fixture(scope="module")
def builder_fp16_folder(builder_root) -> Path:
    """The builder's fp16 folder for CUDA (GroupQueryAttention, float16 weights and cache), as GPU users have
    them; ORT's CPU provider runs it too. (Its fp16 graph for the CPU, MultiHeadAttention with Casts ORT
    inserts, fails to decode in onnxruntime-genai 0.18 / ORT 1.32 themselves: test_reliability's
    one-sentence test covers what convert says of such a graph.)"""
    return _built(builder_root, "fp16", "cuda")


@pytest.fixture(scope="module")
def builder_qwen3_folder(builder_root) -> Path:
    """The builder's fp32 CPU folder of a tiny Qwen3: GroupQueryAttention on separate q, k, v (q / k norms
    between the packed qkv_proj's Split and the attention), Split sizes as a Constant node, no shapes."""
    return _built(builder_root, "fp32", "cpu", "qwen3")


@pytest.fixture(scope="module")
def builder_gemma2_folder(builder_root) -> Path:
    """The builder's fp32 CPU folder of a tiny Gemma 2: its sliding-window layers' GroupQueryAttention keeps a
    cache of the window's length (``sliding_window_cache``), which refuses an empty one."""
    return _built(builder_root, "fp32", "cpu", "gemma2")


BUILDER_FOLDERS = {
    "llama": "builder_folder",
    "qwen3": "builder_qwen3_folder",
    "gemma2": "builder_gemma2_folder",
}


def _on_the_cpu(folder: Path, to: Path) -> Path:
    """A copy of a genai folder whose config runs it on the CPU provider (this machine has no GPU)."""
    shutil.copytree(folder, to)
    config = json.loads((to / "genai_config.json").read_text())
    config["model"]["decoder"]["session_options"]["provider_options"] = []
    (to / "genai_config.json").write_text(json.dumps(config))
    return to


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


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_builder_and_torch_onnx_graphs_have_the_same_groups(precision, request, llama_kv):
    builder_folder = request.getfixturevalue(
        "builder_folder" if precision == "fp32" else "builder_fp16_folder"
    )
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


@pytest.mark.parametrize("family", BUILDER_FOLDERS)
def test_a_converted_builder_folder_runs_in_genai(family, request, tmp_path, calib_ids):
    builder_folder = request.getfixturevalue(BUILDER_FOLDERS[family])
    out = tmp_path / "w4" / "model.onnx"
    result = convert(
        builder_folder / "model.onnx", out, Recipe(samples=4, block_size=32), calibration=calib_ids
    )
    assert result.genai is not None and result.genai["written"]
    assert len(result.smoothed_groups) == 5
    assert_same_tokens(out.parent, out)


def test_a_converted_fp16_builder_folder_runs_in_genai(builder_fp16_folder, tmp_path, calib_ids):
    out = tmp_path / "w4" / "model.onnx"
    result = convert(
        builder_fp16_folder / "model.onnx", out, Recipe(samples=4, block_size=32), calibration=calib_ids
    )
    assert result.genai is not None and result.genai["written"]
    assert len(result.smoothed_groups) == 5
    written = ir.load(out)
    nbits = [n for n in written.graph if n.op_type == "MatMulNBits"]
    assert nbits and all(n.inputs[2].dtype == ir.DataType.FLOAT16 for n in nbits), (
        "fp16 scales, as the graph's"
    )
    assert not [n for n in written.graph if n.op_type == "MatMul"], (
        "every linear of the builder's graph is W4"
    )
    config = json.loads((out.parent / "genai_config.json").read_text())
    assert "cuda" in config["model"]["decoder"]["session_options"]["provider_options"][0], "still for the GPU"
    assert_same_tokens(_on_the_cpu(out.parent, tmp_path / "w4-cpu"), out)


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


@pytest.mark.parametrize("family", BUILDER_FOLDERS)
def test_the_builders_attention_values_fold_exactly_through_its_kv_cache(
    family, request, tmp_path, calib_ids
):
    """v -> o through GroupQueryAttention: the cache then holds V / s, which genai feeds back step after step
    (past a sliding window's length for Gemma 2); the smoothed float model must still compute what the
    builder's does."""
    builder_folder = request.getfixturevalue(BUILDER_FOLDERS[family])
    out = tmp_path / "smooth" / "model.onnx"
    recipe = Recipe(scheme="smooth", linear_folds="on", samples=4)
    result = convert(builder_folder / "model.onnx", out, recipe, calibration=calib_ids)
    assert sum("GroupQueryAttention" in g["kind"] for g in result.smoothed_groups) == 2
    before, after = _genai_logits(builder_folder), _genai_logits(out.parent)
    assert before.shape == after.shape and before.shape[0] > 1
    assert np.linalg.norm(after - before) / np.linalg.norm(before) < 1e-5
