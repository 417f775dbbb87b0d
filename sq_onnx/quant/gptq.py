"""GPTQ: block-wise weight quantization with second-order error feedback (Frantar et al., 2022).

Round-to-nearest quantizes each weight on its own. GPTQ quantizes the input channels of a linear one at
a time and moves each one's rounding error onto the channels not yet quantized, weighted by the inverse
Hessian of the layer's loss ||XW − XQ||², H = XᵀX (from calibration). The output error, not the
weight error, is what gets minimised, and the result is the same MatMulNBits layout as RTN.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.linalg import cho_factor, cho_solve, lapack

from sq_onnx.quant import gptq_ops as _ops
from sq_onnx.quant.blockwise import BlockQuantized, choose_grid, pack_blocks
from sq_onnx.quant.gptq_ops import NumpyOps, TorchOps

# Dampening of H's diagonal, as a fraction of its mean (the GPTQ paper's default): keeps the Cholesky
# factorisation stable when calibration leaves some directions of X unexplored.
DAMP = 0.01
# Channels whose errors are passed on one at a time before the rest of the block gets them in one product:
# the per-channel updates touch SUB rows, not the block's, and the block's share becomes a matrix product.
SUB = 16


def dampened_hessian(
    hessian: np.ndarray, damp: float = DAMP, overwrite: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """H in float64 with channels never active set to H_jj = 1 and ``damp`` x mean(diag) added to the
    diagonal, and the dead mask: positive definite, as both the inverse and the refinement need.
    ``overwrite``: dampen a float64 ``hessian`` in place (512 MB saved at K = 8192)."""
    h = hessian if overwrite and hessian.dtype == np.float64 else np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices_from(h)] += damp * float(np.mean(np.diag(h)))
    return h, dead


def inverse_hessian_factor(hessian: np.ndarray, damp: float = DAMP) -> tuple[np.ndarray, np.ndarray]:
    """Upper Cholesky factor U of H⁻¹ (UᵀU = H⁻¹; H dampened, channels never active get H_jj = 1) and the
    dead mask. H⁻¹ is never formed: with the channels reversed (J), JHJ = LLᵀ gives H = RRᵀ with R = JLJ
    upper triangular, so U = R⁻¹: one factorisation and one triangular inverse, ~K³/1.5 operations against
    ~3K³ for inverse-then-factor (Llama-3.2-1B's down_proj, K = 8192: 10% of a W4 conversion's time).
    U is returned in Fortran order. Each step works in place on one K x K float64 buffer handed to LAPACK
    in the layout it takes without copying, so at most two are alive (four before: 2 GB at K = 8192)."""
    h, dead = dampened_hessian(hessian, damp)
    # JHJ in C order is, read in Fortran order, its own transpose: the same symmetric matrix
    flipped = np.ascontiguousarray(h[::-1, ::-1])
    del h
    low, info = lapack.dpotrf(flipped.T, lower=1, clean=1, overwrite_a=1)
    del flipped
    if info == 0:
        upper = np.asfortranarray(low[::-1, ::-1])
        del low
        u, info = lapack.dtrtri(upper, lower=0, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"the dampened Hessian is not positive definite (LAPACK info {info})")
    return u, dead


def dampened_solve(
    hessian: np.ndarray, rhs: np.ndarray, damp: float, device: str | None = None
) -> np.ndarray:
    """(H + damp · mean(diag H))⁻¹ rhs in float64, by Cholesky (H dampened as ``dampened_hessian``); on the
    torch ``device`` when one is named (``gptq_quantize``'s)."""
    h, _ = dampened_hessian(hessian, damp)
    if device is None:
        return cho_solve(cho_factor(h, overwrite_a=True, check_finite=False), rhs, check_finite=False)
    return TorchOps(device).cholesky_solve(h, rhs)


def _block_grid(
    rows: np.ndarray, importance: np.ndarray, bits: int, symmetric: bool, clip_search: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Scale [N] and zero point [N] (None: symmetric) of one block's rows [block_size, N]."""
    weight = importance.reshape(1, 1, -1).astype(np.float32)
    sc, zp, _ = choose_grid(rows.T[:, None, :].astype(np.float32), bits, symmetric, clip_search, weight)
    return sc[:, 0], (zp[:, 0] if zp is not None else None)


def _code_offsets(codes: Any, zeros: Any, block_size: int, ops: NumpyOps | None = None) -> Any:
    """codes − zero point [K, N], float32: the dequantized weights divided by their block's scale."""
    ops = ops or NumpyOps()
    return ops.as_type(codes, ops.float32) - ops.repeat_rows(ops.as_type(zeros.T, ops.float32), block_size)


def refine_codes(
    w: Any,
    h: Any,
    codes: Any,
    steps: Any,
    zeros: Any,
    block_size: int,
    qmax: int,
    ops: NumpyOps | None = None,
) -> int:
    """One sweep of cyclic coordinate descent on the layer loss tr((W−Ŵ)ᵀH(W−Ŵ)) over the codes, grids
    fixed (QuantEase, Behdin et al., 2023): each channel in turn moves to the grid point nearest its
    optimum given all the others, so the loss never rises. Starting from GPTQ's codes, it undoes choices
    GPTQ's single greedy pass could not revisit. ``w`` [K, N] original weights, ``h`` [K, K] (positive
    diagonal; float32 is used as it is, anything else is copied to it), ``codes`` [K, N] updated in place;
    ``steps``/``zeros`` [N, n_blocks]. Returns how many codes changed. ``ops``: where the arrays live
    (``sq_onnx.quant.gptq_ops``; numpy when None)."""
    ops = ops or NumpyOps()
    k, n = w.shape
    h = ops.as_type(h, ops.float32)
    current = _code_offsets(codes, zeros, block_size, ops) * ops.repeat_rows(steps.T, block_size)
    grad = h @ (ops.as_type(w, ops.float32) - current)  # G = H R: the loss's descent direction per channel
    diag = ops.diag(h)
    changed = 0
    for lo in range(0, k, block_size):  # lazy updates: within a block row by row, every row once per block
        hi, b = lo + block_size, lo // block_size
        step, zero = steps[:, b], zeros[:, b]
        moved = ops.zeros((block_size, n), ops.float32)
        for i in range(lo, hi):
            target = current[i] + grad[i] / diag[i]
            q = ops.clip(ops.rint(target / step + zero), 0, qmax)
            d = (q - zero) * step - current[i]
            cols = ops.nonzero(d)  # after the first sweep few codes move: touch only their columns
            if len(cols):
                changed += int((q != codes[i]).sum())
                codes[i] = q
                current[i] += d
                grad[i + 1 : hi, cols] -= ops.outer(h[i + 1 : hi, i], d[cols])  # the rows still to come
                moved[i - lo] = d
        # the block's moves reach the rows still to come in this sweep; the rows already visited are not read
        # again (the next sweep starts from a fresh gradient), and after the first sweep few columns move
        cols = ops.nonzero((moved != 0).sum(0))
        if 0 < len(cols) < n // 2:
            grad[hi:, cols] -= h[hi:, lo:hi] @ moved[:, cols]
        elif len(cols):
            grad[hi:] -= h[hi:, lo:hi] @ moved
    return changed


def refit_scales(
    w: Any,
    h: Any,
    codes: Any,
    steps: Any,
    zeros: Any,
    block_size: int,
    hw: Any = None,
    ops: NumpyOps | None = None,
) -> None:
    """The block scales that minimise tr((W−Ŵ)ᵀH(W−Ŵ)) with the codes and zero points fixed: per output
    column a least-squares problem in its n_blocks scales, coupled through H (solved for all columns at
    once). ``steps`` [N, n_blocks] updated in place; a column keeps its scales where the fit is degenerate
    or flips a sign. ``hw``: H @ W in float32, the same every round (computed here when not given)."""
    ops = ops or NumpyOps()
    k, n = w.shape
    nb = k // block_size
    # the products in float32 (H is a float32 Gram sum upcast, the codes small integers: float64 bought
    # nothing but twice the time, a third of GPTQ's maths at K = 8192); the small systems in float64
    h = ops.as_type(h, ops.float32)
    e = _code_offsets(codes, zeros, block_size, ops)
    eb = e.reshape(nb, block_size, n)
    gram = ops.zeros((n, nb, nb), ops.float64)
    for c in range(nb):
        he = (h[:, c * block_size : (c + 1) * block_size] @ eb[c]).reshape(nb, block_size, n)
        gram[:, :, c] = ops.einsum("bkn,bkn->nb", eb, he)  # block b's codes against H's block c columns
    hw = (h @ ops.as_type(w, ops.float32) if hw is None else hw).reshape(nb, block_size, n)
    rhs = ops.as_type(ops.einsum("bkn,bkn->nb", eb, hw), ops.float64)
    ridge = 1e-9 * ops.at_least(ops.einsum("nbb->n", gram), 1e-30)[:, None, None] * ops.eye(nb)
    fit = ops.solve(gram + ridge, rhs[..., None])[..., 0]
    ok = (ops.isfinite(fit) & (fit * steps > 0)).all(-1)  # symmetric grids may have signed scales
    steps[ok] = ops.as_type(fit[ok], steps.dtype)


def gptq_quantize(
    w_kn: np.ndarray,
    hessian: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    clip_search: bool = False,
    act_order: bool = False,
    damp: float = DAMP,
    refine_rounds: int = 0,
    device: str | None = None,
) -> BlockQuantized:
    """Quantize a [K, N] weight along K in blocks of ``block_size`` with GPTQ error feedback.

    ``hessian``: [K, K] ∝ XᵀX of the layer's input (any positive scale). Without ``act_order`` each
    block's grid is chosen when the block is reached, from the weights as updated by the earlier
    blocks' errors. With ``act_order`` the channels are quantized in order of decreasing H_jj (the most
    active first, so the most error can still be compensated) and the grids are fixed up front from
    the original weights, so the MatMulNBits layout (contiguous blocks along K) is unchanged.
    ``clip_search``: the range shrink with the least error weighted by diag H. ``refine_rounds``: after
    GPTQ, that many rounds of one coordinate-descent sweep over the codes and a least-squares refit of the
    block scales, both on the same loss (each can only lower it). ``device``: a torch device for the
    factor, the error feedback and the refinement ("cuda" when the conversion runs there,
    ``sq_onnx.runtime.device.gptq_device``); None: numpy and LAPACK on the CPU. The grids are chosen in
    numpy either way.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    k, n = w_kn.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian must be [{k}, {k}], got {list(hessian.shape)}")
    ops = _ops.gptq_ops(device)
    n_blocks = -(-k // block_size)
    kp = n_blocks * block_size
    h = np.eye(kp, dtype=np.float64)  # padded channels: zero weights, uncorrelated, quantized exactly
    h[:k, :k] = hessian
    w = np.zeros((kp, n), np.float64)
    w[:k] = w_kn
    w[np.diag(h) <= 0] = 0.0
    importance = np.diag(h).copy()
    w0 = w.copy() if refine_rounds else w
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
    # the factor in float64, the error feedback in float32 (GPTQ's own precision), rows contiguous
    ordered = h[np.ix_(order, order)] if act_order else h
    if isinstance(ops, TorchOps):  # the same U as inverse_hessian_factor, to rounding
        u = ops.as_type(ops.upper_factor_of_inverse(dampened_hessian(ordered, damp)[0]), ops.float32)
    else:
        u = np.ascontiguousarray(inverse_hessian_factor(ordered, damp)[0], dtype=np.float32)
    del ordered
    w = ops.put(w[order], ops.float32)
    steps, offsets = ops.put(scales), ops.put(zeros)  # the grids where the feedback runs
    codes = ops.zeros((kp, n), ops.uint8)  # by original channel
    for lo in range(0, kp, block_size):
        hi = lo + block_size
        if not act_order:
            b = lo // block_size
            fix_grid(b, ops.get(w[lo:hi]))
            steps[:, b], offsets[:, b] = ops.put(scales[:, b]), ops.put(zeros[:, b])
        rows = w[lo:hi]  # view: updated in place by this batch's own errors
        u_batch = u[lo:hi, lo:hi]
        errors = ops.zeros((block_size, n), ops.float32)
        for sub in range(0, block_size, SUB):
            end = min(sub + SUB, block_size)
            for i in range(sub, end):
                channel = int(order[lo + i])
                step, zero = steps[:, channel // block_size], offsets[:, channel // block_size]
                q = ops.clip(ops.rint(rows[i] / step) + zero, 0, qmax)
                codes[channel] = q
                err = (rows[i] - (q - zero) * step) / u_batch[i, i]
                rows[i + 1 : end] -= ops.outer(u_batch[i, i + 1 : end], err)
                errors[i] = err
            rows[end:] -= u_batch[sub:end, end:].T @ errors[sub:end]
        w[hi:] -= u[lo:hi, hi:].T @ errors
    del u, w
    if refine_rounds:
        hd, _ = dampened_hessian(h, damp, overwrite=True)  # h's last use
        del h
        hd = ops.put(hd, ops.float32)  # the rounds' products are float32: one copy for all of them
        w0 = ops.put(w0, ops.float32)
        hw = hd @ w0
        for _ in range(refine_rounds):
            refine_codes(w0, hd, codes, steps, offsets, block_size, qmax, ops)
            refit_scales(w0, hd, codes, steps, offsets, block_size, hw, ops)
        scales = ops.get(steps)
    codes = ops.get(codes)
    zero_points = None if symmetric else zeros.astype(np.uint8)
    return pack_blocks(codes.T.reshape(n, n_blocks, block_size), scales, zero_points, k, bits, block_size)
