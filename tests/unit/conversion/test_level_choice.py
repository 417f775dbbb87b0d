"""--accuracy-level auto's arithmetic: the losses against torch's, and the choice at its tolerance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sq_onnx.accuracy_level import LossSums, choose, increase_error, judge, mean_kl, mean_nll
from sq_onnx.lm.fast_losses import kl_rows, next_token_nll


def _logits(seed: int, shape=(2, 6, 11)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 3, shape).astype(np.float32)


def test_mean_nll_is_torchs_next_token_cross_entropy():
    logits, ids = _logits(0), np.random.default_rng(1).integers(0, 11, (2, 6))
    expected = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits[:, :-1]).reshape(-1, 11).double(), torch.from_numpy(ids[:, 1:]).reshape(-1)
    )
    # one float32 pass (sq_onnx.lm.fast_losses): 2e-9 relative measured here
    assert mean_nll([logits], [{"input_ids": ids}]) == pytest.approx(float(expected), rel=1e-7)
    assert mean_nll([logits], [{"x": ids}]) is None  # nothing to score


def test_mean_kl_is_torchs_kl_from_the_reference():
    ref, out = _logits(2), _logits(3)
    log_p = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    log_q = torch.log_softmax(torch.from_numpy(out).double(), -1)
    expected = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()
    assert mean_kl([ref], [out]) == pytest.approx(float(expected), rel=1e-7)  # float32: 3e-8 measured
    assert mean_kl([ref], [ref]) == pytest.approx(0.0, abs=1e-7)


def test_float32_losses_match_float64_at_a_128k_vocabulary():
    """Verification's one-pass float32 KL and NLL against torch's float64 log-softmax on LM-sized rows."""
    rng = np.random.default_rng(0)
    ref = (rng.normal(0, 2, (32, 128256)) + rng.gumbel(0, 2, (32, 128256))).astype(np.float32)
    out = ref + rng.normal(0, 0.2, ref.shape).astype(np.float32)
    ids = rng.integers(0, 128256, 32)
    log_p = torch.log_softmax(torch.from_numpy(ref).double(), -1)
    log_q = torch.log_softmax(torch.from_numpy(out).double(), -1)
    kl64 = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).numpy()
    kl, lse = kl_rows(ref, out)
    np.testing.assert_allclose(kl, kl64, rtol=0, atol=2e-6)  # each row's KL is about 0.01: 1e-4 of it
    assert abs(kl.mean() - kl64.mean()) < 1e-7
    nll64 = -log_q[np.arange(31), ids[1:]].numpy()
    np.testing.assert_allclose(next_token_nll(out, lse, ids), nll64, rtol=0, atol=2e-6)


def test_level_4_only_when_both_estimates_are_within_the_tolerance():
    just_in, just_out = math.log(1.0099), math.log(1.0101)  # +0.99% and +1.01% perplexity
    assert choose(0.1, 0.1 + just_in, 0.01, 2.0, 2.0 + just_in).level == 4
    assert choose(0.1, 0.1 + just_out, 0.01, 2.0, 2.0).level == 0  # the float model's estimate
    assert choose(0.1, 0.1, 0.01, 2.0, 2.0 + just_out).level == 0  # the samples' own tokens
    chosen = choose(0.1, 0.1 + just_in, 0.01)  # no token ids: the expected increase alone
    assert chosen.level == 4 and chosen.sample_increase is None
    assert chosen.expected_increase == pytest.approx(0.0099)
    assert "+0.99%" in chosen.reason and "within" in chosen.reason


def test_the_choice_reports_each_estimates_standard_error_over_the_samples():
    """Paired per-sample differences: a level 4 that costs the same on every sample has no spread, and the
    spread of unequal costs is their standard error (sd / sqrt(n)) carried through exp."""
    ref = [_logits(s, (1, 6, 11)) for s in range(4)]
    ids = [{"input_ids": np.random.default_rng(10 + s).integers(0, 11, (1, 6))} for s in range(4)]
    level0, level4 = LossSums(), LossSums()
    rng = np.random.default_rng(5)
    for r, feed in zip(ref, ids, strict=True):
        level0.add(r, r + rng.normal(0, 0.1, r.shape).astype(np.float32), feed)
        level4.add(r, r + rng.normal(0, 0.3, r.shape).astype(np.float32), feed)
    chosen = judge(level0, level4, 0.01)
    for per0, per4, increase, error in (
        (level0.sample_kl, level4.sample_kl, chosen.expected_increase, chosen.expected_error),
        (level0.sample_nll, level4.sample_nll, chosen.sample_increase, chosen.sample_error),
    ):
        diff = np.subtract(per4, per0)
        assert len(diff) == 4
        assert error == pytest.approx(math.exp(diff.mean()) * diff.std(ddof=1) / 2.0, rel=1e-9)
        assert f"(± {error:.2%})" in chosen.reason and error > 0
        assert increase == pytest.approx(math.expm1(diff.mean()), rel=1e-6)  # equal-length samples
    assert increase_error([0.1, 0.2], [0.3, 0.4]) == pytest.approx(0.0, abs=1e-15)  # the same cost everywhere
    assert increase_error([0.1], [0.3]) is None
