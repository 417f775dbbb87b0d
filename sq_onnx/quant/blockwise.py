"""Vectorised block-wise weight quantization in MatMulNBits' storage layout (ORT contrib op spec)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BlockQuantized:
    """A [K, N] weight quantized along K in blocks, laid out for ``com.microsoft::MatMulNBits``.

    packed: uint8 [N, n_blocks, block_size * bits / 8]; scales: float32 [N, n_blocks];
    zero_points: uint8 [N, n_blocks] (unpacked; None when symmetric, meaning 2^(bits-1)).
    """

    packed: np.ndarray
    scales: np.ndarray
    zero_points: np.ndarray | None
    q: np.ndarray
    k: int
    bits: int
    block_size: int

    def packed_zero_points(self) -> np.ndarray | None:
        """Zero points packed like the weights: 4-bit pairs per byte along the blocks, low nibble first."""
        if self.zero_points is None:
            return None
        zp = self.zero_points
        if self.bits == 8:
            return zp.reshape(-1).copy()
        if zp.shape[1] % 2:
            zp = np.concatenate([zp, np.zeros((zp.shape[0], 1), np.uint8)], axis=1)
        return pack_nibbles(zp).reshape(-1)

    def columns(self, lo: int, hi: int) -> BlockQuantized:
        """Output channels [lo, hi) on their own: each channel's codes and grid are independent, so a
        weight quantized together with others (sharing an input and so a Hessian) splits back exactly."""
        zp = self.zero_points[lo:hi] if self.zero_points is not None else None
        return BlockQuantized(
            self.packed[lo:hi], self.scales[lo:hi], zp, self.q[lo:hi], self.k, self.bits, self.block_size
        )

    @classmethod
    def joined(cls, parts: list[BlockQuantized]) -> BlockQuantized:
        """``parts`` side by side (their output channels in order): the inverse of ``columns``."""
        first = parts[0]
        zps = [p.zero_points for p in parts]
        zp = None if any(z is None for z in zps) else np.concatenate(zps)  # type: ignore[arg-type]
        return cls(
            np.concatenate([p.packed for p in parts]),
            np.concatenate([p.scales for p in parts]),
            zp,
            np.concatenate([p.q for p in parts]),
            first.k,
            first.bits,
            first.block_size,
        )

    def dequantize(self) -> np.ndarray:
        """Back to a float32 [K, N] array, as the kernel sees it."""
        deq = dequantize_blocks(self.q, self.scales, self.zero_points, self.bits)
        return deq.reshape(deq.shape[0], -1)[:, : self.k].T

    @classmethod
    def from_matmulnbits(
        cls,
        packed: np.ndarray,
        scales: np.ndarray,
        zero_points: np.ndarray | None,
        k: int,
        n: int,
        bits: int,
        block_size: int,
    ) -> BlockQuantized:
        """Read back a MatMulNBits node's blobs (ORT's layout: two 4-bit codes per byte, low nibble
        first, zero points packed the same way along the blocks; none means 2^(bits-1))."""
        n_blocks = -(-k // block_size)
        packed = np.asarray(packed, np.uint8).reshape(n, n_blocks, -1)
        q = unpack_nibbles(packed).reshape(n, n_blocks, -1) if bits == 4 else packed
        zp = None
        if zero_points is not None:
            zp = np.asarray(zero_points, np.uint8).reshape(n, -1)
            zp = unpack_nibbles(zp).reshape(n, -1)[:, :n_blocks] if bits == 4 else zp
        scales = np.asarray(scales).astype(np.float32).reshape(n, n_blocks)
        return cls(packed, scales, zp, q, k, bits, block_size)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 codes [..., 2B] (each < 16) -> [..., B]: two per byte, the first in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., B] -> uint8 [..., B, 2]: the low nibble, then the high one."""
    return np.stack([packed & 0x0F, packed >> 4], axis=-1)


def dequantize_blocks(
    q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int
) -> np.ndarray:
    """Codes [N, B, size] back to float32 (q − zero point) x scale; no zero points means 2^(bits-1)."""
    zp = zero_points.astype(np.float32)[..., None] if zero_points is not None else np.float32(1 << (bits - 1))
    return (q.astype(np.float32) - zp) * scales[..., None]


def _grid(blocks: np.ndarray, bits: int, symmetric: bool, shrink: float | np.ndarray):
    """Scales, zero points and codes for blocks whose range is shrunk by ``shrink`` (1 = plain RTN)."""
    qmax = (1 << bits) - 1
    if symmetric:
        idx = np.abs(blocks).argmax(axis=-1)[..., None]
        signed_max = np.take_along_axis(blocks, idx, axis=-1)[..., 0] * shrink
        scales = signed_max / -float(1 << (bits - 1))
        scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
        mid = 1 << (bits - 1)
        q = np.clip(np.rint(blocks / scales[..., None]) + mid, 0, qmax).astype(np.uint8)
        return scales, None, q
    lo = np.minimum(blocks.min(axis=-1), 0.0) * shrink
    hi = np.maximum(blocks.max(axis=-1), 0.0) * shrink
    scales = ((hi - lo) / qmax).astype(np.float32)
    scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
    zero_points = np.clip(np.rint(-lo / scales), 0, qmax).astype(np.uint8)
    q = np.clip(np.rint(blocks / scales[..., None]) + zero_points[..., None], 0, qmax).astype(np.uint8)
    return scales, zero_points, q


# Float32 bytes of the output columns quantized at once: each column's blocks are its own, so slicing changes no
# code, and the clip search's working copies (several times the slice) stay small beside a 128K-wide lm_head.
SLICE_BYTES = 64 * 1024**2

CLIP_GRID = tuple(round(1.0 - 0.05 * i, 2) for i in range(11))  # 1.00 .. 0.50


def choose_grid(
    blocks: np.ndarray, bits: int, symmetric: bool, clip_search: bool, weight: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Scales [N, B], zero points and codes for blocks [N, B, size]: plain RTN, or per block the range
    shrink in CLIP_GRID with the least squared error, weighted per element of the block by ``weight``."""
    if not clip_search:
        return _grid(blocks, bits, symmetric, 1.0)
    best_err = np.full(blocks.shape[:2], np.inf, np.float32)
    best_shrink = np.ones(blocks.shape[:2], np.float32)
    for shrink in CLIP_GRID:
        sc, zp, qq = _grid(blocks, bits, symmetric, shrink)
        err = (dequantize_blocks(qq, sc, zp, bits) - blocks) ** 2
        err = (err * weight if weight is not None else err).sum(axis=-1)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_shrink = np.where(better, shrink, best_shrink)
    return _grid(blocks, bits, symmetric, best_shrink)


def quantize_blockwise(
    w_kn: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    clip_search: bool = False,
    importance: np.ndarray | None = None,
) -> BlockQuantized:
    """Block quantization of a [K, N] weight (blocks run along K, one scale per block and output column).

    Asymmetric: the block's range (extended to include 0) maps onto [0, 2^bits − 1] with a zero point.
    Symmetric: the element of largest magnitude maps to −2^(bits−1) (ORT's convention), zero point implicit.
    ``clip_search``: per block, shrink the range by the factor in CLIP_GRID that minimises the block's
    squared error, weighted per input channel by ``importance`` (e.g. mean X_k²) when given — the
    error the layer's output sees, not just the weight's.
    """
    if bits not in (4, 8):
        raise ValueError(f"bits must be 4 or 8, got {bits}")
    k, n = w_kn.shape
    n_blocks = -(-k // block_size)
    weight = None
    if importance is not None:
        weight = np.ones(n_blocks * block_size, np.float32)
        weight[:k] = np.asarray(importance, np.float32)
        weight = weight.reshape(1, n_blocks, block_size)
    q = np.empty((n, n_blocks, block_size), np.uint8)
    scales = np.empty((n, n_blocks), np.float32)
    zero_points = None if symmetric else np.empty((n, n_blocks), np.uint8)
    step = max(1, SLICE_BYTES // (4 * n_blocks * block_size))
    for lo in range(0, n, step):
        cols = slice(lo, min(lo + step, n))
        wt = np.zeros((cols.stop - lo, n_blocks * block_size), np.float32)
        wt[:, :k] = w_kn[:, cols].T
        sc, zp, q[cols] = choose_grid(
            wt.reshape(-1, n_blocks, block_size), bits, symmetric, clip_search, weight
        )
        scales[cols] = sc
        if zero_points is not None:
            zero_points[cols] = zp
    return pack_blocks(q, scales, zero_points, k, bits, block_size)


def pack_blocks(
    q: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, k: int, bits: int, block_size: int
) -> BlockQuantized:
    """Codes [N, n_blocks, block_size] and their grid, packed for MatMulNBits."""
    packed = pack_nibbles(q) if bits == 4 else q.copy()
    return BlockQuantized(packed, scales, zero_points, q, k, bits, block_size)
