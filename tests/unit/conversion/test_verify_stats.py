"""Verification's statistics, summed one sample at a time, are those of all samples taken together."""

from __future__ import annotations

import numpy as np
import pytest

from sq_onnx.accuracy_level import LossSums, mean_kl, mean_nll
from sq_onnx.verify import HeldOutput, compare


def _pairs(shapes, seed=0):
    rng = np.random.default_rng(seed)
    refs = [rng.normal(0, 3, s).astype(np.float32) for s in shapes]
    outs = [(r + rng.normal(0, 0.5 * (i + 1), r.shape)).astype(np.float32) for i, r in enumerate(refs)]
    return refs, outs


def _together(refs, outs):
    ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in refs]).astype(np.float64)
    out = np.concatenate([o.reshape(-1, o.shape[-1]) for o in outs]).astype(np.float64)
    cos = (ref * out).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1))
    return {
        "relative_error": np.linalg.norm(ref - out) / np.linalg.norm(ref),
        "cosine": cos.mean(),
        "top1_agreement": np.mean(ref.argmax(1) == out.argmax(1)),
        "max_abs_error": np.abs(ref - out).max(),
    }


def test_compare_over_samples_of_different_lengths_is_compare_over_their_rows():
    refs, outs = _pairs([(1, 3, 7), (2, 9, 7), (1, 1, 7)])
    got = compare(refs, outs)
    assert got.samples == 3
    for key, value in _together(refs, outs).items():  # float32 row sums, float64 totals
        assert getattr(got, key) == pytest.approx(value, rel=1e-6), key


def test_compare_has_no_top1_for_one_wide_outputs_and_zero_error_for_equal_ones():
    refs, outs = _pairs([(4, 1), (2, 1)])
    assert compare(refs, outs).top1_agreement is None
    same = compare(refs, refs)
    assert same.relative_error == 0 and same.max_abs_error == 0 and same.cosine == pytest.approx(1.0)


def test_losses_weight_every_token_alike_across_samples():
    refs, outs = _pairs([(1, 3, 11), (1, 12, 11)], seed=1)
    ids = [np.random.default_rng(i).integers(0, 11, r.shape[:2]) for i, r in enumerate(refs)]
    feeds = [{"input_ids": i} for i in ids]
    sums = LossSums()
    for r, o, f in zip(refs, outs, feeds, strict=True):
        sums.add(r, o, f)
    flat_ref = np.concatenate([r.reshape(-1, 11) for r in refs])
    flat_out = np.concatenate([o.reshape(-1, 11) for o in outs])
    assert sums.kl == pytest.approx(mean_kl([flat_ref], [flat_out]), rel=1e-12)
    nll_rows = [mean_nll([o], [f]) * (o.shape[1] - 1) for o, f in zip(outs, feeds, strict=True)]
    assert sums.nll == pytest.approx(sum(nll_rows) / (3 - 1 + 12 - 1), rel=1e-12)
    sums.add(refs[0], outs[0], {"x": ids[0]})  # a sample with nothing to score: no NLL at all
    assert sums.nll is None


def test_the_held_reference_takes_half_the_memory_and_keeps_what_the_statistics_read():
    """Logits of an LLM's size (a peaked row, values to about 35): the likeliest token's logit exactly, every
    logit within float16's rounding of its offset below the row's maximum, and KL, top-1 and the error of
    a W4-like output as with the float32 reference."""
    rng = np.random.default_rng(3)
    ref = rng.normal(0, 3, (1, 64, 4096)).astype(np.float32)
    ref[..., 7] += 20.0  # a confident top token
    out = (ref + rng.normal(0, 0.4, ref.shape)).astype(np.float32)
    held = HeldOutput.of(ref)
    assert held.offsets.nbytes + held.row_max.nbytes < 0.51 * ref.nbytes
    back = held.restore()
    assert back.dtype == np.float32 and back.shape == ref.shape
    assert np.array_equal(back.max(axis=-1), ref.max(axis=-1))
    assert np.abs(back - ref).max() <= 2.0**-11 * np.abs(ref - ref.max(-1, keepdims=True)).max() + 1e-6
    assert mean_kl([back], [out]) == pytest.approx(mean_kl([ref], [out]), rel=1e-4)
    exact, kept = compare([ref], [out]), compare([back], [out])
    assert kept.top1_agreement == exact.top1_agreement
    assert kept.relative_error == pytest.approx(exact.relative_error, rel=1e-3)


@pytest.mark.parametrize("value", [np.inf, np.nan, -1e9])
def test_outputs_float16_cannot_hold_are_kept_as_they_are(value):
    ref = np.random.default_rng(4).normal(0, 3, (2, 5)).astype(np.float32)
    ref[1, 2] = value
    assert HeldOutput.of(ref).restore() is not None
    np.testing.assert_array_equal(HeldOutput.of(ref).restore(), ref)
    scalar = np.float32(2.5)
    assert HeldOutput.of(scalar).restore() == scalar


def test_the_reference_is_halved_a_slice_at_a_time(monkeypatch):
    """Halving makes no float32 copy of the whole output (131 MB a sample at a 128K vocabulary), and gives the
    offsets one subtraction of the whole would; a value beyond float16 in a later slice still keeps it whole."""
    import tracemalloc

    from sq_onnx import verify

    monkeypatch.setattr(verify, "HALVING_BYTES", 3 * 4096 * 4)  # three rows at a time
    ref = np.random.default_rng(5).normal(0, 3, (2, 32, 4096)).astype(np.float32)
    tracemalloc.start()
    try:
        held = HeldOutput.of(ref)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 0.75 * ref.nbytes, f"{peak / ref.nbytes:.2f} of the output's size held while halving it"
    np.testing.assert_array_equal(held.offsets, (ref - ref.max(axis=-1, keepdims=True)).astype(np.float16))
    ref[1, 30, 9] = -1e9
    np.testing.assert_array_equal(HeldOutput.of(ref).restore(), ref)
