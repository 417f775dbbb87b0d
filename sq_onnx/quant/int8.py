"""int8 rounding as the W8A8 ops define it: symmetric per-output-channel weights, per-token activations
(|x| row max / 127, as the emitted Abs/ReduceMax/Max/Div/Round graph computes it), a calibrated static
per-tensor scale (QuantizeLinear, zero point 0) and ORT's DynamicQuantizeLinear (uint8, asymmetric). The
``fake_*`` functions return the float values the integer kernel effectively multiplies."""

from __future__ import annotations

import numpy as np

# Floor of a per-token row max, so an all-zero row gets a finite scale (also the graph's Max constant).
EPS = 1e-12


def quantize_per_channel(w_kn: np.ndarray, qmax: int = 127) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: returns (Wq int8 [K, N], scale float32 [N])."""
    w = w_kn.astype(np.float32)
    absmax = np.abs(w).max(axis=0)
    scale = np.where(absmax > 0, absmax / qmax, 1.0).astype(np.float32)
    wq = np.clip(np.rint(w / scale), -qmax, qmax).astype(np.int8)
    return wq, scale


def fake_per_channel(w_kn: np.ndarray) -> np.ndarray:
    """The [K, N] weight an int8 per-channel kernel multiplies."""
    wq, scale = quantize_per_channel(w_kn)
    return wq.astype(np.float32) * scale


def fake_per_token(x: np.ndarray) -> np.ndarray:
    """Rows [R, K] rounded to int8 with one scale per row (max |x| / 127)."""
    scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), EPS) / 127.0
    return np.rint(x / scale) * scale


def fake_static(x: np.ndarray, scale: float) -> np.ndarray:
    """QuantizeLinear to int8 with a fixed scale and zero point 0 (saturating), back to float."""
    return np.clip(np.rint(x / scale), -128, 127) * scale


def fake_blockwise(x: np.ndarray, block: int) -> np.ndarray:
    """Rows [..., K] as MatMulNBits at accuracy_level 4 multiplies them on CPU (MLAS QuantizeARow_CompInt8):
    per block of ``block`` values along K, scale = max|a| / 127, codes = round-half-even(a * 127 / max|a|),
    a block of zeros stays zero. The last block may be shorter."""
    x32 = np.asarray(x, np.float32)
    k = x32.shape[-1]
    pad = -k % block
    rows = x32.reshape(-1, k)
    if pad:
        rows = np.pad(rows, ((0, 0), (0, pad)))
    blocks = rows.reshape(rows.shape[0], -1, block)
    amax = np.abs(blocks).max(axis=2, keepdims=True)
    inverse = np.divide(np.float32(127.0), amax, out=np.zeros_like(amax), where=amax != 0)
    codes = np.rint(blocks * inverse)  # np.rint rounds half to even, as _MM_ROUND_NEAREST does
    out = (codes * (amax / np.float32(127.0))).reshape(rows.shape[0], -1)[:, :k]
    return out.reshape(x32.shape)


def fake_dynamic_uint8(x: np.ndarray) -> np.ndarray:
    """DynamicQuantizeLinear: uint8 over the tensor's range extended to include 0, back to float."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = np.clip(np.rint(-lo / scale), 0, 255)
    return (np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * scale
