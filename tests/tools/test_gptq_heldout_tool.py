"""tools/gptq_heldout_loss.py's score: 0 for an exact weight, 1 for an all-zero one, scale-free in H."""

from __future__ import annotations

import numpy as np
from gptq_heldout_loss import relative_loss


def test_relative_loss_is_the_share_of_output_energy_lost() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16))
    w = rng.normal(size=(16, 5)).astype(np.float32)
    h = x.T @ x
    assert relative_loss(w, w, h) == 0.0
    assert np.isclose(relative_loss(w, np.zeros_like(w), h), 1.0)
    noisy = w + rng.normal(0, 0.1, w.shape).astype(np.float32)
    expected = np.sum((x @ w - x @ noisy) ** 2) / np.sum((x @ w) ** 2)
    assert np.isclose(relative_loss(w, noisy, h), expected)
    assert np.isclose(relative_loss(w, noisy, 7.0 * h), expected)
