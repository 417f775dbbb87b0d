"""GPTQ: block-wise weight quantization with second-order error feedback (Frantar et al., 2022).

Round-to-nearest quantizes each weight on its own. GPTQ quantizes the input channels of a linear one at
a time and moves each one's rounding error onto the channels not yet quantized, weighted by the inverse
Hessian of the layer's loss ||XW − XQ||², H = XᵀX (from calibration). The output error, not the
weight error, is what gets minimised, and the result is the same MatMulNBits layout as RTN.
"""

from __future__ import annotations

import numpy as np

from sq_onnx.passes.blockwise import BlockQuantized, choose_grid, pack_blocks

# Dampening of H's diagonal, as a fraction of its mean (the GPTQ paper's default): keeps the Cholesky
# factorisation stable when calibration leaves some directions of X unexplored.
DAMP = 0.01


def inverse_hessian_factor(hessian: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of H⁻¹ (H dampened; channels never active get H_jj = 1) and the dead mask."""
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    inv = np.linalg.inv(h)
    inv = (inv + inv.T) / 2
    return np.linalg.cholesky(inv).T, dead


def _block_grid(
    rows: np.ndarray, importance: np.ndarray, bits: int, symmetric: bool, clip_search: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale [N] and zero point [N] (None: symmetric) of one block's rows [block_size, N]."""
    weight = importance.reshape(1, 1, -1).astype(np.float32)
    sc, zp, _ = choose_grid(rows.T[:, None, :].astype(np.float32), bits, symmetric, clip_search, weight)
    return sc[:, 0], (zp[:, 0] if zp is not None else None)


def gptq_quantize(
    w_kn: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    clip_search: bool = False,
    act_order: bool = False,
    damp: float = DAMP,
) -> BlockQuantized:
    """Quantize a [K, N] weight along K in blocks of ``block_size`` with GPTQ error feedback.

    ``hessian``: [K, K] ∝ XᵀX of the layer's input (any positive scale). Without ``act_order`` each
    block's grid is chosen when the block is reached, from the weights as updated by the earlier
    blocks' errors. With ``act_order`` the channels are quantized in order of decreasing H_jj (the most
    active first, so the most error can still be compensated) and the grids are fixed up front from
    the original weights, so the MatMulNBits layout (contiguous blocks along K) is unchanged.
    ``clip_search``: the range shrink with the least error weighted by diag H.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    k, n = w_kn.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {list(hessian.shape)}")
    n_blocks = -(-k // block_size)
    kp = n_blocks * block_size
    h = np.eye(kp, dtype=np.float64)  # padded channels: zero weights, uncorrelated, quantized exactly
    h[:k, :k] = hessian
    w = np.zeros((kp, n), np.float64)
    w[:k] = w_kn
    w[np.diag(h) <= 0] = 0.0
    importance = np.diag(h)
    qmax = (1 << bits) - 1
    scales = np.zeros((n, n_blocks), np.float32)
    zeros = np.full((n, n_blocks), float(1 << (bits - 1)), np.float32)

    def fix_grid(b: int, rows: np.ndarray) -> None:
        sl = slice(b * block_size, (b + 1) * block_size)
        scales[:, b], zp = _block_grid(rows, importance[sl], bits, symmetric, clip_search)
        if zp is not None:
            zeros[:, b] = zp

    order = np.argsort(-importance, kind="stable") if act_order else np.arange(kp)
    if act_order:
        for b in range(n_blocks):
            fix_grid(b, w[b * block_size : (b + 1) * block_size])
    u, _ = inverse_hessian_factor(h[np.ix_(order, order)], damp)
    w = w[order]
    codes = np.zeros((kp, n), np.uint8)  # by original channel
    for lo in range(0, kp, block_size):
        hi = lo + block_size
        if not act_order:
            fix_grid(lo // block_size, w[lo:hi])
        rows = w[lo:hi]  # view: updated in place by this batch's own errors
        u_batch = u[lo:hi, lo:hi]
        errors = np.zeros((block_size, n), np.float64)
        for i in range(block_size):
            channel = order[lo + i]
            step = scales[:, channel // block_size].astype(np.float64)
            zero = zeros[:, channel // block_size].astype(np.float64)
            q = np.clip(np.rint(rows[i] / step) + zero, 0, qmax)
            codes[channel] = q
            err = (rows[i] - (q - zero) * step) / u_batch[i, i]
            rows[i + 1 :] -= np.outer(u_batch[i, i + 1 :], err)
            errors[i] = err
        w[hi:] -= u[lo:hi, hi:].T @ errors
    zero_points = None if symmetric else zeros.astype(np.uint8)
    return pack_blocks(codes.T.reshape(n, n_blocks, block_size), scales, zero_points, k, bits, block_size)
