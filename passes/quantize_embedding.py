"""The token embedding as ``com.microsoft::GatherBlockQuantized``: the float table is often the largest tensor
of a 4-bit model (SmolLM2's float32 table is 113 MB of its 212), and a lookup reads one row per token, so
8-bit (or 4-bit) rows cost nothing measurable in speed and little in accuracy.

Each row is quantized in blocks of ``block_size`` along the hidden axis with an asymmetric grid (the same
``quantize_blockwise`` as the linears, the table read as [H, V]), so the data is uint8 [V, H] (8-bit) or two
codes per byte [V, H / 2] (4-bit, low nibble first), with scales and zero points [V, ceil(H / block_size)].
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.graph_edit import MS, add_initializer, ensure_opset, replace_node
from sq_onnx.passes.linears import _attr_int, constant_array, is_constant, release_weight
from sq_onnx.quant.blockwise import pack_nibbles, quantize_blockwise

FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
# Rows of the table quantized at once: each row's blocks are its own, so slices give the same codes, while the
# float32 working copies stay small. Whole, Llama 3's 128K x 2048 table took 4 GB of them (a transposed copy,
# the padded blocks, the divided blocks), the peak of a 1B-class conversion (tools/trace_gptq.py --tracemalloc).
CHUNK_ROWS = 8192


def embedding_gathers(graph: ir.Graph) -> list[ir.Node]:
    """Gathers of rows (axis 0) from a constant 2-D float table by integer ids: token embeddings."""
    found = []
    for node in graph:
        if node.op_type != "Gather" or node.domain != "" or _attr_int(node, "axis", 0) != 0:
            continue
        table = node.inputs[0]
        if table is None or not is_constant(table) or table.dtype not in FLOATS:
            continue
        if table.shape is not None and table.shape.rank() == 2:
            found.append(node)
    return found


class QuantizeEmbeddingPass(ir.passes.InPlacePass):
    """Replace each embedding Gather by GatherBlockQuantized with ``bits`` (4 or 8) in blocks of ``block_size``.

    Precondition (``requires``): bits is 4 or 8, the block size a power of two >= 16 (a row's last block may
    be partial, as the op allows). After the call, ``replaced`` names the replaced Gathers."""

    def __init__(self, bits: int = 8, block_size: int = 128):
        super().__init__()
        self.bits, self.block_size = bits, block_size
        self.replaced: list[str] = []

    def requires(self, model: ir.Model) -> None:
        if self.bits not in (4, 8) or self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ir.passes.PreconditionError(f"{self.bits}-bit blocks of {self.block_size}: not supported")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.replaced = []
        for node in embedding_gathers(model.graph):
            self._replace(model.graph, node)
        if self.replaced:
            ensure_opset(model, MS, 1)
        return ir.passes.PassResult(model, modified=bool(self.replaced))

    def _replace(self, graph: ir.Graph, node: ir.Node) -> None:
        table = node.inputs[0]
        rows = constant_array(table)
        assert rows is not None
        vocab, hidden = rows.shape
        parts = [self._rows(rows[lo : lo + CHUNK_ROWS]) for lo in range(0, vocab, CHUNK_ROWS)]
        data, scales, zero = (np.concatenate([part[i] for part in parts]) for i in range(3))
        scale_type = rows.dtype if rows.dtype != np.float64 else np.float32
        del rows, parts
        release_weight(table)  # its memory map, now read: a later reader (a float lm_head) maps it again
        base = table.name or node.name or "embedding"
        gather = ir.Node(
            MS,
            "GatherBlockQuantized",
            [
                add_initializer(graph, f"{base}.q{self.bits}", np.ascontiguousarray(data)),
                node.inputs[1],
                add_initializer(graph, f"{base}.scales", scales.astype(scale_type)),
                add_initializer(graph, f"{base}.zero_points", np.ascontiguousarray(zero)),
            ],
            attributes=[
                ir.AttrInt64("gather_axis", 0),
                ir.AttrInt64("quantize_axis", 1),
                ir.AttrInt64("block_size", self.block_size),
                ir.AttrInt64("bits", self.bits),
            ],
            name=node.name,
        )
        replace_node(graph, node, [gather], gather.outputs[0])
        self.replaced.append(node.name or "")

    def _rows(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Data, scales and zero points of a slice of the table's rows, laid out as GatherBlockQuantized
        reads them."""
        count, hidden = rows.shape
        bq = quantize_blockwise(rows.T.astype(np.float32), self.bits, self.block_size, False)
        codes = bq.q.reshape(count, -1)[:, :hidden].astype(np.uint8)  # a last block may be partial
        if self.bits == 8:
            return codes, bq.scales, bq.zero_points.astype(np.uint8)
        return pack_nibbles(codes), bq.scales, bq.packed_zero_points().reshape(count, -1)
