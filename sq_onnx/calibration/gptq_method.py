"""GPTQ's statistics per batch of linears: XᵀX of the batch's input (the Hessian of ||XW − XŴ||²), and,
for the asymmetric target, X_qᵀX_f between the input the quantized model gives and the float model's
(GPTAQ, Li et al., 2025), optionally with samples held out to check GPTQ against round-to-nearest. The
inputs come from ``SegmentRunner`` steps; the maths of quantizing is ``sq_onnx.quant.gptq``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sq_onnx.calibration.segment_runner import SegmentInputs
from sq_onnx.quant.gptq import dampened_hessian
from sq_onnx.quant.int8 import fake_blockwise

# Ridge of the float target's correction, as a fraction of mean(diag H) (chosen when GPTQ's dampening was 0.01). The
# correction is fitted on the calibration rows, and less of it generalises better. On SmolLM2 (KL to fp32
# on the whole held-out text, default recipe) 0.01: 0.0591, 0.1: 0.0539, 0.3: 0.0553 (docs/EXPERIMENTS.md).
TARGET_DAMP = 0.1
# Rows of activations multiplied at once when summing XᵀX over the cached samples.
GRAM_ROWS = 1 << 14


def gram(
    arrays: list[np.ndarray], channels: int, others: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Σ XᵀX over ``arrays`` (each flattened to [rows, channels]) and, with ``others`` (same shapes, row for
    row), Σ XᵀY, in one pass over float32 blocks of GRAM_ROWS rows (each X block joined once)."""
    total = np.zeros((channels, channels), np.float64)
    cross = None if others is None else np.zeros((channels, channels), np.float64)
    per_block = max(1, GRAM_ROWS * channels // max(1, arrays[0].size)) if arrays else 1

    def rows(source: list[np.ndarray], start: int) -> np.ndarray:
        part = source[start : start + per_block]
        return np.concatenate([np.asarray(a, np.float32).reshape(-1, channels) for a in part])

    for start in range(0, len(arrays), per_block):
        x = rows(arrays, start)
        total += x.T @ x  # numpy runs syrk for x.T @ x
        if cross is not None and others is not None:
            cross += x.T @ rows(others, start)
    return total.astype(np.float32), (None if cross is None else cross.astype(np.float32))


@dataclass(frozen=True)
class BatchGrams:
    """One batch's Gram matrices: ``hessian`` = XᵀX and ``cross`` = X_qᵀX_f (None without a float copy) on
    the fitting samples, ``held`` the same pair on the held-out samples (None when none are held out)."""

    hessian: np.ndarray
    cross: np.ndarray | None
    held: tuple[np.ndarray, np.ndarray | None] | None = None

    def target(self, w: np.ndarray, ridge: float = TARGET_DAMP) -> np.ndarray:
        """``float_target_weight`` of the batch's joined [K, N] weight (``w`` itself without a float copy)."""
        if self.cross is None:
            return w
        return float_target_weight(w, self.hessian, self.cross, ridge)

    def held_out_loss(self, w: np.ndarray, w_hat: np.ndarray) -> float:
        """The batch's output error on the held-out samples, up to a constant: ‖X_q Ŵ − X_f W‖² with the
        float copy, ‖X Ŵ − X W‖² without (X_f = X). Compares candidate Ŵ for the same W."""
        if self.held is None:
            raise RuntimeError("no samples were held out")
        h, cross = self.held
        c = h if cross is None else cross
        d = w_hat.astype(np.float64)
        return float(np.sum(d * (h.astype(np.float64) @ d)) - 2.0 * np.sum(d * (c.astype(np.float64) @ w)))


def batch_grams(inputs: SegmentInputs, holdout: int = 0, int8_block: int | None = None) -> BatchGrams:
    """The Gram matrices of one runner step; the last ``holdout`` samples (when fewer than all) are kept
    apart for ``held_out_loss``. With ``int8_block`` the quantized model's input is first rounded as
    MatMulNBits at accuracy_level 4 rounds it (int8 per block of K), so GPTQ fits the weights to what the
    kernel multiplies; the float side (the target) stays exact."""
    n = len(inputs.quantized)
    holdout = holdout if 0 < holdout < n else 0
    fit = n - holdout
    xs = inputs.quantized if int8_block is None else [fake_blockwise(x, int8_block) for x in inputs.quantized]
    others = [inputs.float] if inputs.float is not None else []
    hessian, cross = gram(xs[:fit], inputs.channels, *(o[:fit] for o in others))
    held = gram(xs[fit:], inputs.channels, *(o[fit:] for o in others)) if holdout else None
    return BatchGrams(hessian, cross, held)


def float_target_weight(
    w: np.ndarray, hessian: np.ndarray, cross: np.ndarray, damp: float = TARGET_DAMP
) -> np.ndarray:
    """argmin_Ŵ ‖X_q Ŵ − X_f W‖² = W + H⁻¹X_qᵀ(X_f − X_q)W (H = X_qᵀX_q): quantizing this target with
    GPTQ on H minimises the distance to the float model's output, not to this layer's own output on the
    already degraded input. The correction is a ridge regression of the upstream error on the layer's input,
    with ``damp`` x mean(diag H) on the diagonal; W itself is never shrunk, so a layer whose input is still
    exact keeps W. ``w`` [K, N]."""
    h, _ = dampened_hessian(hessian, damp)
    delta = cross.astype(np.float64) - hessian.astype(np.float64)  # X_qᵀ(X_f − X_q)
    w64 = w.astype(np.float64)
    return (w64 + np.linalg.solve(h, delta @ w64)).astype(np.float32)
