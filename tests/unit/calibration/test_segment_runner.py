"""Sequential Hessians: a SegmentRunner's steps, run segment by segment from a cache, give XᵀX equal to the
whole (partly quantized) model's tensors, and a convert with them gives a working model."""

from __future__ import annotations

import tempfile

import numpy as np
import onnx_ir as ir
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.calibration import segment_runner
from sq_onnx.calibration.calibration_data import load_calibration
from sq_onnx.calibration.gptq_method import BatchGrams, batch_grams, float_target_weight, gram
from sq_onnx.calibration.hessian import collect_hessians
from sq_onnx.calibration.segment_runner import SegmentInputs, SegmentRunner, plan_runs, segment_model
from sq_onnx.errors import CalibrationError, RecipeError
from sq_onnx.quantize_model import gptq_batches, quantize_graph
from sq_onnx.runtime.model_inputs import input_specs
from sq_onnx.runtime.ort_session import in_memory_session

from conftest import ids_feed, rel_error, run
from tiny_models import random_ids


def _setup(llama_dir, samples: int = 3):
    model = ir.load(llama_dir / "model.onnx")
    feeds, _ = load_calibration(
        {"input_ids": random_ids(samples, 16, seed=3)},
        input_specs(model),
        model_path=None,
        tokenizer_dir=None,
        count=samples,
        seq_len=16,
    )
    return model, feeds


def _twice(inputs: SegmentInputs) -> tuple[SegmentInputs, SegmentInputs]:
    """Two readable copies of a runner step (its samples can be read once)."""
    pairs = list(inputs.pairs)
    xq, xf = [p[0] for p in pairs], [p[1] for p in pairs]
    floats = xf if inputs.with_float else None
    return tuple(SegmentInputs.of(inputs.index, inputs.target, inputs.channels, xq, floats) for _ in range(2))


def _full_model_hessian(model: ir.Model, name: str, channels: int, feeds) -> np.ndarray:
    return collect_hessians(model, {name: channels}, feeds)[name]


_PUT = segment_runner.SpillFolder.put


def _spilled_shapes(model, batches, feeds, monkeypatch, budget: int) -> list[tuple[int, ...]]:
    """Run every step with a cache budget of ``budget`` bytes, checking each Hessian against the whole model;
    the shapes of the arrays that went to files."""
    monkeypatch.setattr(segment_runner, "CACHE_BYTES", budget)
    written: list[tuple[int, ...]] = []
    monkeypatch.setattr(
        segment_runner.SpillFolder, "put", lambda self, a: written.append(a.shape) or _PUT(self, a)
    )
    runner = SegmentRunner(model, batches, feeds)
    for batch, inputs in zip(batches, runner, strict=True):
        name, channels = batch[0].input.name, batch[0].shape[0]
        assert (inputs.target, inputs.channels) == (name, channels)
        got = batch_grams(inputs).hessian
        want = _full_model_hessian(model, name, channels, feeds)
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert runner.spill._dir is None  # the folder is gone once the last step is read
    return written


@pytest.mark.parametrize("budget", [1 << 30, 0, 20_000], ids=["in-memory", "spilled", "widest-spilled"])
def test_segments_reproduce_the_one_pass_hessians(llama_dir, monkeypatch, budget):
    """Past the memory budget the cache's values go to files and come back unchanged."""
    model, feeds = _setup(llama_dir)
    batches = gptq_batches(model, Recipe())
    assert len(batches) > 4
    written = _spilled_shapes(model, batches, feeds, monkeypatch, budget)
    widest = max(b[0].shape[0] for b in batches)
    if budget == 0:  # every value a run adds, of every width
        assert len({s[-1] for s in written}) > 2
    elif budget < 1 << 30:  # the widest first (the MLP's intermediate), not everything
        everything = _spilled_shapes(model, batches, feeds, monkeypatch, 0)
        assert widest in {s[-1] for s in written} and len(written) < len(everything)
    else:
        assert not written


def test_an_unwritable_cache_folder_gets_one_sentence(llama_dir, monkeypatch, tmp_path):
    model, feeds = _setup(llama_dir)
    monkeypatch.setattr(segment_runner, "CACHE_BYTES", 0)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "gone"))  # as TMPDIR naming a missing folder
    with pytest.raises(CalibrationError, match="gone .No such file or directory.*TMPDIR"):
        for step in SegmentRunner(model, gptq_batches(model, Recipe()), feeds):
            batch_grams(step)


def test_the_cache_holds_only_values_that_cross_a_cut(llama_dir):
    model, _ = _setup(llama_dir)
    batches = gptq_batches(model, Recipe())
    runs = plan_runs(model.graph, batches)
    assert [r.target for r in runs] == [b[0].input.name for b in batches]
    assert all(r.target in r.keep for r in runs)  # kept for the next run's linears
    produced = {v.name for node in model.graph for v in node.outputs}
    for run_ in runs[1:]:
        assert set(run_.outputs) <= set(run_.keep) <= produced
        # the residual stream, rotary tables and masks: a handful, not every tensor of the layer
        assert len(run_.keep) <= 12


def test_a_step_read_after_the_next_is_refused(llama_dir):
    model, feeds = _setup(llama_dir)
    batches = gptq_batches(model, Recipe())
    steps = list(
        SegmentRunner(model, batches, feeds)
    )  # each step's samples are gone once the next is asked for
    with pytest.raises(RuntimeError, match="read each step before the next"):
        batch_grams(steps[0])


def test_each_hessian_sees_the_earlier_batches_quantized(llama_dir, monkeypatch):
    monkeypatch.setattr(segment_runner, "CACHE_BYTES", 0)  # every cached value read back from files
    model, feeds = _setup(llama_dir)
    recipe = Recipe(block_size=32, gptq_samples=3, gptq_sequential=True)
    batches = gptq_batches(model, recipe)
    last, channels = batches[-1][0].input.name, batches[-1][0].shape[0]
    names = [b[0].input.name for b in batches]
    seen: list[str] = []

    def checked():
        """Compare each step's Hessian with the whole model as it stands at that moment."""
        for step in SegmentRunner(model, batches, feeds):
            inputs, passed_on = _twice(step)
            got = batch_grams(inputs).hessian
            want = _full_model_hessian(model, inputs.target, got.shape[0], feeds)
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            seen.append(inputs.target)
            yield passed_on

    quantize_graph(model, recipe, segments=checked())
    assert seen == names
    assert sum(n.op_type == "MatMulNBits" for n in model.graph) >= len(batches)
    # the last input is not the float model's any more: the quantized layers upstream changed it
    float_model, _ = _setup(llama_dir)
    h_float = _full_model_hessian(float_model, last, channels, feeds)
    h_quantized = _full_model_hessian(model, last, channels, feeds)
    assert rel_error(h_float, h_quantized) > 1e-4


def test_a_runner_for_other_batches_is_a_programming_error(llama_dir):
    model, feeds = _setup(llama_dir)
    recipe = Recipe(block_size=32, gptq_samples=3, gptq_sequential=True)
    batches = gptq_batches(model, recipe)
    with pytest.raises(ir.passes.PassError) as info:
        quantize_graph(model, recipe, segments=SegmentRunner(model, batches[1:], feeds))
    assert isinstance(info.value.__cause__, RuntimeError) and "expected" in str(info.value.__cause__)


def test_gram_sums_blocks_like_one_product(monkeypatch):
    from sq_onnx.calibration import gptq_method

    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(1, 7, 5)).astype(np.float32) for _ in range(6)]
    x = np.concatenate([a.reshape(-1, 5) for a in arrays])
    monkeypatch.setattr(gptq_method, "GRAM_ROWS", 10)
    np.testing.assert_allclose(gram(arrays, 5)[0], x.T @ x, rtol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        {"gptq_asymmetric": False},  # one-pass Hessians
        {"gptq_asymmetric": False, "gptq_sequential": True},
        {},  # the default: asymmetric, on the sequential Hessians
    ],
    ids=["one-pass", "sequential", "asymmetric"],
)
def test_convert_with_each_hessian_mode(llama_dir, tmp_path, calib_ids, options):
    out = tmp_path / "seq.onnx"
    recipe = Recipe(samples=4, gptq_samples=8, block_size=32, lm_head="fp", **options)
    result = convert(llama_dir / "model.onnx", out, recipe, calibration=calib_ids)
    assert all(result.recipe[k] == v for k, v in options.items())
    feed = ids_feed(12, seed=9)
    ref = run(llama_dir / "model.onnx", feed)
    # measured 0.0557-0.0609 over the three modes (SQ_ONNX_PRINT_ERRORS=1 pytest -s
    # tests/unit/calibration/test_segment_runner.py -k each_hessian_mode)
    assert rel_error(ref, run(out, feed)) < 0.12


def test_sequential_hessians_on_a_bfloat16_model(llama_dir, tmp_path, calib_ids):
    """Segments of a bf16 model run as float32 twins; their cached outputs feed the next twin as they are."""
    from tiny_models import to_bfloat16

    src = to_bfloat16(llama_dir / "model.onnx", tmp_path / "bf16.onnx")
    recipe = Recipe(samples=4, gptq_samples=6, block_size=32, gptq_sequential=True)
    result = convert(src, tmp_path / "q.onnx", recipe, calibration=calib_ids)
    assert result.verify["relative_error"] < 0.16  # measured 0.0798 (2026-12-04)


def _tensor(model: ir.Model, name: str, feeds) -> list[np.ndarray]:
    """``name`` as the whole model computes it, per feed."""
    sub = segment_model(model, [], [name])
    inputs = [v.name for v in sub.graph.inputs]
    with in_memory_session(sub) as sess:
        return [sess.run([name], {n: f[n] for n in inputs})[0] for f in feeds]


def test_float_target_weight_is_the_least_squares_fit_to_the_float_output():
    rng = np.random.default_rng(1)
    x_f = rng.normal(size=(400, 12))
    x_q = x_f + 0.1 * rng.normal(size=x_f.shape)
    w = rng.normal(size=(12, 5)).astype(np.float32)
    h, cross = (x_q.T @ x_q).astype(np.float32), (x_q.T @ x_f).astype(np.float32)
    want, *_ = np.linalg.lstsq(x_q, x_f @ w, rcond=None)
    np.testing.assert_allclose(float_target_weight(w, h, cross, damp=0.0), want, rtol=1e-3, atol=1e-4)
    # an input that is still exact keeps its weights, whatever the dampening
    np.testing.assert_allclose(float_target_weight(w, h, h), w, rtol=1e-6)


def test_cross_is_the_quantized_input_against_the_float_input(llama_dir, monkeypatch):
    monkeypatch.setattr(segment_runner, "CACHE_BYTES", 0)
    model, feeds = _setup(llama_dir)
    float_model, _ = _setup(llama_dir)
    recipe = Recipe(block_size=32, gptq_samples=3, gptq_asymmetric=True)
    batches = gptq_batches(model, recipe)
    errors: list[float] = []

    def checked():
        for step in SegmentRunner(model, batches, feeds, float_copy=True):
            inputs, passed_on = _twice(step)
            name, channels = inputs.target, inputs.channels
            x_q = np.concatenate([a.reshape(-1, channels) for a in _tensor(model, name, feeds)])
            x_f = np.concatenate([a.reshape(-1, channels) for a in _tensor(float_model, name, feeds)])
            want = x_q.T @ x_f
            cross = batch_grams(inputs).cross
            np.testing.assert_allclose(cross, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
            errors.append(rel_error(x_f, x_q))
            yield passed_on

    quantize_graph(model, recipe, segments=checked())
    assert errors[0] == 0.0 and errors[-1] > 1e-3  # the float copy never sees the quantized layers


def test_held_out_loss_ranks_candidates_by_the_output_error():
    """Up to a constant, held_out_loss(W, Ŵ) is ‖X_q Ŵ − X_f W‖² on the held-out rows (X_f = X_q without
    a float copy): differences between candidates must be exactly the differences of that error."""
    rng = np.random.default_rng(0)
    xq = rng.normal(size=(200, 12)).astype(np.float32)
    xf = xq + 0.1 * rng.normal(size=xq.shape).astype(np.float32)
    w = rng.normal(size=(12, 5)).astype(np.float32)
    a, b = (w + 0.05 * rng.normal(size=w.shape)).astype(np.float32), np.round(w * 4) / 4
    for float_copy in (True, False):
        sh = BatchGrams(np.eye(12, dtype=np.float32), None, held=gram([xq], 12, [xf] if float_copy else None))
        ref = xf if float_copy else xq
        direct = [
            float(np.sum((xq.astype(np.float64) @ c - ref.astype(np.float64) @ w) ** 2)) for c in (a, b)
        ]
        got = [sh.held_out_loss(w, c) for c in (a, b)]
        assert got[0] - got[1] == pytest.approx(direct[0] - direct[1], rel=1e-4)


def test_holdout_falls_back_to_round_to_nearest_where_it_wins(llama_dir, tmp_path, calib_ids, monkeypatch):
    recipe = Recipe(samples=4, gptq_samples=8, gptq_holdout=2, gptq_refine=0)
    result = convert(llama_dir / "model.onnx", tmp_path / "a.onnx", recipe, calibration=calib_ids)
    assert isinstance(result.calibration["gptq_fell_back"], list)
    calls = iter(range(1000))  # RTN's loss is asked first: make it always win
    monkeypatch.setattr(BatchGrams, "held_out_loss", lambda self, w, w_hat: float(next(calls) % 2))
    result = convert(llama_dir / "model.onnx", tmp_path / "b.onnx", recipe, calibration=calib_ids)
    inputs = {p for p in result.calibration["gptq_fell_back"]}
    assert len(inputs) == len(result.calibration["gptq_fell_back"]) > 5  # every batch of linears fell back
    with pytest.raises(RecipeError, match="gptq-holdout"):
        Recipe(gptq_holdout=2, gptq_asymmetric=False)


def test_int8_inputs_round_the_quantized_side_only():
    """With int8_block, H and the cross term are those of the input as level 4 rounds it; the float side
    (GPTQ's target) stays exact."""
    from sq_onnx.quant.int8 import fake_blockwise

    rng = np.random.default_rng(0)
    k, block = 256, 64
    scale = np.where(np.arange(k) % 37 == 0, 30.0, 1.0).astype(np.float32)  # outlier channels
    xq = [(rng.normal(0, 1, (64, k)) * scale).astype(np.float32) for _ in range(4)]
    xf = [x + rng.normal(0, 0.1, x.shape).astype(np.float32) for x in xq]
    plain = batch_grams(SegmentInputs.of(0, "x", k, xq, xf))
    rounded = batch_grams(SegmentInputs.of(0, "x", k, xq, xf), int8_block=block)
    rounded_xq = [fake_blockwise(x, block) for x in xq]
    want_h, want_cross = gram(rounded_xq, k, xf)
    np.testing.assert_allclose(rounded.hessian, want_h, rtol=1e-5)
    np.testing.assert_allclose(rounded.cross, want_cross, rtol=1e-5)
    assert not np.allclose(plain.hessian, rounded.hessian, rtol=1e-4)


@pytest.mark.parametrize(("level", "w4_block"), [("auto", 32), ("4", 32), ("0", None)])
def test_int8_inputs_apply_where_a_linear_aims_at_level_4(
    llama_dir, tmp_path, calib_ids, monkeypatch, level, w4_block
):
    import sq_onnx.quantize_model as qm

    seen: list[tuple[str, int | None]] = []

    def record(inputs, holdout=0, int8_block=None, *rest):
        seen.append((inputs.target, int8_block))
        return batch_grams(inputs, holdout, int8_block, *rest)

    monkeypatch.setattr(qm, "batch_grams", record)
    recipe = Recipe(samples=4, gptq_samples=4, block_size=32, gptq_int8_inputs=True, accuracy_level=level)
    convert(llama_dir / "model.onnx", tmp_path / "a.onnx", recipe, calibration=calib_ids)
    blocks = dict(seen)
    assert len(blocks) > 3
    head = [t for t, b in seen][-1]  # the lm_head reads the last tensor, and its level is 4 in every case
    assert blocks.pop(head) == 32
    assert set(blocks.values()) == {w4_block}


@pytest.mark.parametrize("n", [8, 40], ids=["narrowing", "widening"])
def test_a_narrowing_layer_gets_the_same_target_from_the_shift(n):
    """down_proj (K = 4N) sums X_qᵀ(X_f − X_q)W instead of X_qᵀX_f: the float target must not change, for
    the whole weight or a slice of its columns; a layer not twice as wide in as out keeps the cross term."""
    rng = np.random.default_rng(4)
    k = 48
    xf = [rng.normal(size=(1, 30, k)).astype(np.float32) for _ in range(3)]
    xq = [x + 0.1 * rng.normal(size=x.shape).astype(np.float32) for x in xf]
    w = rng.normal(size=(k, n)).astype(np.float32)
    with_cross = batch_grams(SegmentInputs.of(0, "x", k, xq, xf))
    with_weight = batch_grams(SegmentInputs.of(0, "x", k, xq, xf), weight=w)
    assert (with_weight.shift is not None) == (2 * n < k) and (with_weight.cross is None) == (2 * n < k)
    want = with_cross.target(w)
    np.testing.assert_allclose(with_weight.target(w), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        with_weight.target(w[:, 2:5], columns=slice(2, 5)), want[:, 2:5], rtol=1e-4, atol=1e-5
    )
    assert np.abs(want - w).max() > 1e-2  # the correction is not negligible
