"""Block quantization matches ORT's MatMulNBits on many shapes (the packing is what ORT reads)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from sq_onnx.quant import blockwise
from sq_onnx.quant.blockwise import quantize_blockwise
from sq_onnx.quant.int8 import fake_blockwise


def _matmulnbits_model(
    k: int, n: int, bits: int, block: int, symmetric: bool, w: np.ndarray, bq=None, accuracy_level: int = 0
):
    bq = bq if bq is not None else quantize_blockwise(w, bits, block, symmetric)
    tape = ir.tape.Tape()
    x = ir.Value(name="X", shape=ir.Shape(["m", k]), type=ir.TensorType(ir.DataType.FLOAT))
    inputs = [
        x,
        tape.initializer(ir.tensor(bq.packed, name="B")),
        tape.initializer(ir.tensor(bq.scales, name="S")),
    ]
    zp = bq.packed_zero_points()
    if zp is not None:
        inputs.append(tape.initializer(ir.tensor(zp, name="Z")))
    y = tape.op(
        "MatMulNBits",
        inputs,
        {"K": k, "N": n, "bits": bits, "block_size": block, "accuracy_level": accuracy_level},
        domain="com.microsoft",
    )
    y.name, y.type = "Y", ir.TensorType(ir.DataType.FLOAT)
    graph = ir.Graph(
        [x], [y], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 18, "com.microsoft": 1}
    )
    return ir.Model(graph, ir_version=10), bq


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(
    ("k", "n", "block"), [(64, 8, 32), (100, 7, 32), (256, 33, 128), (17, 3, 16), (384, 16, 128)]
)
def test_matmulnbits_matches_numpy_dequantization(bits, symmetric, k, n, block):
    rng = np.random.default_rng(k * n + bits)
    w = rng.normal(0, 0.5, (k, n)).astype(np.float32)
    w[rng.integers(0, k)] += 5.0  # an outlier row
    model, bq = _matmulnbits_model(k, n, bits, block, symmetric, w)
    x = rng.normal(0, 1, (5, k)).astype(np.float32)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"X": x})[0]
    deq = bq.dequantize()
    np.testing.assert_allclose(y, x @ deq, rtol=1e-4, atol=1e-4)
    # round-to-nearest: within half a step; symmetric clips the far side of [-2^(b-1), 2^(b-1)-1] by <= 1 step
    step = np.repeat(np.abs(bq.scales), block, axis=1)[:, :k].T
    bound = 1.0 if symmetric else 0.5
    assert np.all(np.abs(deq - w) <= step * bound + 1e-5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize(("k", "block"), [(256, 32), (576, 128), (200, 64), (96, 16)])
def test_level4_multiplies_the_blockwise_int8_activations(bits, k, block):
    """At accuracy_level 4 ORT's CPU kernel rounds A to int8 per block of K (what GPTQ can then fit to)."""
    rng = np.random.default_rng(k + block + bits)
    w = rng.normal(0, 0.5, (k, 24)).astype(np.float32)
    model, bq = _matmulnbits_model(k, 24, bits, block, False, w, accuracy_level=4)
    x = rng.normal(0, 1, (9, k)).astype(np.float32)
    x[:, 3] *= 40.0  # an outlier channel: its blocks round coarsely
    x[2, :] = 0.0  # all-zero blocks stay zero
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"X": x})[0]
    deq = bq.dequantize()
    modelled = np.abs(y - fake_blockwise(x, block) @ deq).max()
    unrounded = np.abs(y - x @ deq).max()
    assert modelled < 2e-3 * np.abs(y).max()
    assert modelled < unrounded / 20


def test_all_zero_block_is_exact():
    w = np.zeros((32, 4), np.float32)
    bq = quantize_blockwise(w, 4, 32, symmetric=False)
    np.testing.assert_array_equal(bq.dequantize(), w)


@pytest.mark.parametrize("symmetric", [False, True])
def test_clip_search_never_worse_than_rtn_on_weighted_error(symmetric):
    rng = np.random.default_rng(1)
    w = rng.standard_t(3, (256, 16)).astype(np.float32)  # heavy tails: clipping pays
    importance = rng.uniform(0.1, 10.0, 256).astype(np.float32)

    def weighted_error(bq):
        return float((((bq.dequantize() - w) ** 2) * importance[:, None]).sum())

    rtn = weighted_error(quantize_blockwise(w, 4, 64, symmetric))
    clipped = quantize_blockwise(w, 4, 64, symmetric, clip_search=True, importance=importance)
    assert weighted_error(clipped) < 0.95 * rtn
    # ORT computes exactly with the searched scales and zero points
    model, _ = _matmulnbits_model(256, 16, 4, 64, symmetric, w, bq=clipped)
    x = rng.normal(0, 1, (3, 256)).astype(np.float32)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(sess.run(None, {"X": x})[0], x @ clipped.dequantize(), rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("symmetric", [False, True])
def test_columns_quantized_in_slices_give_the_same_codes(monkeypatch, symmetric):
    """A 128K-wide lm_head is quantized a slice of columns at a time; the codes cannot depend on the slicing."""
    rng = np.random.default_rng(2)
    w = rng.standard_t(3, (200, 37)).astype(np.float32)  # K not a multiple of the block, N not of the slice
    importance = rng.uniform(0.1, 10.0, 200).astype(np.float32)
    whole = quantize_blockwise(w, 4, 64, symmetric, clip_search=True, importance=importance)
    monkeypatch.setattr(blockwise, "SLICE_BYTES", 4 * 4 * 256)  # 4 columns of 4 padded blocks at a time
    sliced = quantize_blockwise(w, 4, 64, symmetric, clip_search=True, importance=importance)
    np.testing.assert_array_equal(sliced.packed, whole.packed)
    np.testing.assert_array_equal(sliced.scales, whole.scales)
    np.testing.assert_array_equal(sliced.packed_zero_points(), whole.packed_zero_points())


def test_a_wide_weight_is_quantized_in_bounded_memory(monkeypatch):
    """The clip search's float working copies are a few slices, not a few copies of the whole weight."""
    monkeypatch.setattr(blockwise, "SLICE_BYTES", 1 << 20)
    w = np.random.default_rng(3).normal(0, 1, (256, 8192)).astype(np.float32)  # 8 MB
    tracemalloc.start()
    quantize_blockwise(w, 8, 128, False, clip_search=True)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    codes = w.size  # uint8 codes, and as many again packed
    assert peak < 2 * codes + 8 * (1 << 20), f"{peak / 2**20:.1f} MB"
