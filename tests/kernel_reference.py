"""numpy references for the sq_onnx custom ops (the arithmetic of custom_ops/src/cpu_kernels.h).

Every step is float32 (float16 only where the op stores T), without fused multiply-adds, so the CPU and
CUDA kernels must match these bit for bit; norm statistics are summed in float64 as the kernels do."""

from __future__ import annotations

import numpy as np

EPS = np.float32(1e-12)


def quantize_rows(v: np.ndarray, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Per-token int8 of float32 rows v [..., K] -> (q int8, scale dtype [..., 1])."""
    v = v.astype(np.float32)
    amax = np.abs(v).max(axis=-1, keepdims=True) if v.shape[-1] else np.zeros(v.shape[:-1] + (1,), np.float32)
    scale = (np.maximum(amax, EPS) / np.float32(127)).astype(dtype)
    sf = scale.astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(sf > 0, np.rint(v / np.where(sf > 0, sf, 1)), 0)
    return np.clip(r, -127, 127).astype(np.int8), scale


def quantize_per_token(x, smooth_inv=None):
    v = x.astype(np.float32)
    if smooth_inv is not None:
        v = v * smooth_inv.astype(np.float32)
    return quantize_rows(v, x.dtype)


def rmsnorm_quant(x, gamma, eps, skip=None, bias=None):
    a = x.astype(np.float32)
    total = None
    if skip is not None:
        s = a + skip.astype(np.float32)
        if bias is not None:
            s = s + bias.astype(np.float32)
        total = s.astype(x.dtype)
        a = total.astype(np.float32)
    k = a.shape[-1]
    ss = (a.astype(np.float64) ** 2).sum(axis=-1, keepdims=True)
    ms = (ss / k).astype(np.float32) if k else np.zeros_like(ss, np.float32)
    inv = np.float32(1) / np.sqrt(ms + np.float32(eps))
    y = a * inv * gamma.astype(np.float32)
    q, scale = quantize_rows(y, x.dtype)
    return (q, scale) if skip is None else (q, scale, total)


def layernorm_quant(x, gamma, beta, eps):
    a = x.astype(np.float32)
    k = a.shape[-1]
    mean = (a.astype(np.float64).sum(axis=-1, keepdims=True) / max(k, 1)).astype(np.float32)
    d = a - mean
    var = ((d.astype(np.float64) ** 2).sum(axis=-1, keepdims=True) / max(k, 1)).astype(np.float32)
    inv = np.float32(1) / np.sqrt(var + np.float32(eps))
    y = d * inv * gamma.astype(np.float32)
    if beta is not None:
        y = y + beta.astype(np.float32)
    return quantize_rows(y, x.dtype)


def int8_matmul_dequant(xq, x_scale, wq_nk, w_scale, bias=None):
    """Y = float32(Xq @ Wq^T as int32) * (x_scale * w_scale) (+ bias), stored in x_scale's dtype."""
    acc = xq.astype(np.int64) @ wq_nk.astype(np.int64).T
    y = acc.astype(np.int32).astype(np.float32) * (x_scale.astype(np.float32) * w_scale.astype(np.float32))
    if bias is not None:
        y = y + bias.astype(np.float32)
    return y.astype(x_scale.dtype)


# Shapes the CUTLASS Hopper kernel (fp16 only) takes: M > 4, K % 16 == 0, N % 8 == 0; partial tiles in M, N
# and K, and each of its three tile configurations (M up to 64; up to 128, or more rows but too few 128-row
# tiles for the SMs; above).
SM90_SHAPES = [
    (5, 64, 32),
    (12, 4096, 576),
    (17, 128, 16),
    (33, 264, 512),
    (100, 4104, 160),
    (129, 520, 4096),  # 10 tiles of 128 rows for 132 SMs: 64-row tiles
    (1000, 1024, 576),
    (1200, 2056, 256),  # 170 tiles of 128 rows: the 128-row configuration
]
