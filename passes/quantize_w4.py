"""Weight-only quantization: every selected linear -> ``com.microsoft::MatMulNBits`` (runs on stock ORT).

``QuantizeWeightsPass`` replaces batches of linears that read one tensor; how a batch's weight is
quantized (round-to-nearest, clip search, GPTQ with its Hessian) is the caller's function, so the pass
knows the layout and the graph, the method knows the maths. Gemm biases are kept as the op's bias input.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.graph_edit import MS, add_initializer, ensure_opset, replace_node, require_in_graph
from sq_onnx.passes.linears import Linear
from sq_onnx.quant.blockwise import BlockQuantized, quantize_blockwise
from sq_onnx.quant.gptq import DAMP, gptq_quantize


def _float_dtype(linear: Linear) -> np.dtype:
    dtype = linear.input.dtype
    if dtype == ir.DataType.FLOAT16:
        return np.dtype(np.float16)
    if dtype == ir.DataType.BFLOAT16:
        return ir.DataType.BFLOAT16.numpy()  # ml_dtypes.bfloat16: MatMulNBits takes bf16 scales with bf16 A
    return np.dtype(np.float32)


def quantize_weight(
    w: np.ndarray,
    bits: int,
    block_size: int,
    symmetric: bool,
    clip_search: bool = False,
    importance: np.ndarray | None = None,
    hessian: np.ndarray | None = None,
    act_order: bool = False,
    refine_rounds: int = 0,
    damp: float = DAMP,
    device: str | None = None,
) -> BlockQuantized:
    """A [K, N] float32 weight in MatMulNBits' layout: GPTQ's error feedback when the input's ``hessian``
    is given (its maths on the torch ``device`` when one is named), else per-block rounding (with the clip
    search weighted by ``importance``)."""
    if hessian is not None:
        return gptq_quantize(
            w,
            hessian,
            bits,
            block_size,
            symmetric,
            clip_search=clip_search,
            act_order=act_order,
            refine_rounds=refine_rounds,
            damp=damp,
            device=device,
        )
    return quantize_blockwise(w, bits, block_size, symmetric, clip_search=clip_search, importance=importance)


def replace_with_matmulnbits(
    graph: ir.Graph,
    linear: Linear,
    bits: int,
    block_size: int,
    symmetric: bool,
    accuracy_level: int,
    **options: Any,
) -> ir.Node:
    """Swap one linear for a MatMulNBits node computing the same Y from quantized weights; ``options``
    are ``quantize_weight``'s (clip search, importance, GPTQ's hessian, act order, refine rounds)."""
    w = linear.weight_kn().astype(np.float32)
    bq = quantize_weight(w, bits, block_size, symmetric, **options)
    return emit_matmulnbits(graph, linear, bq, accuracy_level)


def emit_matmulnbits(graph: ir.Graph, linear: Linear, bq: BlockQuantized, accuracy_level: int) -> ir.Node:
    """Replace ``linear`` by a MatMulNBits node holding ``bq`` (its [K, N] weight, already quantized)."""
    k, n = bq.k, bq.scales.shape[0]
    bits, block_size = bq.bits, bq.block_size
    dtype = _float_dtype(linear)
    base = linear.weight_name or linear.name
    inputs: list[ir.Value | None] = [
        linear.input,
        add_initializer(graph, f"{base}.q{bits}", bq.packed),
        add_initializer(graph, f"{base}.scales", bq.scales.astype(dtype)),
    ]
    zp = bq.packed_zero_points()
    inputs.append(add_initializer(graph, f"{base}.zero_points", zp) if zp is not None else None)
    bias = linear.bias_array()
    if bias is not None:
        inputs += [None, add_initializer(graph, f"{base}.bias", bias.astype(dtype))]
    while inputs and inputs[-1] is None:
        inputs.pop()
    old = linear.node
    node = ir.Node(
        MS,
        "MatMulNBits",
        inputs,
        attributes=[
            ir.AttrInt64("K", k),
            ir.AttrInt64("N", n),
            ir.AttrInt64("bits", bits),
            ir.AttrInt64("block_size", block_size),
            ir.AttrInt64("accuracy_level", accuracy_level),
        ],
        name=old.name,
    )
    replace_node(graph, old, [node], node.outputs[0])
    return node


@dataclass
class WeightBatch:
    """Linears that read the same tensor, quantized together (one Hessian, one GPTQ pass) to ``bits``."""

    linears: list[Linear]
    bits: int
    accuracy_level: int


Emit = Callable[[ir.Graph, Linear, BlockQuantized, int], ir.Node]


class QuantizeWeightsPass(ir.passes.InPlacePass):
    """Replace every batch's linears by MatMulNBits nodes (or what ``emit`` writes: blocked DequantizeLinear
    + MatMul for ``--format qdq``, ``passes.quantize_qdq.emit_blocked_dq``).

    ``quantize(batch, w)`` turns the batch's joined float32 [K, ΣN] weight (its linears' columns side by
    side, in order) into a ``BlockQuantized`` of the same shape; each linear gets its own columns back.
    Batches run in order, so a method may read the graph as the earlier batches left it (sequential GPTQ).
    Precondition (``requires``): every linear is a node of this graph, a batch's linears read one tensor
    and share K, and bits are 4 or 8. After the call, ``replaced`` names the replaced nodes in order.
    """

    def __init__(
        self,
        batches: list[WeightBatch],
        quantize: Callable[[WeightBatch, np.ndarray], BlockQuantized],
        progress: Callable[[Iterable[WeightBatch]], Iterable[WeightBatch]] = iter,
        emit: Emit = emit_matmulnbits,
    ):
        super().__init__()
        self.batches, self.quantize, self.progress, self.emit = batches, quantize, progress, emit
        self.replaced: list[str] = []

    def requires(self, model: ir.Model) -> None:
        require_in_graph(model, [linear for batch in self.batches for linear in batch.linears])
        for batch in self.batches:
            names = ", ".join(linear.name for linear in batch.linears)
            if len({id(linear.input) for linear in batch.linears}) != 1:
                raise ir.passes.PreconditionError(f"a batch must read one tensor: {names}")
            if len({linear.shape[0] for linear in batch.linears}) != 1 or batch.bits not in (4, 8):
                raise ir.passes.PreconditionError(f"a batch needs one K and 4 or 8 bits: {names}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.replaced = []
        if self.batches:
            ensure_opset(model, MS, 1)
        for batch in self.progress(self.batches):
            # float32 weights as they are (a view of the memory-mapped external data): no copy of a 1 GB lm_head
            weights = [np.asarray(linear.weight_kn(), np.float32) for linear in batch.linears]
            joined = weights[0] if len(weights) == 1 else np.concatenate(weights, axis=1)
            widths = [w.shape[1] for w in weights]
            bq = self.quantize(batch, joined)
            del weights, joined  # views of the memory maps, which release() can only drop once unused
            lo = 0
            for linear, width in zip(batch.linears, widths, strict=True):
                linear.release()  # before the node leaves the graph: its weight is read through it
                self.emit(model.graph, linear, bq.columns(lo, lo + width), batch.accuracy_level)
                self.replaced.append(linear.name)
                lo += width
        return ir.passes.PassResult(model, modified=bool(self.replaced))
