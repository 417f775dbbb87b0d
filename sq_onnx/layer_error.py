"""Per-layer quantization error measured on calibration rows, read back from the quantized graph itself.

The report must show what the saved model does, not what the quantizer meant to do, so the quantized
weights are unpacked from the output's own initializers (MatMulNBits blobs, int8 weights and their scales)
and the activation quantization is replayed in numpy the way the emitted ops define it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.linears import Linear, constant_array


@dataclass(frozen=True)
class LayerError:
    """Relative Frobenius error ||XW − X̂Ŵ|| / ||XW|| of one linear on ``rows`` calibration rows."""

    name: str
    module: str
    op: str
    relative_error: float
    rows: int


def unpack_matmulnbits(node: ir.Node) -> np.ndarray:
    """A ``com.microsoft::MatMulNBits`` node's weight as float32 [K, N] (ORT's layout and zero-point rules)."""
    attrs = node.attributes
    k, n = attrs["K"].as_int(), attrs["N"].as_int()
    bits, block = attrs["bits"].as_int(), attrs["block_size"].as_int()
    packed = constant_array(node.inputs[1])
    scales = constant_array(node.inputs[2])
    assert packed is not None and scales is not None
    n_blocks = -(-k // block)
    packed = packed.reshape(n, n_blocks, -1)
    # 4-bit: two codes per byte, low nibble first.
    q = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, n_blocks, -1) if bits == 4 else packed
    zp_in = node.inputs[3] if len(node.inputs) > 3 else None
    zp_arr = constant_array(zp_in) if zp_in is not None else None
    if zp_arr is None:
        zp = np.full((n, n_blocks), 1 << (bits - 1), np.float32)
    elif bits == 4:
        per_row = -(-n_blocks // 2)
        zp_arr = zp_arr.reshape(n, per_row)
        zp = np.stack([zp_arr & 0x0F, zp_arr >> 4], axis=-1).reshape(n, -1)[:, :n_blocks].astype(np.float32)
    else:
        zp = zp_arr.reshape(n, n_blocks).astype(np.float32)
    deq = (q.astype(np.float32) - zp[..., None]) * scales.astype(np.float32).reshape(n, n_blocks, 1)
    return deq.reshape(n, -1)[:, :k].T


def _int8_weight(node: ir.Node) -> np.ndarray:
    """``MatMulIntegerToFloat`` / ``DynamicQuantizeMatMul``: int8 [K, N] times per-column scale;
    ``sq_onnx::Int8MatMulDequant`` stores it as [N, K]."""
    if node.op_type == "Int8MatMulDequant":
        wq, ws = constant_array(node.inputs[2]), constant_array(node.inputs[3])
        assert wq is not None and ws is not None
        return wq.T.astype(np.float32) * ws.astype(np.float32).reshape(1, -1)
    wq = constant_array(node.inputs[1])
    ws_index = 3 if node.op_type == "MatMulIntegerToFloat" else 2
    ws = constant_array(node.inputs[ws_index])
    assert wq is not None and ws is not None
    return wq.astype(np.float32) * ws.astype(np.float32).reshape(1, -1)


def _quant_rows(node: ir.Node, x: np.ndarray) -> np.ndarray:
    """The activation rows as the integer kernel sees them (per-token, static or per-tensor dynamic)."""
    if node.op_type == "DynamicQuantizeMatMul":
        # DynamicQuantizeLinear: uint8, asymmetric, range always containing 0.
        lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
        scale = (hi - lo) / 255.0 or 1.0
        zp = np.clip(np.rint(-lo / scale), 0, 255)
        return (np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * scale
    static_scale = constant_array(node.inputs[2]) if node.op_type == "MatMulIntegerToFloat" else None
    if static_scale is not None and static_scale.size == 1:
        scale = float(static_scale.reshape(-1)[0])
        return np.clip(np.rint(x / scale), -128, 127) * scale
    scale = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-12) / 127.0
    return np.rint(x / scale) * scale


def emulate(node: ir.Node, x: np.ndarray) -> np.ndarray | None:
    """Y = node(x) for a quantized linear node, in numpy; None for ops this module does not know."""
    if node.op_type == "MatMulNBits":
        return x @ unpack_matmulnbits(node)
    if node.op_type in ("MatMulIntegerToFloat", "DynamicQuantizeMatMul", "Int8MatMulDequant"):
        return _quant_rows(node, x) @ _int8_weight(node)
    return None


def layer_errors(
    quantized: ir.Graph,
    original: list[Linear],
    rows: dict[str, np.ndarray],
    scales: dict[str, np.ndarray],
) -> list[LayerError]:
    """Errors of every quantized linear, worst first.

    original: the linears of the float model before smoothing (weights read one at a time);
    rows: tensor -> [R, K] rows of the original model; scales: tensor -> smoothing s (absent = 1).
    """
    by_name = {n.name: n for n in quantized}
    errors = []
    for linear in original:
        name, tensor = linear.name, linear.input.name or ""
        node, x = by_name.get(name), rows.get(tensor)
        if node is None or x is None:
            continue
        s = scales.get(tensor)
        xs = x / s if s is not None else x
        got = emulate(node, xs.astype(np.float32))
        if got is None:
            continue
        ref = x.astype(np.float32) @ linear.weight_kn().astype(np.float32)
        linear.release()
        den = float(np.linalg.norm(ref))
        err = float(np.linalg.norm(ref - got)) / den if den > 0 else 0.0
        errors.append(LayerError(name, linear.module, node.op_type, err, int(x.shape[0])))
    return sorted(errors, key=lambda e: e.relative_error, reverse=True)
