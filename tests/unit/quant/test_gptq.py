"""GPTQ: error feedback lowers the layer's output error, reduces to RTN when inputs are uncorrelated, and
the Hessians computed inside ORT are XᵀX of the right tensors, chunked or not."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from test_blockwise import _matmulnbits_model

from sq_onnx import Recipe, convert, quantize_model
from sq_onnx.calibration.hessian import (
    ChunkedHessians,
    chunks_within_budget,
    collect_hessians,
    smoothed_hessian,
)
from sq_onnx.errors import RecipeError
from sq_onnx.passes.analyze import analyze
from sq_onnx.passes.linears import find_linears
from sq_onnx.plan import plan_linears
from sq_onnx.quant.blockwise import quantize_blockwise
from sq_onnx.quant.gptq import dampened_hessian, gptq_quantize, refine_codes, refit_scales
from sq_onnx.quantize_model import weight_batches
from sq_onnx.runtime.model_io import copy_model

from conftest import ids_feed, rel_error, run
from ir_graphs import build_norm_graph, sample_inputs


def _correlated_inputs(rows: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.normal(0, 0.3, (k, k)) + np.eye(k)
    return (rng.normal(0, 1, (rows, k)) @ mix * rng.uniform(0.2, 3.0, k)).astype(np.float32)


def _output_error(x: np.ndarray, w: np.ndarray, deq: np.ndarray) -> float:
    ref = x @ w
    return float(np.sum((ref - x @ deq) ** 2) / np.sum(ref**2))


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("clip", [False, True])
@pytest.mark.parametrize(("k", "n", "block"), [(256, 48, 64), (300, 17, 128), (96, 8, 32)])
def test_gptq_beats_round_to_nearest_on_output_error(act_order, symmetric, clip, k, n, block):
    x = _correlated_inputs(2048, k, seed=k)
    w = np.random.default_rng(n).normal(0, 0.1, (k, n)).astype(np.float32)
    rtn = quantize_blockwise(w, 4, block, symmetric, clip_search=clip, importance=(x**2).mean(0))
    gptq = gptq_quantize(w, x.T.astype(np.float64) @ x, 4, block, symmetric, clip, act_order=act_order)
    assert gptq.q.shape == rtn.q.shape and gptq.scales.shape == rtn.scales.shape
    assert _output_error(x, w, gptq.dequantize()) < 0.8 * _output_error(x, w, rtn.dequantize())


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_with_identity_hessian_is_round_to_nearest(symmetric, act_order):
    w = np.random.default_rng(1).normal(0, 0.1, (200, 12)).astype(np.float32)
    rtn = quantize_blockwise(w, 4, 64, symmetric)
    gptq = gptq_quantize(w, np.eye(200), 4, 64, symmetric, act_order=act_order)
    np.testing.assert_array_equal(gptq.q, rtn.q)
    np.testing.assert_array_equal(gptq.scales, rtn.scales)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_layout_runs_in_matmulnbits_and_survives_dead_channels(act_order):
    k, n = 160, 24
    x = _correlated_inputs(512, k, seed=3)
    x[:, [5, 77]] = 0.0  # channels calibration never saw active
    w = np.random.default_rng(2).normal(0, 0.1, (k, n)).astype(np.float32)
    bq = gptq_quantize(w, x.T @ x, 4, 32, symmetric=False, clip_search=True, act_order=act_order)
    assert np.isfinite(bq.dequantize()).all()
    model, _ = _matmulnbits_model(k, n, 4, 32, False, w, bq=bq)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"X": x[:7]})[0], x[:7] @ bq.dequantize(), rtol=1e-4, atol=1e-3)


def _layer_loss(w: np.ndarray, h: np.ndarray, deq: np.ndarray) -> float:
    r = (w - deq).astype(np.float64)
    return float(np.einsum("kn,kj,jn->", r, h, r))


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("k", "n", "block"), [(256, 40, 64), (96, 9, 32)])
def test_each_refinement_step_never_raises_the_layer_loss(symmetric, k, n, block):
    x = _correlated_inputs(1024, k, seed=k + n)
    w = np.random.default_rng(n).normal(0, 0.1, (k, n)).astype(np.float32)
    h, _ = dampened_hessian(x.T @ x)
    start = gptq_quantize(w, x.T @ x, 4, block, symmetric, clip_search=True, act_order=True)
    codes = start.q.reshape(n, -1).T.copy()  # [K, N] by channel
    steps = start.scales.copy()
    zeros = (start.zero_points if start.zero_points is not None else np.full_like(steps, 8)).astype(
        np.float32
    )

    def loss() -> float:
        deq = (codes - np.repeat(zeros.T, block, 0)) * np.repeat(steps.T, block, 0)
        return _layer_loss(w, h, deq)

    losses = [loss()]
    moved = 0
    for _ in range(3):
        moved += refine_codes(w, h, codes, steps, zeros, block, 15)
        losses.append(loss())
        refit_scales(w, h, codes, steps, zeros, block)
        losses.append(loss())
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:], strict=False)), losses
    assert moved > 0 and losses[-1] < 0.97 * losses[0], losses
    assert codes.min() >= 0 and codes.max() <= 15 and np.all(steps * start.scales > 0)


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("symmetric", [False, True])
def test_refined_gptq_beats_plain_gptq_and_keeps_the_layout(act_order, symmetric):
    k, n = 192, 33
    x = _correlated_inputs(1024, k, seed=7)
    x[:, 9] = 0.0  # a dead channel
    w = np.random.default_rng(4).normal(0, 0.1, (k, n)).astype(np.float32)
    args = (w, x.T @ x, 4, 64, symmetric, True, act_order)
    plain, refined = gptq_quantize(*args), gptq_quantize(*args, refine_rounds=2)
    assert refined.packed.shape == plain.packed.shape and refined.scales.shape == plain.scales.shape
    assert _output_error(x, w, refined.dequantize()) < 0.98 * _output_error(x, w, plain.dequantize())
    model, _ = _matmulnbits_model(k, n, 4, 64, symmetric, w, bq=refined)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(
        sess.run(None, {"X": x[:5]})[0], x[:5] @ refined.dequantize(), rtol=1e-4, atol=1e-3
    )


def test_gptq_rejects_a_hessian_of_the_wrong_size():
    with pytest.raises(ValueError, match="hessian"):
        gptq_quantize(np.zeros((64, 4), np.float32), np.eye(32), 4, 32, False)


def test_hessians_from_ort_equal_numpy_and_chunking_changes_nothing():
    model = build_norm_graph("SimplifiedLayerNormalization")
    group = analyze(model.graph).groups[0]
    feeds = [{k: v[i] for k, v in sample_inputs(model, samples=3).items()} for i in range(3)]
    probe = copy_model(model)
    norm_out = next(v for node in probe.graph for v in node.outputs if v.name == group.name)
    probe.graph.outputs.append(norm_out)
    sess = ort.InferenceSession(ir.to_proto(probe).SerializeToString(), providers=["CPUExecutionProvider"])
    rows = np.concatenate([sess.run([group.name], f)[0].reshape(-1, group.channels) for f in feeds])
    hessians = collect_hessians(model, {group.name: group.channels, "X": group.channels}, feeds)
    np.testing.assert_allclose(hessians[group.name], rows.T @ rows, rtol=1e-4, atol=1e-3)
    x = np.concatenate([f["X"].reshape(-1, group.channels) for f in feeds])
    np.testing.assert_allclose(hessians["X"], x.T @ x, rtol=1e-4, atol=1e-3)

    tiny_budget = 4 * group.channels**2  # one Hessian per chunk: two passes
    lazy = ChunkedHessians(
        model, {group.name: group.channels, "X": group.channels}, feeds, budget=tiny_budget
    )
    np.testing.assert_allclose(lazy(group.name), hessians[group.name], rtol=1e-6)
    np.testing.assert_allclose(lazy("X"), hessians["X"], rtol=1e-6)
    assert lazy.passes == 2 and "X" in lazy and "nope" not in lazy


def test_chunks_respect_the_budget_and_keep_order():
    chunks = chunks_within_budget({"a": 10, "b": 10, "c": 20, "d": 5}, budget=4 * 200)
    assert chunks == [{"a": 10, "b": 10}, {"c": 20}, {"d": 5}]


def test_smoothed_hessian_is_the_hessian_of_x_over_s():
    x = _correlated_inputs(64, 16)
    s = np.random.default_rng(0).uniform(0.5, 4.0, 16).astype(np.float32)
    xs = x / s
    np.testing.assert_allclose(smoothed_hessian(x.T @ x, s), xs.T @ xs, rtol=1e-4, atol=1e-4)


def test_convert_with_gptq_lowers_the_error_of_a_tiny_llama(llama_dir, tmp_path, calib_ids):
    feed = ids_feed(seq=48)
    ref = run(llama_dir / "model.onnx", feed)
    errors = {}
    for gptq in (False, True):
        out = tmp_path / f"w4_{gptq}.onnx"
        recipe = Recipe(samples=8, block_size=32, gptq=gptq, lm_head="fp")
        result = convert(llama_dir / "model.onnx", out, recipe, calibration=calib_ids)
        assert result.recipe["gptq"] is gptq
        errors[gptq] = rel_error(ref, run(out, feed))
    assert errors[True] < errors[False], errors


def test_gptq_is_for_w4_only_and_needs_samples():
    assert Recipe().uses_gptq and not Recipe(scheme="w8a8").uses_gptq and not Recipe(gptq=False).uses_gptq
    with pytest.raises(RecipeError, match="gptq-samples"):
        Recipe(gptq_samples=0)
    with pytest.raises(RecipeError, match="gptq-refine"):
        Recipe(gptq_refine=-1)


@pytest.mark.parametrize(("act_order", "refine"), [(False, 0), (True, 0), (True, 2)])
def test_gptq_on_concatenated_weights_splits_back_to_each_alone(act_order, refine):
    x = _correlated_inputs(1024, 200, seed=5)
    rng = np.random.default_rng(6)
    parts = [rng.normal(0, 0.1, (200, n)).astype(np.float32) for n in (48, 17, 5)]
    args = (x.T.astype(np.float64) @ x, 4, 64, False, True)
    together = gptq_quantize(np.concatenate(parts, axis=1), *args, act_order=act_order, refine_rounds=refine)
    lo = 0
    for w in parts:
        alone = gptq_quantize(w, *args, act_order=act_order, refine_rounds=refine)
        piece = together.columns(lo, lo + w.shape[1])
        assert np.mean(piece.q == alone.q) > 0.999  # identical up to BLAS rounding in rare ties
        np.testing.assert_allclose(piece.dequantize(), alone.dequantize(), atol=1e-3)
        assert piece.packed_zero_points() is not None
        lo += w.shape[1]


def test_weight_batches_group_linears_that_share_an_input(llama_dir, monkeypatch):
    graph = ir.load(llama_dir / "model.onnx").graph
    plans = [p for p in plan_linears(graph, find_linears(graph), Recipe()) if p.action in ("w4", "w8")]
    alone = weight_batches(plans, together=False)
    assert [len(b) for b in alone] == [1] * len(plans)
    batches = weight_batches(plans, together=True)
    firsts = [b[0] for b in batches]
    assert firsts == sorted(firsts, key=plans.index)  # batches come in the plans' order
    assert sorted(p.name for b in batches for p in b) == sorted(p.name for p in plans)
    assert max(len(b) for b in batches) == 3  # q/k/v; gate/up make pairs
    for batch in batches:
        assert len({(p.linear.input.name, p.action, p.lm_head) for p in batch}) == 1
    monkeypatch.setattr(quantize_model, "SHARED_WEIGHT_BYTES", 0)
    assert len(weight_batches(plans, together=True)) == len(plans)


def test_convert_gives_the_same_model_with_or_without_shared_gptq_passes(
    llama_dir, tmp_path, calib_ids, monkeypatch
):
    recipe = Recipe(samples=4, gptq_samples=8, block_size=32, lm_head="fp")
    shared = tmp_path / "shared.onnx"
    convert(llama_dir / "model.onnx", shared, recipe, calibration=calib_ids)
    monkeypatch.setattr(quantize_model, "SHARED_WEIGHT_BYTES", 0)
    alone = tmp_path / "alone.onnx"
    convert(llama_dir / "model.onnx", alone, recipe, calibration=calib_ids)
    a, b = ir.load(shared).graph, ir.load(alone).graph
    codes = [n.inputs[1].name for n in a if n.op_type == "MatMulNBits"]
    assert codes == [n.inputs[1].name for n in b if n.op_type == "MatMulNBits"]
    # The first linears GPTQ fits (layer 0's q/k/v) see the same float inputs either way: the same codes.
    first = codes[0]
    assert (
        np.mean(a.initializers[first].const_value.numpy() == b.initializers[first].const_value.numpy())
        > 0.999
    )
    # After them, each layer's inputs come from the quantized layers before it, so a rounding tie decided the
    # other way early changes later codes (by 12-30% on an AVX2-only CPU's BLAS paths, none on AVX-512):
    # the two models must be equally close to the float one.
    feed = ids_feed()
    ref = run(llama_dir / "model.onnx", feed)
    err_shared, err_alone = rel_error(ref, run(shared, feed)), rel_error(ref, run(alone, feed))
    assert abs(err_shared - err_alone) < 0.05 * err_alone


@pytest.mark.parametrize("symmetric", [False, True])
def test_gptq_by_column_slices_is_gptq_on_the_whole_weight(monkeypatch, symmetric):
    """A wide weight (a vocabulary projection) is fitted in column slices to bound memory: float target and
    GPTQ are per column, so the joined slices are the whole weight's result."""
    from sq_onnx.calibration.gptq_method import float_target_weight

    x_f = _correlated_inputs(1024, 64, seed=7)
    x_q = x_f + np.random.default_rng(8).normal(0, 0.05, x_f.shape).astype(np.float32)
    h, cross = x_q.T @ x_q, x_q.T @ x_f
    w = np.random.default_rng(9).normal(0, 0.1, (64, 600)).astype(np.float32)
    calls: list[int] = []

    def fit(part: np.ndarray, columns: slice):
        calls.append(part.shape[1])
        target = float_target_weight(part, h, cross)
        np.testing.assert_array_equal(part, w[:, columns])
        return gptq_quantize(target, h, 4, 32, symmetric, clip_search=True, act_order=True, refine_rounds=2)

    whole = fit(w, slice(None))
    monkeypatch.setattr(quantize_model, "COLUMN_BYTES", 8 * 64 * 100)  # slices of max(100, 4 K) = 256 columns
    calls.clear()
    sliced = quantize_model.by_columns(w, fit)
    assert calls == [256, 256, 88]
    assert np.mean(sliced.q == whole.q) > 0.999  # identical up to BLAS rounding in rare ties
    np.testing.assert_allclose(sliced.dequantize(), whole.dequantize(), atol=1e-3)
    assert (sliced.zero_points is None) == symmetric and sliced.scales.shape == whole.scales.shape


def test_inverse_hessian_factor_is_the_upper_cholesky_factor_of_the_inverse():
    """U upper triangular with a positive diagonal and UᵀU = H⁻¹ (H dampened, a dead channel set to 1),
    which is what GPTQ's error feedback reads row by row."""
    from sq_onnx.quant.gptq import dampened_hessian, inverse_hessian_factor

    x = _correlated_inputs(400, 96, seed=3)
    x[:, 7] = 0.0  # a channel calibration never activated
    h = x.T @ x
    u, dead = inverse_hessian_factor(h, 0.3)
    hd, _ = dampened_hessian(h, 0.3)
    assert dead[7] and dead.sum() == 1
    np.testing.assert_array_equal(u, np.triu(u))
    assert (np.diag(u) > 0).all()
    np.testing.assert_allclose(u.T @ u @ hd, np.eye(96), atol=1e-8)


def test_the_factor_holds_at_most_two_hessians_at_once():
    """At K = 8192 (Llama-3.2-1B's down_proj) each float64 K x K buffer is 512 MB: the factorisation works in
    place, one dampened copy and one reversed copy at a time (four were alive before, 2 GB)."""
    import tracemalloc

    from sq_onnx.quant.gptq import inverse_hessian_factor

    k = 1024
    x = _correlated_inputs(2 * k, k, seed=4)
    h = x.T @ x
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        u, _ = inverse_hessian_factor(h)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak <= 2.1 * k * k * 8, f"{peak / (k * k * 8):.2f} Hessians"
    assert u.shape == (k, k)
