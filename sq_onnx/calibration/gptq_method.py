"""GPTQ's statistics per batch of linears: XᵀX of the batch's input (the Hessian of ||XW − XŴ||²), and,
for the asymmetric target, X_qᵀX_f between the input the quantized model gives and the float model's
(GPTAQ, Li et al., 2025), optionally with samples held out to check GPTQ against round-to-nearest. The
inputs come from ``SegmentRunner`` steps; the maths of quantizing is ``sq_onnx.quant.gptq``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from sq_onnx.calibration.segment_runner import SegmentInputs
from sq_onnx.quant.gptq import dampened_solve
from sq_onnx.quant.int8 import fake_blockwise

# Ridge of the float target's correction, as a fraction of mean(diag H) (chosen when GPTQ's dampening was 0.01). The
# correction is fitted on the calibration rows, and less of it generalises better. On SmolLM2 (KL to fp32
# on the whole held-out text, default recipe) 0.01: 0.0591, 0.1: 0.0539, 0.3: 0.0553 (docs/EXPERIMENTS.md).
# Rechecked at dampening 0.3 and 256 samples (yardstick validation, mean KL): 0.03: 0.142, 0.1: 0.133, 0.3: 0.133.
TARGET_DAMP = 0.1
# Rows of activations multiplied at once when summing XᵀX over the samples, and the most bytes of float32 rows
# held for one product (wide inputs take fewer rows at a time).
GRAM_ROWS = 1 << 14
GRAM_BYTES = 1 << 26


class GramSum:
    """Σ XᵀX and, with ``cross``, Σ XᵀY over samples added one at a time (each [..., channels], Y row for
    row with X): rows are gathered into float32 blocks of up to GRAM_ROWS rows and GRAM_BYTES, each block
    multiplied once (numpy runs syrk for x.T @ x) and summed in float64. With ``weight`` ([channels, N])
    instead of ``cross``: Σ Xᵀ(Y − X)W, all the float target needs, in 4·K·N operations per row against
    2·K² for XᵀY (half the cost for an MLP's down_proj, whose K is 4x its N).

    ``device``: a torch device ("cuda" when the conversion runs there, ``sq_onnx.runtime.device.gptq_device``)
    that multiplies and sums instead of numpy, in the same precisions (float32 products, float64 sums): at a
    7B model's widths the products are most of a conversion's maths. None: numpy on the CPU."""

    def __init__(
        self, channels: int, cross: bool = False, weight: np.ndarray | None = None, device: str | None = None
    ) -> None:
        self.channels = channels
        self.rows = max(1, min(GRAM_ROWS, GRAM_BYTES // (4 * channels)))
        self._array = _numpy_arrays if device is None else _torch_arrays(device)
        zeros = self._array.zeros
        self.total = zeros((channels, channels))
        self.cross = zeros((channels, channels)) if cross and weight is None else None
        self.weight = None if weight is None else self._array.put(np.asarray(weight, np.float32))
        self.shift = None if weight is None else zeros(tuple(weight.shape))
        self._xs: list[np.ndarray] = []
        self._ys: list[np.ndarray] = []
        self._held = 0

    def add(self, x: np.ndarray, y: np.ndarray | None = None) -> None:
        self._xs.append(np.asarray(x, np.float32).reshape(-1, self.channels))
        if self.cross is not None or self.shift is not None:
            assert y is not None, "a cross term needs the other input"
            self._ys.append(np.asarray(y, np.float32).reshape(-1, self.channels))
        self._held += self._xs[-1].shape[0]
        if self._held >= self.rows:
            self._flush()

    def _flush(self) -> None:
        if not self._xs:
            return
        x = self._array.put(np.concatenate(self._xs) if len(self._xs) > 1 else self._xs[0])
        for lo in range(0, x.shape[0], self.rows):
            part = x[lo : lo + self.rows]
            self.total += part.T @ part
        if self.cross is not None or self.shift is not None:
            y = self._array.put(np.concatenate(self._ys) if len(self._ys) > 1 else self._ys[0])
            for lo in range(0, x.shape[0], self.rows):
                xb, yb = x[lo : lo + self.rows], y[lo : lo + self.rows]
                if self.shift is not None:
                    self.shift += xb.T @ ((yb - xb) @ self.weight)
                else:
                    self.cross += xb.T @ yb
        self._xs, self._ys, self._held = [], [], 0

    def result(self) -> tuple[np.ndarray, np.ndarray | None]:
        """Σ XᵀX and Σ XᵀY as float32 numpy arrays (``shift`` too, after this call)."""
        self._flush()
        got = self._array.get
        if self.shift is not None:
            self.shift = got(self.shift, np.float64)
        return got(self.total, np.float32), (None if self.cross is None else got(self.cross, np.float32))


@dataclass(frozen=True)
class _Arrays:
    """Where GramSum's sums live: zeros in float64, a float32 numpy block moved there, a sum brought back."""

    zeros: Callable[[tuple[int, ...]], Any]
    put: Callable[[np.ndarray], Any]
    get: Callable[[Any, type], np.ndarray]


_numpy_arrays = _Arrays(
    zeros=lambda shape: np.zeros(shape, np.float64),
    put=lambda a: a,
    get=lambda a, dtype: a.astype(dtype, copy=False),
)


def _torch_arrays(device: str) -> _Arrays:
    import torch

    return _Arrays(
        zeros=lambda shape: torch.zeros(shape, dtype=torch.float64, device=device),
        put=lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device),
        get=lambda a, dtype: a.cpu().numpy().astype(dtype),
    )


def gram(
    arrays: list[np.ndarray], channels: int, others: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Σ XᵀX over ``arrays`` (each flattened to [rows, channels]) and, with ``others`` (same shapes, row for
    row), Σ XᵀY (``GramSum`` over a list)."""
    acc = GramSum(channels, cross=others is not None)
    for i, x in enumerate(arrays):
        acc.add(x, None if others is None else others[i])
    return acc.result()


@dataclass(frozen=True)
class BatchGrams:
    """One batch's Gram matrices: ``hessian`` = XᵀX and ``cross`` = X_qᵀX_f (None without a float copy) on
    the fitting samples, or instead ``shift`` = X_qᵀ(X_f − X_q)W for the batch's weight W; ``held`` the
    Hessian and cross pair on the held-out samples (None when none are held out)."""

    hessian: np.ndarray
    cross: np.ndarray | None
    held: tuple[np.ndarray, np.ndarray | None] | None = None
    shift: np.ndarray | None = None
    device: str | None = None  # where the target's solve runs (GramSum's device)

    def target(self, w: np.ndarray, ridge: float = TARGET_DAMP, columns: slice = slice(None)) -> np.ndarray:
        """``float_target_weight`` of the batch's joined [K, N] weight, or of its ``columns`` (``w`` is then
        those columns); ``w`` itself without a float copy."""
        if self.shift is not None:
            return corrected_weight(w, self.hessian, self.shift[:, columns], ridge, self.device)
        if self.cross is None:
            return w
        return float_target_weight(w, self.hessian, self.cross, ridge, self.device)

    def held_out_loss(self, w: np.ndarray, w_hat: np.ndarray) -> float:
        """The batch's output error on the held-out samples, up to a constant: ‖X_q Ŵ − X_f W‖² with the
        float copy, ‖X Ŵ − X W‖² without (X_f = X). Compares candidate Ŵ for the same W."""
        if self.held is None:
            raise RuntimeError("no samples were held out")
        h, cross = self.held
        c = h if cross is None else cross
        d = w_hat.astype(np.float64)
        return float(np.sum(d * (h.astype(np.float64) @ d)) - 2.0 * np.sum(d * (c.astype(np.float64) @ w)))


def batch_grams(
    inputs: SegmentInputs,
    holdout: int = 0,
    int8_block: int | None = None,
    weight: np.ndarray | None = None,
    device: str | None = None,
) -> BatchGrams:
    """The Gram matrices of one runner step, summed as its samples arrive; the last ``holdout`` samples (when
    fewer than all) are kept apart for ``held_out_loss``. With ``int8_block`` the quantized model's input is
    first rounded as MatMulNBits at accuracy_level 4 rounds it (int8 per block of K), so GPTQ fits the
    weights to what the kernel multiplies; the float side (the target) stays exact. With the batch's
    ``weight`` [K, N] and a float copy, a layer at least twice as wide in as out (down_proj) sums ``shift``
    instead of ``cross``: the same target for half the operations. ``device``: as ``GramSum``'s."""
    n = inputs.count
    holdout = holdout if 0 < holdout < n else 0
    narrowing = weight is not None and inputs.with_float and 2 * weight.shape[1] < inputs.channels
    fit = GramSum(
        inputs.channels, cross=inputs.with_float, weight=weight if narrowing else None, device=device
    )
    held = GramSum(inputs.channels, cross=inputs.with_float, device=device) if holdout else None
    seen = 0
    for i, (x, y) in enumerate(inputs.pairs):
        x = x if int8_block is None else fake_blockwise(x, int8_block)
        (fit if i < n - holdout or held is None else held).add(x, y)
        seen += 1
    if seen != n:
        raise RuntimeError(
            f"step {inputs.index} gave {seen} of its {n} samples: read each step before the next"
        )
    hessian, cross = fit.result()
    return BatchGrams(hessian, cross, held.result() if held is not None else None, fit.shift, device)


def float_target_weight(
    w: np.ndarray,
    hessian: np.ndarray,
    cross: np.ndarray,
    damp: float = TARGET_DAMP,
    device: str | None = None,
) -> np.ndarray:
    """argmin_Ŵ ‖X_q Ŵ − X_f W‖² = W + H⁻¹X_qᵀ(X_f − X_q)W (H = X_qᵀX_q): quantizing this target with
    GPTQ on H minimises the distance to the float model's output, not to this layer's own output on the
    already degraded input. The correction is a ridge regression of the upstream error on the layer's input,
    with ``damp`` x mean(diag H) on the diagonal; W itself is never shrunk, so a layer whose input is still
    exact keeps W. ``w`` [K, N]. ``device``: where the solve runs (``dampened_solve``)."""
    delta = cross.astype(np.float64) - hessian.astype(np.float64)  # X_qᵀ(X_f − X_q)
    return corrected_weight(w, hessian, delta @ w.astype(np.float64), damp, device)


def corrected_weight(
    w: np.ndarray,
    hessian: np.ndarray,
    shift: np.ndarray,
    damp: float = TARGET_DAMP,
    device: str | None = None,
) -> np.ndarray:
    """``float_target_weight`` from ``shift`` = X_qᵀ(X_f − X_q)W: W + (H + ridge)⁻¹ shift."""
    return (w.astype(np.float64) + dampened_solve(hessian, shift, damp, device)).astype(np.float32)
