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
from sq_onnx.quant.blockwise import BlockQuantized
from sq_onnx.quant.int8 import fake_dynamic_uint8, fake_per_token, fake_static


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
    packed = constant_array(node.inputs[1])
    scales = constant_array(node.inputs[2])
    assert packed is not None and scales is not None
    zp_in = node.inputs[3] if len(node.inputs) > 3 else None
    zero_points = constant_array(zp_in) if zp_in is not None else None
    return BlockQuantized.from_matmulnbits(
        packed,
        scales,
        zero_points,
        attrs["K"].as_int(),
        attrs["N"].as_int(),
        attrs["bits"].as_int(),
        attrs["block_size"].as_int(),
    ).dequantize()


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
        return fake_dynamic_uint8(x)
    static_scale = constant_array(node.inputs[2]) if node.op_type == "MatMulIntegerToFloat" else None
    if static_scale is not None and static_scale.size == 1:
        return fake_static(x, float(static_scale.reshape(-1)[0]))
    return fake_per_token(x)


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
    column_scales: dict[str, np.ndarray] | None = None,
) -> list[LayerError]:
    """Errors of every quantized linear, worst first.

    original: the linears of the float model before smoothing (weights read one at a time);
    rows: tensor -> [R, K] rows of the original model; scales: tensor -> smoothing s (absent = 1);
    column_scales: linear name -> the s its output columns were divided by (a fold into a linear producer).
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
        if column_scales and name in column_scales:
            ref = ref / column_scales[name].astype(np.float32)
        linear.release()
        den = float(np.linalg.norm(ref))
        err = float(np.linalg.norm(ref - got)) / den if den > 0 else 0.0
        errors.append(LayerError(name, linear.module, node.op_type, err, int(x.shape[0])))
    return sorted(errors, key=lambda e: e.relative_error, reverse=True)
