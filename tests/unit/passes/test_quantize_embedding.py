"""The token embedding as GatherBlockQuantized (passes/quantize_embedding.py): ORT's lookups land within half a
quantization step of the float rows, whatever the bits and block layout (a last partial block included);
Gathers that are not embeddings stay as they are."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from sq_onnx.passes import quantize_embedding
from sq_onnx.passes.quantize_embedding import QuantizeEmbeddingPass

VOCAB = 40


def _model(hidden: int, axis: int = 0, dtype=np.float32, seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    table = np.random.default_rng(seed).normal(0, 1, (VOCAB, hidden)).astype(dtype)
    table[3, :5] = [9.0, -7.0, 0.0, 0.0, 0.0]  # an outlier row
    tape = ir.tape.Tape()
    ids = ir.Value(name="ids", shape=ir.Shape(["b", "s"]), type=ir.TensorType(ir.DataType.INT64))
    data = tape.initializer(ir.tensor(table, name="table"), name="table")
    data.shape = ir.Shape(table.shape)
    out = tape.op("Gather", [data, ids], {"axis": axis})
    out.name, out.type = "y", ir.TensorType(ir.DataType.from_numpy(np.dtype(dtype)))
    graph = ir.Graph(
        [ids], [out], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 18}, name="g"
    )
    return ir.Model(graph, ir_version=10), table


def _run(model: ir.Model, ids: np.ndarray) -> np.ndarray:
    proto = ir.to_proto(model).SerializeToString()
    return ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]


def _half_steps(table: np.ndarray, bits: int, block: int) -> np.ndarray:
    """Half the asymmetric grid step of every element's block: (max - min) / (2^bits - 1) / 2, per row."""
    out = np.empty_like(table, dtype=np.float32)
    for lo in range(0, table.shape[1], block):
        part = table[:, lo : lo + block].astype(np.float32)
        span = np.maximum(part.max(axis=1), 0) - np.minimum(part.min(axis=1), 0)
        out[:, lo : lo + block] = (span / ((1 << bits) - 1) / 2)[:, None]
    return out


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize(
    "hidden,block", [(64, 32), (48, 32), (576, 128)], ids=["whole", "partial", "smollm2"]
)
def test_lookups_land_within_half_a_step_of_the_float_rows(bits, hidden, block):
    model, table = _model(hidden)
    ids = np.array([[0, 3, 39, 3, 17]], np.int64)
    embed = QuantizeEmbeddingPass(bits, block)
    assert embed(model).modified and embed.replaced
    (node,) = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
    assert "Gather" not in [n.op_type for n in model.graph]
    got = _run(model, ids)
    tolerance = _half_steps(table, bits, block)[ids] * 1.001 + 1e-6
    assert np.all(np.abs(got - table[ids]) <= tolerance)
    stored = node.inputs[0].const_value.numpy()
    assert stored.nbytes == VOCAB * hidden * bits // 8  # bytes per row: 1 or 1/2 per value


def test_float16_tables_give_float16_rows():
    model, table = _model(64, dtype=np.float16)
    QuantizeEmbeddingPass(8, 32)(model)
    got = _run(model, np.array([[1, 2]], np.int64))
    assert got.dtype == np.float16 and np.abs(got.astype(np.float32) - table[[[1, 2]]]).max() < 0.05


def test_gathers_that_are_not_embeddings_stay():
    model, _ = _model(64, axis=1)
    assert not QuantizeEmbeddingPass(8, 32)(model).modified
    assert [n.op_type for n in model.graph] == ["Gather"]


@pytest.mark.parametrize("bits", [8, 4])
def test_the_table_quantized_in_slices_of_rows_is_the_table_quantized_whole(bits, monkeypatch):
    """Rows are independent: slices (the last one short) must store exactly what one pass stores."""
    stored = []
    for rows in (VOCAB, 7):
        monkeypatch.setattr(quantize_embedding, "CHUNK_ROWS", rows)
        model, _ = _model(48)
        QuantizeEmbeddingPass(bits, 32)(model)
        (node,) = [n for n in model.graph if n.op_type == "GatherBlockQuantized"]
        stored.append([v.const_value.numpy() for v in (node.inputs[0], node.inputs[2], node.inputs[3])])
    for whole, sliced in zip(*stored, strict=True):
        np.testing.assert_array_equal(whole, sliced)


def test_quantized_weights_release_their_memory_maps(llama_dir, tmp_path):
    """A weight in external data is read through a memory map, and GPTQ reads it as a view (no copy of a 1 GB
    lm_head): once quantized, every such map must be closed, or a large model's float weights stay resident
    through verification."""
    from sq_onnx.passes.linears import find_linears
    from sq_onnx.quantize_model import quantize_graph
    from sq_onnx.recipe import Recipe

    path = tmp_path / "external.onnx"
    ir.save(
        ir.load(llama_dir / "model.onnx"), path, external_data="external.onnx.data", size_threshold_bytes=0
    )
    model = ir.load(path)
    tensors = [lin.source.const_value for lin in find_linears(model.graph)]
    assert tensors and all(isinstance(t, ir.ExternalTensor) for t in tensors)
    for t in tensors:
        t.numpy()  # mapped, as a pass reading it leaves it
    quantize_graph(model, Recipe(scheme="w4", gptq=False, block_size=32))
    assert [t.name for t in tensors if t.raw is not None] == []
