"""α searches: the end-to-end (model) search picks the grid's lowest loss; the per-group (layer) search
beats no smoothing; both are recorded in --json and in the output metadata."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.alpha_search import group_error
from sq_onnx.calibration.calibrate import calibrate
from sq_onnx.passes.analyze import analyze
from sq_onnx.passes.smooth import weight_row_absmax
from sq_onnx.quant.smoothing import smoothing_scales
from sq_onnx.recipe import RecipeError

import ir_graphs
import tiny_models
from conftest import ids_feed, rel_error, run
from quant_reference import ref_per_channel


def test_alpha_grid():
    assert Recipe(alpha_step=0.25).alpha_grid() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert len(Recipe(alpha_step=0.05).alpha_grid()) == 21
    with pytest.raises(RecipeError):
        Recipe(scheme="smooth", alpha_search="model")


@pytest.mark.parametrize("scheme", ["w4", "w8a8"])
def test_model_search_picks_the_lowest_loss(scheme, llama_dir, tmp_path):
    out = tmp_path / "auto.onnx"
    recipe = Recipe(
        scheme=scheme, alpha_search="model", alpha_step=0.25, samples=4, seq_len=32, block_size=32
    )
    result = convert(llama_dir / "model.onnx", out, recipe)
    curve = result.alpha_search["curve"]
    assert [c["alpha"] for c in curve] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert result.alpha == min(curve, key=lambda c: c["loss"])["alpha"]
    assert result.alpha_search["loss"] == "cross_entropy" and result.alpha_search["held_out"]
    assert len({round(c["loss"], 6) for c in curve}) > 1  # α really changes the quantized model
    meta = json.loads(ir.load(out).metadata_props["sq_onnx.alpha_search"])
    assert meta["curve"] == curve


@pytest.mark.parametrize(("given", "held_out"), [(12, True), (5, False)])
def test_model_search_scores_samples_the_statistics_never_saw(
    llama_dir, tmp_path, monkeypatch, given, held_out
):
    from sq_onnx import stages

    seen = {}
    real = stages.search_alpha_model

    def spy(src, analysis, plans, recipe, stats, feeds, show_progress):
        seen["feeds"] = feeds
        return real(src, analysis, plans, recipe, stats, feeds, show_progress)

    monkeypatch.setattr(stages, "search_alpha_model", spy)
    ids = tiny_models.random_ids(given, 16)
    recipe = Recipe(scheme="w8a8", alpha_search="model", alpha_step=0.5, samples=4, search_samples=3)
    result = convert(llama_dir / "model.onnx", tmp_path / "a.onnx", recipe, calibration={"input_ids": ids})
    statistics = {ids[i].reshape(-1).tobytes() for i in range(4)}
    scored = {np.asarray(f["input_ids"]).reshape(-1).tobytes() for f in seen["feeds"]}
    assert result.alpha_search["held_out"] is held_out
    # held out: three samples after the statistics' four; too few samples: the statistics' own
    assert (not scored & statistics) if held_out else scored <= statistics
    assert len(scored) == (3 if held_out else min(3, len(seen["feeds"])))


def test_model_search_without_input_ids_uses_output_mse(tmp_path):
    model = ir_graphs.build_norm_graph("LayerNormalization")
    arrays = ir_graphs.sample_inputs(model, samples=6)
    recipe = Recipe(scheme="w8a8", alpha_search="model", alpha_step=0.5, samples=4)
    result = convert(model, tmp_path / "m.onnx", recipe, calibration=arrays)
    assert result.alpha_search["loss"] == "output_mse" and len(result.alpha_search["curve"]) == 3


def test_layer_search_beats_no_smoothing_on_an_outlier_group():
    model = ir_graphs.build_norm_graph("SimplifiedLayerNormalization")
    arrays = ir_graphs.sample_inputs(model, samples=4)
    feeds = [{k: v[i] for k, v in arrays.items()} for i in range(4)]
    groups = analyze(model.graph).groups
    cal = calibrate(
        model,
        {g.name: g.channels for g in groups},
        feeds,
        row_tensors=(groups[0].name,),
        max_rows=64,
        show_progress=False,
    )
    x = cal.rows[groups[0].name]
    assert x.shape == (32, ir_graphs.C)  # 4 feeds x 8 rows, capped at 64
    actions = {c.name: "w8a8" for c in groups[0].consumers}
    recipe = Recipe(scheme="w8a8")
    errors = {
        a: group_error(groups[0], x, cal.absmax[groups[0].name], a, actions, recipe) for a in (0.0, 0.5, 1.0)
    }
    # α = 0 with a flat weight is close to no smoothing; migrating the outliers must help a lot
    assert min(errors[0.5], errors[1.0]) < 0.5 * errors[0.0], errors


def test_layer_search_end_to_end(llama_dir, tmp_path, calib_ids):
    feed = ids_feed(seq=48)
    ref = run(llama_dir / "model.onnx", feed)
    base = tmp_path / "base.onnx"
    convert(
        llama_dir / "model.onnx", base, Recipe(scheme="w8a8", smooth=False, samples=6), calibration=calib_ids
    )
    out = tmp_path / "layer.onnx"
    recipe = Recipe(scheme="w8a8", alpha_search="layer", samples=6, search_rows=128)
    result = convert(llama_dir / "model.onnx", out, recipe, calibration=calib_ids)
    alphas = {g["name"]: g["alpha"] for g in result.smoothed_groups}
    assert alphas == {g["group"]: g["alpha"] for g in result.alpha_search["groups"]}
    assert rel_error(ref, run(out, feed)) < 0.75 * rel_error(ref, run(base, feed))
    assert np.isfinite(result.alpha)


@pytest.mark.parametrize("fmt", ["contrib", "qdq", "qoperator"])
def test_model_search_scores_static_activations_with_their_calibrated_ranges(
    llama_dir, calib_ids, tmp_path, fmt
):
    """Each candidate needs the per-tensor ranges after its own smoothing."""
    recipe = Recipe(scheme="w8a8", act="static", format=fmt, alpha_search="model", alpha_step=0.5, samples=4)
    result = convert(llama_dir / "model.onnx", tmp_path / "m.onnx", recipe, calibration=calib_ids)
    curve = result.alpha_search["curve"]
    assert [c["alpha"] for c in curve] == [0.0, 0.5, 1.0] and all(np.isfinite(c["loss"]) for c in curve)
    assert result.alpha == min(curve, key=lambda c: c["loss"])["alpha"]


def test_layer_search_scores_static_activations_at_their_calibrated_range():
    """With --act static the layer search rounds X/s with the one scale the quantizer will write
    (max over channels of absmax / s, over 127), not per token: checked against the ONNX spec's formulas."""
    model = ir_graphs.build_norm_graph("SimplifiedLayerNormalization")
    arrays = ir_graphs.sample_inputs(model, samples=4)
    feeds = [{k: v[i] for k, v in arrays.items()} for i in range(4)]
    group = analyze(model.graph).groups[0]
    cal = calibrate(
        model, {group.name: group.channels}, feeds, row_tensors=(group.name,), show_progress=False
    )
    x, absmax = cal.rows[group.name], cal.absmax[group.name]
    actions = {c.name: "w8a8" for c in group.consumers}
    recipe = Recipe(scheme="w8a8", act="static")
    s = smoothing_scales(absmax, weight_row_absmax(group), 0.8)
    scale = np.float64(np.max(absmax / s)) / 127.0
    xq = np.clip(np.round(x / s / scale), -128, 127) * scale  # QuantizeLinear then DequantizeLinear, zp 0
    num = den = 0.0
    for consumer in group.consumers:
        w = consumer.weight_kn().astype(np.float64)
        wq, ws = ref_per_channel(w * s[:, None])
        out, ref = xq @ (wq * ws), x @ w
        num, den = num + np.sum((ref - out) ** 2), den + np.sum(ref**2)
    got = group_error(group, x, absmax, 0.8, actions, recipe)
    assert got == pytest.approx(num / den, rel=1e-3)
    per_token = group_error(group, x, absmax, 0.8, actions, Recipe(scheme="w8a8"))
    assert abs(per_token - got) > 1e-3 * got  # a different rounding: the test can tell them apart
