"""Verification's statistics, summed one sample at a time, are those of all samples taken together."""

from __future__ import annotations

import numpy as np
import pytest

from sq_onnx.accuracy_level import LossSums, mean_kl, mean_nll
from sq_onnx.verify import compare


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
    for key, value in _together(refs, outs).items():
        assert getattr(got, key) == pytest.approx(value, rel=1e-12), key


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
