"""Graphs from torch.onnx's TorchScript exporter (``dynamo=False``; optimum and many users' own scripts still
export this way): attention reads the normed hidden states' shape (``Shape``), norms are decomposed, most
intermediate values carry no type. Smoothing must still find each norm's linears and keep the function, and
GPTQ's segment runner must still run cuts at untyped values."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.passes.analyze import analyze
from sq_onnx.passes.infer_shapes import known_dims
from sq_onnx.passes.linears import find_linears
from sq_onnx.runtime.model_io import load_model

import tiny_models
from conftest import run


@pytest.fixture(scope="module")
def torchscript_llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchscript_llama")
    return tiny_models.export_torchscript(
        tiny_models.build_torch_model("llama", seed=4), folder / "model.onnx"
    )


def _fold_columns(graph: ir.Graph, attention: bool = True) -> list[list[int]]:
    """Each linear-producer fold's column map in ``graph``: the attention-value folds, or every fold."""
    groups = analyze(graph, through_linears=True).groups
    keep = [g for g in groups if (g.kind.startswith("attention values") if attention else g.through_linear)]
    return [g.column_map.tolist() for g in keep]


def test_a_norm_whose_output_also_feeds_shape_is_smoothed(torchscript_llama):
    graph = ir.load(torchscript_llama).graph
    groups = analyze(graph).groups
    modules = sorted(tuple(sorted(c.name.split("/")[-2] for c in g.consumers)) for g in groups)
    per_layer = [("k_proj", "q_proj", "v_proj"), ("gate_proj", "up_proj")]
    assert modules == sorted([*per_layer, *per_layer, ("lm_head",)])
    shaped = [g for g in groups if any(u.node.op_type == "Shape" for u in g.tensor.uses())]
    assert len(shaped) == 2, "the input norms' outputs also feed attention's Shape"


def test_value_to_output_folds_through_torchscript_attention(torchscript_llama, tmp_path):
    """TorchScript attention computes its head split and repeat_kv's Expand from ``Shape`` through ``Where`` at
    run time, which ONNX's shape inference drops and ONNX Runtime's symbolic inference follows. v_proj -> o_proj
    then folds with the same KV-head column map (GQA: 4 query heads on 2 KV heads) as the dynamo export of the
    same model; the heads are noted beside the model's own shapes, not written into them."""
    dynamo = tiny_models.export_torch(
        tiny_models.build_torch_model("llama", seed=4), tmp_path / "dynamo.onnx"
    )
    model = load_model(torchscript_llama)
    maps = [_fold_columns(graph) for graph in (model.graph, load_model(dynamo).graph)]
    assert len(maps[0]) == 2 and maps[0] == maps[1]
    assert len(set(maps[0][0])) == 32 and maps[0][0] != list(range(64))  # each KV column read by 2 heads
    merged = next(n.inputs[0] for n in model.graph if n.name.endswith("layers.0/self_attn/Reshape_8"))
    assert known_dims(merged)[2:] == (4, 16) and not isinstance(merged.shape[2], int)  # noted, not written


def test_gpt2_value_fold_through_torchscript_attention(torchscript_gpt2, tmp_path):
    """GPT-2's attn c_proj reads attention through Conv1D's flatten, whose dims (like the heads') only ONNX
    Runtime's symbolic inference knows: v (c_attn's last third) -> c_proj folds with the dynamo export's columns."""
    dynamo = tiny_models.export_torch(tiny_models.build_family("gpt2"), tmp_path / "dynamo.onnx")
    maps = [_fold_columns(load_model(path).graph) for path in (torchscript_gpt2, dynamo)]
    assert len(maps[0]) == 2 and maps[0] == maps[1] and maps[0][0] == list(range(128, 192))


@pytest.mark.parametrize("scheme", ["w4", "w8a8"])
def test_a_torchscript_graph_converts_and_keeps_the_function(scheme, torchscript_llama, tmp_path, calib_ids):
    out = tmp_path / "q.onnx"
    recipe = Recipe(scheme=scheme, samples=4, gptq_samples=4, block_size=32)
    result = convert(torchscript_llama, out, recipe, calibration=calib_ids)
    assert len(result.smoothed_groups) == {"w4": 5, "w8a8": 9}[scheme]  # W8A8 also folds up -> down, v -> o
    assert result.smoothing_check["equivalent"]
    ids = tiny_models.random_ids(1, 24, seed=9)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref, got = run(torchscript_llama, feed), run(out, feed)
    assert np.mean(ref.argmax(-1) == got.argmax(-1)) > 0.75


@pytest.fixture(scope="module")
def torchscript_gpt2(tmp_path_factory):
    folder = tmp_path_factory.mktemp("torchscript_gpt2")
    return tiny_models.export_torchscript(tiny_models.build_family("gpt2"), folder / "model.onnx")


def test_gpt2_conv1d_flatten_is_looked_through(torchscript_gpt2):
    """GPT-2's Conv1D flattens its input by a Reshape whose target the graph computes from ``Shape(x)``, and the
    exporter writes no shapes: loading infers them (data propagation), so the flatten is seen to keep the channel
    axis last. Its norms' γ reach them through ``Identity`` (the exporter shares equal tensors)."""
    groups = analyze(load_model(torchscript_gpt2).graph).groups
    modules = sorted(tuple(c.name.split("/")[-2] for c in g.consumers) for g in groups)
    assert modules == sorted([("c_attn",), ("c_fc",), ("c_attn",), ("c_fc",), ("lm_head",)])
    assert all(g.kind == "LayerNormalization, flattened" for g in groups)


def test_a_torchscript_gpt2_converts_smoothed_and_keeps_the_function(torchscript_gpt2, tmp_path, calib_ids):
    out = tmp_path / "q.onnx"
    result = convert(torchscript_gpt2, out, Recipe(scheme="w8a8", samples=4), calibration=calib_ids)
    kinds = [g["kind"].split(" (")[0] for g in result.smoothed_groups]
    assert len(kinds) == 7 and kinds.count("attention values") == 2  # v -> attn c_proj too
    assert result.smoothing_check["equivalent"]
    ids = tiny_models.random_ids(1, 24, seed=9)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref, got = run(torchscript_gpt2, feed), run(out, feed)
    assert np.mean(ref.argmax(-1) == got.argmax(-1)) > 0.75


def test_phi3_up_to_down_fold_through_torchscript_chunk(tmp_path, calib_ids):
    """TorchScript writes Phi-3's ``gate_up.chunk(2, -1)`` as Slices whose bounds it computes from
    ``Shape(gate_up)[-1]`` (a static width): evaluated, up_proj's columns (the second half) fold into down_proj
    as in the dynamo export; v (qkv_proj's last columns) folds into o_proj through the rotary attention; and
    smoothing keeps the function."""
    model = tiny_models.build_family("phi3")
    script = tiny_models.export_torchscript(model, tmp_path / "script" / "model.onnx")
    dynamo = tiny_models.export_torch(model, tmp_path / "dynamo" / "model.onnx")
    maps = [_fold_columns(load_model(path).graph, attention=False) for path in (script, dynamo)]
    assert len(maps[0]) == 4 and maps[0] == maps[1] and list(range(128, 256)) in maps[0]
    out = tmp_path / "smooth.onnx"
    result = convert(
        script, out, Recipe(scheme="smooth", samples=4, linear_folds="on"), calibration=calib_ids
    )
    assert result.smoothing_check["equivalent"]
    kinds = [g["kind"].split(" (")[0] for g in result.smoothed_groups]
    assert kinds.count("gated product") == kinds.count("attention values") == 2
    ids = tiny_models.random_ids(1, 24, seed=9)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref, got = run(script, feed), run(out, feed)
    assert np.abs(ref - got).max() < 1e-5 * np.abs(ref).max()


def test_gpt_neox_per_head_value_fold_in_both_exporters(tmp_path, calib_ids):
    """GPT-NeoX keeps each head's q, k and v side by side in query_key_value ([B, S, H, 3D] after a Reshape):
    V's columns h*3D + 2D + d fold into attention.dense, found through dynamo's Split and TorchScript's Slices
    alike (as optimum exports it), and smoothing with the fold keeps the function."""
    model = tiny_models.build_family("gpt_neox")
    script = tiny_models.export_torchscript(model, tmp_path / "script" / "model.onnx")
    dynamo = tiny_models.export_torch(model, tmp_path / "dynamo" / "model.onnx")
    maps = [_fold_columns(load_model(path).graph) for path in (script, dynamo)]
    heads, head_dim = 4, 16
    expected = [h * 3 * head_dim + 2 * head_dim + d for h in range(heads) for d in range(head_dim)]
    assert len(maps[0]) == 2 and maps[0] == maps[1] and maps[0][0] == expected
    out = tmp_path / "smooth.onnx"
    result = convert(
        script, out, Recipe(scheme="smooth", samples=4, linear_folds="on"), calibration=calib_ids
    )
    assert result.smoothing_check["equivalent"]


def test_linears_whose_bias_the_exporter_shares_through_identity(tmp_path, calib_ids):
    """A fresh model's zero biases are equal tensors, which torch.onnx's TorchScript exporter (and optimum, which
    uses it) shares behind ``Identity`` nodes: those Gemms are still linears (OPT's fc2 and the second layer's
    fc1 were not), fc1 -> fc2 folds, and smoothing keeps the function."""
    import torch

    model = tiny_models.build_family("opt")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.zero_()
    path = tiny_models.export_torchscript(model, tmp_path / "model.onnx")
    graph = load_model(path).graph
    biases = [n.inputs[2] for n in graph if n.op_type == "Gemm" and len(n.inputs) > 2]
    assert any(b.producer() is not None and b.producer().op_type == "Identity" for b in biases)
    names = sorted(linear.name.split("/")[-2] for linear in find_linears(graph))
    assert names == sorted([*["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"] * 2, "lm_head"])
    out = tmp_path / "smooth.onnx"
    result = convert(path, out, Recipe(scheme="smooth", samples=4, linear_folds="on"), calibration=calib_ids)
    kinds = [g["kind"].split(" (")[0] for g in result.smoothed_groups]
    assert result.smoothing_check["equivalent"] and kinds.count("Relu of a linear") == 2
    ids = tiny_models.random_ids(1, 24, seed=9)
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    ref, got = run(path, feed), run(out, feed)
    assert np.abs(ref - got).max() < 1e-5 * np.abs(ref).max()
