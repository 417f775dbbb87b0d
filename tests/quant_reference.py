"""Quantization grids written from ONNX Runtime's contrib-op spec in plain numpy, a block at a time:
the references the tests hold sq-onnx's quantizers to. Nothing here imports sq-onnx.

MatMulNBits: B uint8 [N, k_blocks, block_size * bits / 8] (4 bits: element 2i in the low nibble of byte i),
scales [N, k_blocks], zero points uint8 packed like B along the blocks (absent: 2^(bits-1));
W[k, n] = (q - zp) * scale. MatMulIntegerToFloat: (A_int8 @ B_int8) * a_scale * b_scale.
"""

from __future__ import annotations

import numpy as np


def ref_rtn(w_kn: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric round-to-nearest per block of ``block`` along K (range widened to hold 0, the padding
    zeros included): codes uint8 [N, k_blocks, block], scales and zero points [N, k_blocks]."""
    k, n = w_kn.shape
    nb = -(-k // block)
    qmax = 2**bits - 1
    codes = np.zeros((n, nb, block), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    zps = np.zeros((n, nb), np.uint8)
    for col in range(n):
        for j in range(nb):
            vals = np.zeros(block, np.float32)
            part = w_kn[j * block : (j + 1) * block, col]
            vals[: len(part)] = part
            lo, hi = min(vals.min(), np.float32(0)), max(vals.max(), np.float32(0))  # float32 throughout
            scale = (hi - lo) / np.float32(qmax) if hi > lo else np.float32(1.0)
            zp = int(np.clip(np.rint(-lo / scale), 0, qmax))
            codes[col, j] = np.clip(np.rint(vals / scale) + zp, 0, qmax)
            scales[col, j], zps[col, j] = scale, zp
    return codes, scales, zps


def ref_unpack(node_inputs: list[np.ndarray | None], k: int, n: int, bits: int, block: int) -> np.ndarray:
    """MatMulNBits' B, scales, zero points -> the float [K, N] weight the op multiplies by."""
    b, scales, zp = node_inputs[1], node_inputs[2], node_inputs[3] if len(node_inputs) > 3 else None
    nb = -(-k // block)
    b = b.reshape(n, nb, block * bits // 8)
    if bits == 4:
        q = np.empty((n, nb, block), np.uint8)
        q[..., 0::2], q[..., 1::2] = b & 0x0F, b >> 4
    else:
        q = b
    if zp is None:
        z = np.full((n, nb), 2 ** (bits - 1), np.float32)
    elif bits == 4:
        z = np.stack([zp & 0x0F, zp >> 4], -1).reshape(n, -1)[:, :nb].astype(np.float32)
    else:
        z = zp.reshape(n, nb).astype(np.float32)
    w = (q.astype(np.float32) - z[..., None]) * scales.reshape(n, nb)[..., None]
    return w.reshape(n, -1)[:, :k].T


def ref_per_channel(w_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: scale = max|W[:, n]| / 127."""
    scale = np.abs(w_kn).max(axis=0) / 127.0
    return np.clip(np.rint(w_kn / scale), -127, 127).astype(np.int8), scale.astype(np.float32)


def ref_per_token(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per row (token): scale = max|x_row| / 127."""
    scale = np.abs(x).max(axis=-1, keepdims=True) / np.float32(127.0)
    return np.rint(x / scale), scale


def ref_symmetric(w_kn: np.ndarray, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest per block: the element of largest magnitude maps to -2^(bits-1)
    (so the scale takes its sign), zero point 2^(bits-1): codes [N, k_blocks, block], scales."""
    k, n = w_kn.shape
    nb = -(-k // block)
    mid, qmax = 2 ** (bits - 1), 2**bits - 1
    codes = np.zeros((n, nb, block), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    for col in range(n):
        for j in range(nb):
            vals = np.zeros(block, np.float32)
            part = w_kn[j * block : (j + 1) * block, col]
            vals[: len(part)] = part
            biggest = vals[np.argmax(np.abs(vals))]
            scale = biggest / np.float32(-mid) if biggest != 0 else np.float32(1.0)
            codes[col, j] = np.clip(np.rint(vals / scale) + mid, 0, qmax)
            scales[col, j] = scale
    return codes, scales


def ref_pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes [N, k_blocks, block] -> MatMulNBits' B bytes."""
    if bits == 8:
        return codes.astype(np.uint8)
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def ref_dequant(
    codes: np.ndarray, scales: np.ndarray, zps: np.ndarray | None, bits: int, k: int
) -> np.ndarray:
    """Codes and grid -> the float [K, N] weight."""
    z = np.full(scales.shape, 2 ** (bits - 1), np.float32) if zps is None else zps.astype(np.float32)
    w = (codes.astype(np.float32) - z[..., None]) * scales[..., None]
    return w.reshape(w.shape[0], -1)[:, :k].T
