"""``sq_onnx::MaskedAttention`` (custom_ops/src/cpu_attention.h) against what it replaces: ONNX Runtime running
MatMul(Q, Kᵀ) -> Mul(scale) -> Add(mask) -> Softmax -> MatMul(·, V) on the same inputs (K and V repeated per
query head for grouped queries), to float rounding, on every instruction set this machine has; the query lengths
of both of its paths (rows one at a time below 16, tiles from 16), head sizes and key counts that fill no vector,
causal masks with left padding, fully masked rows, masks broadcast over batch, heads or queries. Then the pass
that writes it into an exported model, and a W4 ``--kernels sq_onnx`` conversion.

Without the library these tests skip, except where SQ_ONNX_REQUIRE_OPS=1 (tools/dev.sh test, CI)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import ort_ops
import pytest
from onnx import TensorProto, helper

from sq_onnx import Recipe, convert
from sq_onnx.lm.lm_runner import LMRunner
from sq_onnx.passes.fuse_masked_attention import FuseMaskedAttentionPass
from sq_onnx.runtime.model_inputs import input_specs
from sq_onnx.runtime.model_io import load_model
from sq_onnx.runtime.ort_session import session, session_options

from conftest import op_types, rel_error

ort_ops.skip_module_without_library()

MIN = np.finfo(np.float32).min  # what transformers' masks hold where a key is hidden


def _run(model, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    sess = ort.InferenceSession(
        proto.SerializeToString(), session_options(2, custom_ops=True), providers=["CPUExecutionProvider"]
    )
    return sess.run(None, feed)[0]


def _graph(fused: bool, scale: float, masked: bool):
    names = ["q", "k", "v"] + (["mask"] if masked else [])
    inputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if fused:
        nodes = [helper.make_node("MaskedAttention", names, ["y"], domain="sq_onnx", scale=scale)]
        inits = []
    else:
        nodes = [
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q", "kt"], ["s"]),
            helper.make_node("Mul", ["s", "c"], ["scaled"]),
            *([helper.make_node("Add", ["scaled", "mask"], ["logits"])] if masked else []),
            helper.make_node("Softmax", ["logits" if masked else "scaled"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "v"], ["y"]),
        ]
        inits = [helper.make_tensor("c", TensorProto.FLOAT, [], [scale])]
    graph = helper.make_graph(nodes, "attention", inputs, [output], initializer=inits)
    opsets = [helper.make_opsetid("", 17)] + ([helper.make_opsetid("sq_onnx", 1)] if fused else [])
    return helper.make_model(graph, opset_imports=opsets, ir_version=10)


def _causal(batch: int, queries: int, keys: int, left_pad: int) -> np.ndarray:
    """[batch, 1, queries, keys]: the queries are the last ones; batch row 0 has `left_pad` padding keys."""
    i = np.arange(queries)[:, None] + keys - queries
    mask = np.where(np.arange(keys)[None] > i, MIN, 0.0).astype(np.float32)
    mask = np.broadcast_to(mask, (batch, 1, queries, keys)).copy()
    mask[0, :, :, :left_pad] = MIN
    return mask


CASES = [  # batch, heads, kv heads, queries, keys, head size, left padding
    (1, 4, 4, 64, 64, 64, 0),  # a prefill: tiles, every key count a whole vector
    (2, 4, 2, 37, 50, 40, 3),  # tiles with a partial one, grouped queries, head size no vector fills
    (1, 3, 1, 1, 70, 64, 0),  # decode: one row, three query heads on one kv head
    (2, 6, 3, 5, 9, 24, 2),  # short queries with padding
    (1, 2, 1, 20, 130, 80, 0),  # tiles past the cache: 110 earlier keys
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_equals_the_ops_it_replaces(case, isa):
    b, heads, kv_heads, s, t, d, pad = case
    rng = np.random.default_rng(s * 31 + t)
    q = rng.normal(0, 1, (b, heads, s, d)).astype(np.float32)
    k = rng.normal(0, 1, (b, kv_heads, t, d)).astype(np.float32)
    v = rng.normal(0, 1, (b, kv_heads, t, d)).astype(np.float32)
    mask, scale = _causal(b, s, t, pad), d**-0.5
    rep = heads // kv_heads
    expected = _run(
        _graph(False, scale, True),
        {"q": q, "k": np.repeat(k, rep, 1), "v": np.repeat(v, rep, 1), "mask": mask},
    )
    out = _run(_graph(True, scale, True), {"q": q, "k": k, "v": v, "mask": mask})
    assert out.shape == expected.shape
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()


@pytest.mark.parametrize("queries", [3, 24])
@pytest.mark.parametrize("mask_shape", ["none", "T", "S,T", "1,1,T", "2,1,1,T", "3,S,T", "2,3,S,T"])
def test_masks_broadcast_as_add_does(queries, mask_shape):
    """No mask, and masks of rank 1 to 4 broadcast over batch (2), heads (3) or queries (S); hidden keys anywhere
    (not only at the end); a query row whose keys are all hidden (Softmax then spreads it evenly, and so must
    the op)."""
    b, heads, t, d = 2, 3, 24, 16
    rng = np.random.default_rng(queries)
    q, k, v = (rng.normal(0, 1, (b, heads, n, d)).astype(np.float32) for n in (queries, t, t))
    feed = {"q": q, "k": k, "v": v}
    if mask_shape != "none":
        shape = tuple(int(x) for x in mask_shape.replace("S", str(queries)).replace("T", str(t)).split(","))
        mask = np.where(rng.random(shape) < 0.4, MIN, rng.normal(0, 1, shape)).astype(np.float32)
        mask[..., -5:] = MIN  # the skipped tail
        mask.reshape(-1, t)[0] = MIN  # one row (or every row it broadcasts to) all hidden
        feed["mask"] = mask
    masked = mask_shape != "none"
    expected = _run(_graph(False, 0.25, masked), feed)
    out = _run(_graph(True, 0.25, masked), feed)
    assert np.abs(out - expected).max() <= 1e-5 * np.abs(expected).max()


def test_bad_inputs_are_clear_errors():
    q = np.zeros((1, 3, 4, 8), np.float32)
    kv = np.zeros((1, 2, 5, 8), np.float32)
    with pytest.raises(Exception, match="multiple of K's"):
        _run(_graph(True, 1.0, False), {"q": q, "k": kv, "v": kv})
    kv = np.zeros((1, 3, 5, 8), np.float32)
    with pytest.raises(Exception, match="last dimension must be K's sequence length"):
        _run(_graph(True, 1.0, True), {"q": q, "k": kv, "v": kv, "mask": np.zeros((1, 1, 4, 4), np.float32)})
    with pytest.raises(Exception, match="must broadcast"):
        _run(_graph(True, 1.0, True), {"q": q, "k": kv, "v": kv, "mask": np.zeros((1, 2, 4, 5), np.float32)})


def _logits_through_the_cache(path, ids: np.ndarray, steps: int) -> np.ndarray:
    """Prefill ``ids``, then ``steps`` greedy tokens through the KV cache: every step's logits."""
    runner = LMRunner(session(path), input_specs(load_model(path)))
    logits = [runner.prefill(ids)]
    for _ in range(steps):
        logits.append(runner.step(int(logits[-1].argmax())))
    return np.stack(logits)


def test_pass_fuses_every_layer_and_decodes_as_before(llama_kv, tmp_path):
    """The exported tiny Llama (2 layers, grouped queries, KV cache): both attentions fused, reading the cache
    itself (repeat_kv's copies gone), and prefill then decode give the same logits to float rounding."""
    _, folder = llama_kv
    model = ir.load(folder / "model.onnx")
    expands = [n.op_type for n in model.graph].count("Expand")
    fuse = FuseMaskedAttentionPass()
    fuse(model)
    assert fuse.fused == 2
    ops = [n.op_type for n in model.graph]
    assert ops.count("MaskedAttention") == 2 and "Softmax" not in ops
    assert ops.count("Expand") == expands - 4  # repeat_kv of K and V in each layer
    for node in model.graph:
        if node.op_type == "MaskedAttention":
            assert {v.name for v in node.inputs[1:3]} <= {o.name for o in model.graph.outputs}  # present.*
    ir.save(model, tmp_path / "fused.onnx")
    ids = np.random.default_rng(0).integers(0, 100, (1, 20), dtype=np.int64)
    before = _logits_through_the_cache(folder / "model.onnx", ids, 6)
    after = _logits_through_the_cache(tmp_path / "fused.onnx", ids, 6)
    assert rel_error(before, after) < 1e-5


def test_pass_leaves_attention_whose_weights_are_read():
    """An attention whose probabilities are also a graph output (output_attentions) stays as it is."""
    proto = _graph(False, 0.5, True)
    proto.graph.output.append(helper.make_tensor_value_info("p", TensorProto.FLOAT, None))
    model = ir.from_proto(proto)
    for value in model.graph.inputs:  # the rule wants 4-D float32 Q, K, V
        value.shape, value.dtype = ir.Shape(["b", 2, "s", 8]), ir.DataType.FLOAT
    fuse = FuseMaskedAttentionPass()
    fuse(model)
    assert fuse.fused == 0 and "Softmax" in [n.op_type for n in model.graph]
    model.graph.outputs.pop()
    fuse(model)
    assert fuse.fused == 1


def test_w4_kernel_conversion_fuses_attention(llama_dir, tmp_path, calib_ids):
    out = tmp_path / "w4.onnx"
    recipe = Recipe(scheme="w4", accuracy_level="4", samples=4, gptq_samples=4, kernels="sq_onnx")
    result = convert(llama_dir / "model.onnx", out, recipe, calibration=calib_ids)
    ops = op_types(out)
    assert result.masked_attention == ops.count("MaskedAttention") > 0 and "Softmax" not in ops
