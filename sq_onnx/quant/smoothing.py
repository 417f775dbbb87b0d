"""SmoothQuant's per-channel scales: how much of each input channel's range moves into the weights."""

from __future__ import annotations

import numpy as np

# Floor of a scale: a channel that is almost dead must not blow its weights' rows up.
MIN_SCALE = 1e-5


def smoothing_scales(act_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_j = max|X_j|^α / max|W_j|^(1−α); 1 for dead or non-finite channels, clamped away from 0."""
    act = np.asarray(act_absmax, dtype=np.float64)
    w = np.asarray(w_absmax, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        s = np.power(act, alpha) / np.power(w, 1.0 - alpha)
    bad = ~np.isfinite(s) | (act <= 0) | (w <= 0)
    s = np.where(bad, 1.0, s)
    return np.maximum(s, MIN_SCALE).astype(np.float32)
