"""Smoothing is an exact rewrite: the float function is unchanged (relative error < 1e-5)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.calibration.calibrate import collect_absmax
from sq_onnx.passes.analyze import analyze
from sq_onnx.passes.graph_edit import corresponding_nodes
from sq_onnx.passes.smooth import SmoothPass, smooth_groups
from sq_onnx.quant.smoothing import smoothing_scales
from sq_onnx.runtime.model_io import copy_model

import ir_graphs
from conftest import ids_feed, rel_error, run


def _run_model(model: ir.Model, feed):
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def test_scale_formula():
    act = np.array([10.0, 1.0, 0.0, 4.0])
    w = np.array([1.0, 4.0, 2.0, 0.0])
    s = smoothing_scales(act, w, 0.5)
    np.testing.assert_allclose(s, [np.sqrt(10.0), 0.5, 1.0, 1.0], rtol=1e-6)
    assert np.all(smoothing_scales(np.array([1e-30]), np.array([1e10]), 0.5) >= 1e-5)


@pytest.mark.parametrize("kind", ir_graphs.NORM_KINDS)
@pytest.mark.parametrize("form", ["matmul", "gemm", "transposed"])
def test_smoothing_keeps_the_function(kind, form):
    model = ir_graphs.build_norm_graph(kind, gemm=form == "gemm", transposed_weight=form == "transposed")
    arrays = ir_graphs.sample_inputs(model)
    feeds = [{k: v[i] for k, v in arrays.items()} for i in range(4)]
    before = _run_model(model, feeds[0])
    result = analyze(model.graph)
    stats = collect_absmax(model, {g.name: g.channels for g in result.groups}, feeds, show_progress=False)
    group = result.groups[0]
    assert stats[group.name].max() > 10  # the outlier channels are really there
    smooth = SmoothPass(result.groups, stats, alpha=0.5)
    assert smooth(model).modified
    done = smooth.smoothed
    assert done[0].act_absmax_after < done[0].act_absmax_before / 3
    assert set(smooth.scales) == {g.name for g in result.groups}
    after = _run_model(model, feeds[0])
    assert rel_error(before, after) < 1e-5


def test_smooth_pass_refuses_missing_or_wrong_statistics():
    model = ir_graphs.build_norm_graph("LayerNormalization")
    group = analyze(model.graph).groups[0]
    good = np.ones(group.channels, np.float32)
    for stats in ({}, {group.name: good[:-1]}, {group.name: -good}, {group.name: good * np.nan}):
        with pytest.raises(ir.passes.PreconditionError):
            SmoothPass([group], stats, alpha=0.5)(model)
    with pytest.raises(ir.passes.PreconditionError):
        SmoothPass([group], {group.name: good}, alpha={"other": 0.5})(model)
    with pytest.raises(ir.passes.PreconditionError, match="not in this graph"):  # found on another graph
        SmoothPass([group], {group.name: good}, alpha=0.5)(ir_graphs.build_norm_graph("LayerNormalization"))
    assert SmoothPass([group], {group.name: good}, alpha={group.name: 0.5})(model).modified


def test_an_analysis_carries_over_to_a_copy():
    """Found once on the input, used on the smoothed copy: the carried groups and linears are the copy's own
    nodes, the same ones the analysis finds on the copy, and the copy smooths as the original would."""
    model = ir_graphs.build_norm_graph("LayerNormalization", gemm=True)
    analysis = analyze(model.graph)
    copy = copy_model(model)
    carried = analysis.carried_over(corresponding_nodes(model.graph, copy.graph))
    fresh = analyze(copy.graph)
    assert [lin.node for lin in carried.linears] == [lin.node for lin in fresh.linears]
    for a, b in zip(carried.groups, fresh.groups, strict=True):
        assert (a.producer, a.tensor, a.fold_into, a.consumers) == (
            b.producer,
            b.tensor,
            b.fold_into,
            b.consumers,
        )
    stats = {g.name: np.linspace(1, 50, g.channels).astype(np.float32) for g in analysis.groups}
    SmoothPass(carried.groups, stats, alpha=0.5)(copy)
    SmoothPass(analysis.groups, stats, alpha=0.5)(model)
    # a linear reads its weight through its node, so after smoothing it sees the new [K, N] weight
    for a, b in zip(carried.linears, analysis.linears, strict=True):
        assert not a.transposed and np.array_equal(a.weight_kn(), b.weight_kn())


@pytest.mark.parametrize("fixture", ["llama_dir", "llama_fused", "opt_dir", "llama_bias_dir"])
def test_smooth_scheme_on_exported_models(fixture, request, tmp_path, calib_ids):
    folder = request.getfixturevalue(fixture)
    out = tmp_path / "smooth.onnx"
    result = convert(folder / "model.onnx", out, Recipe(scheme="smooth", samples=4), calibration=calib_ids)
    assert result.smoothing_check["equivalent"]
    assert len(result.smoothed_groups) == 5
    feed = ids_feed()
    assert rel_error(run(folder / "model.onnx", feed), run(out, feed)) < 1e-5


def test_shared_constants_are_not_corrupted():
    """Exporters dedup identical tensors (all-ones γ of a fresh model): a fold must not touch other users."""
    model = ir_graphs.build_norm_graph("SimplifiedLayerNormalization")
    gamma = model.graph.initializers["gamma"]
    weight = model.graph.initializers["w0"]
    for value in (gamma, weight):
        node = ir.Node("", "Identity", [value])
        model.graph.append(node)
        node.outputs[0].name = f"{value.name}_copy"
        node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
        model.graph.outputs.append(node.outputs[0])
    arrays = ir_graphs.sample_inputs(model)
    feed = {k: v[0] for k, v in arrays.items()}
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    before = sess.run(None, feed)
    result = analyze(model.graph)
    stats = collect_absmax(model, {g.name: g.channels for g in result.groups}, [feed], show_progress=False)
    smooth_groups(model.graph, result.groups, stats, alpha=0.5)
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    after = sess.run(None, feed)
    assert rel_error(before[0], after[0]) < 1e-5
    np.testing.assert_array_equal(before[1], after[1])
    np.testing.assert_array_equal(before[2], after[2])


@pytest.mark.parametrize("fixture", ["llama_dir", "opt_dir", "llama_bias_dir"])
def test_linear_producer_folds_keep_the_function(fixture, request, tmp_path, calib_ids):
    """up_proj -> down_proj through the gated product (Llama), fc1 -> fc2 through the ReLU (OPT) and
    v_proj -> o_proj through attention (one scale per KV-head column, shared by the query heads that read
    it): 1/s in the producer's output columns (and bias) is exact, and the consumers' inputs lose their
    outliers."""
    folder = request.getfixturevalue(fixture)
    model = ir.load(folder / "model.onnx")
    through = analyze(model.graph, through_linears=True)
    plain = analyze(model.graph)
    folded = [g for g in through.groups if g.through_linear]
    assert len(folded) == 4 and len(plain.groups) == 5  # two per layer, on top of the norm groups
    assert {g.name for g in plain.groups} < {g.name for g in through.groups}
    pairs = {(g.fold_columns[0].module.split(".")[-1], g.consumers[0].module.split(".")[-1]) for g in folded}
    mlp = ("up_proj", "down_proj") if fixture != "opt_dir" else ("fc1", "fc2")
    attention = ("v_proj", "o_proj") if fixture != "opt_dir" else ("v_proj", "out_proj")
    assert pairs == {mlp, attention}
    for group in folded:
        if group.column_map is not None:  # 4 query heads of 16 read 2 KV heads: head h reads KV head h // 2
            head_dim = group.channels // 4
            expected = [(h // 2) * head_dim + d for h in range(4) for d in range(head_dim)]
            assert group.column_map.tolist() == (
                expected if fixture != "opt_dir" else list(range(group.channels))
            )
    out = tmp_path / "smooth.onnx"
    recipe = Recipe(scheme="smooth", samples=4, linear_folds="on")
    result = convert(folder / "model.onnx", out, recipe, calibration=calib_ids)
    assert result.smoothing_check["equivalent"] and len(result.smoothed_groups) == 9
    for record in result.smoothed_groups:
        if record["name"] in {g.name for g in folded}:
            assert record["act_absmax_after"] < record["act_absmax_before"]
    feed = ids_feed()
    assert rel_error(run(folder / "model.onnx", feed), run(out, feed)) < 1e-5


def test_value_fold_keeps_decoding_with_the_kv_cache(llama_kv, tmp_path, calib_ids):
    """With a KV cache the present values are V/s: the model's own cache, so each decode step's logits stay
    those of the float model."""
    _, folder = llama_kv
    out = tmp_path / "smooth.onnx"
    recipe = Recipe(scheme="smooth", samples=4, linear_folds="on")
    result = convert(folder / "model.onnx", out, recipe, calibration=calib_ids)
    assert sum("attention values" in g["kind"] for g in result.smoothed_groups) == 2
    steps = []
    for path in (folder / "model.onnx", out):
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        feed = ids_feed(seq=12)
        inputs = {i.name for i in sess.get_inputs()}
        if "position_ids" in inputs:
            feed["position_ids"] = np.arange(12, dtype=np.int64)[None]
        for i in sess.get_inputs():
            if i.name.startswith("past_key_values"):
                feed[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
        logits = []
        for _ in range(3):
            outs = dict(zip(names, sess.run(None, feed), strict=True))
            logits.append(outs["logits"][:, -1])
            nxt = outs["logits"][:, -1].argmax(-1)[:, None]
            mask = np.ones((1, feed["attention_mask"].shape[1] + 1), np.int64)
            feed = {"input_ids": nxt, "attention_mask": mask}
            feed.update(
                {k.replace("present.", "past_key_values."): v for k, v in outs.items() if "present" in k}
            )
            if "position_ids" in inputs:
                feed["position_ids"] = np.array([[mask.shape[1] - 1]], np.int64)
        steps.append(np.concatenate(logits))
    assert rel_error(steps[0], steps[1]) < 1e-5


def _fused_mlp(reader: str) -> ir.Model:
    """x -> fused gate/up linear [K, 2C] -> Split (or two Slices) -> act(gate) * up -> down [C, K]; ``reader``
    adds another reader of the fused output: "" none, "overlap" a Slice over columns of both halves, "whole" a
    graph output of the fused tensor."""
    rng = np.random.default_rng(0)
    k, c = 8, 6
    tape = ir.tape.Tape()
    x = ir.Value(name="x", shape=ir.Shape([1, 3, k]), type=ir.TensorType(ir.DataType.FLOAT))

    def init(name: str, a: np.ndarray) -> ir.Value:
        return tape.initializer(ir.tensor(a.astype(np.float32), name=name))

    def ints(name: str, v: list[int]) -> ir.Value:
        return tape.initializer(ir.tensor(np.array(v, np.int64), name=name))

    fused = tape.op("MatMul", [x, init("gate_up.weight", rng.normal(0, 1, (k, 2 * c)))])
    fused.shape = ir.Shape([1, 3, 2 * c])
    gate, up = tape.op_multi_out("Split", [fused], {"axis": 2, "num_outputs": 2}, num_outputs=2)
    product = tape.op("Mul", [tape.op("Mul", [gate, tape.op("Sigmoid", [gate])]), up])
    y = tape.op("MatMul", [product, init("down.weight", rng.normal(0, 1, (c, k)))])
    y.name, y.type = "y", ir.TensorType(ir.DataType.FLOAT)
    outputs = [y]
    if reader == "overlap":
        extra = tape.op("Slice", [fused, ints("lo", [c - 2]), ints("hi", [c + 2]), ints("ax", [2])])
        extra.name, extra.type = "extra", ir.TensorType(ir.DataType.FLOAT)
        outputs.append(extra)
    elif reader == "whole":
        fused.name, fused.type = "fused", ir.TensorType(ir.DataType.FLOAT)
        outputs.append(fused)
    graph = ir.Graph([x], outputs, nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 21})
    return ir.Model(graph, ir_version=10)


def test_a_fused_projection_absorbs_1_over_s_in_its_own_columns():
    """Phi-3's gate_up_proj: up is the second half of one linear's columns, so that half (and only it) takes
    1/s; gate's half is untouched (SiLU is not homogeneous) and the function stays the same."""
    model = _fused_mlp("")
    (group,) = [g for g in analyze(model.graph, through_linears=True).groups if g.through_linear]
    assert group.column_map.tolist() == list(range(6, 12))
    x = np.random.default_rng(1).normal(0, 1, (1, 3, 8)) * [1, 1, 30, 1, 1, 1, 1, 1]  # an outlier channel
    feed = {"x": x.astype(np.float32)}
    before = _run_model(model, feed)
    stats = collect_absmax(model, {group.name: group.channels}, [feed], show_progress=False)
    smooth_groups(model.graph, [group], stats, alpha=0.5)
    assert rel_error(before, _run_model(model, feed)) < 1e-5
    weight = group.fold_columns[0].weight_as_now()()
    original = _fused_mlp("").graph.initializers["gate_up.weight"].const_value.numpy()
    np.testing.assert_array_equal(weight[:, :6], original[:, :6])  # gate's columns as they were
    assert not np.array_equal(weight[:, 6:], original[:, 6:])


@pytest.mark.parametrize("reader", ["overlap", "whole"])
def test_a_fused_projection_read_elsewhere_is_not_folded(reader):
    model = _fused_mlp(reader)
    assert not [g for g in analyze(model.graph, through_linears=True).groups if g.through_linear]


def _gqa(packed: bool, attributes: dict | None = None) -> ir.Model:
    """x -> q, k, v projections (or one packed qkv_proj, as onnxruntime-genai's builder writes it) ->
    com.microsoft::GroupQueryAttention (4 query heads on 2 KV heads of 8 channels, with a past cache) -> o_proj."""
    rng = np.random.default_rng(0)
    k, heads, kv_heads, d, seq = 8, 4, 2, 8, 3
    tape = ir.tape.Tape()
    f32 = ir.TensorType(ir.DataType.FLOAT)
    x = ir.Value(name="x", shape=ir.Shape([1, seq, k]), type=f32)
    past = [ir.Value(name=n, shape=ir.Shape([1, kv_heads, 2, d]), type=f32) for n in ("past_k", "past_v")]

    def init(name: str, a: np.ndarray) -> ir.Value:
        return tape.initializer(ir.tensor(a, name=name))

    def linear(name: str, columns: int) -> ir.Value:
        out = tape.op(
            "MatMul", [x, init(f"{name}.weight", rng.normal(0, 1, (k, columns)).astype(np.float32))]
        )
        out.shape = ir.Shape([1, seq, columns])
        return out

    widths = {"q": heads * d, "k": kv_heads * d, "v": kv_heads * d}
    qkv = (
        [linear("qkv_proj", sum(widths.values())), None, None]
        if packed
        else [linear(n, w) for n, w in widths.items()]
    )
    lengths = [
        init("seqlens_k", np.array([seq + 2 - 1], np.int32)),
        init("total", np.array(seq + 2, np.int32)),
    ]
    attrs = {"num_heads": heads, "kv_num_heads": kv_heads, **(attributes or {})}
    attention, *present = tape.op_multi_out(
        "GroupQueryAttention", [*qkv, *past, *lengths], attrs, domain="com.microsoft", num_outputs=3
    )
    attention.shape = ir.Shape([1, seq, heads * d])
    y = tape.op(
        "MatMul", [attention, init("o_proj.weight", rng.normal(0, 1, (heads * d, k)).astype(np.float32))]
    )
    for value, name in zip([y, *present], ["y", "present_k", "present_v"], strict=True):
        value.name, value.type = name, f32
    graph = ir.Graph(
        [x, *past], [y, *present], nodes=tape.nodes, initializers=tape.initializers,
        opset_imports={"": 21, "com.microsoft": 1},
    )  # fmt: skip
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("packed", [False, True], ids=["separate", "packed"])
def test_grouped_query_attention_values_absorb_1_over_s_per_kv_head(packed):
    """o_proj's input channel h*D + d reads V's column (h // 2)*D + d: one scale per V column, shared by the
    query heads on that KV head; with the packed qkv_proj V's columns come after q's 32 and k's 16."""
    model = _gqa(packed)
    (group,) = [g for g in analyze(model.graph, through_linears=True).groups if g.through_linear]
    start = 48 if packed else 0
    assert group.column_map.tolist() == [start + (h // 2) * 8 + d for h in range(4) for d in range(8)]
    rng = np.random.default_rng(1)
    feed = {
        "x": (rng.normal(0, 1, (1, 3, 8)) * [1, 1, 30, 1, 1, 1, 1, 1]).astype(np.float32),
        "past_k": rng.normal(0, 1, (1, 2, 2, 8)).astype(np.float32),
        "past_v": (rng.normal(0, 1, (1, 2, 2, 8)) * 20).astype(np.float32),
    }
    before = _run_model(model, feed)
    original = group.fold_columns[0].weight_as_now()()
    stats = collect_absmax(model, {group.name: group.channels}, [feed], show_progress=False)
    smooth_groups(model.graph, [group], stats, alpha=0.5)
    scaled = group.fold_columns[0].weight_as_now()()
    s = original[0] / scaled[0]  # s per producer column (1 on q's and k's)
    np.testing.assert_allclose(s[:start], 1.0)
    assert np.ptp(s[start : start + 16]) > 0.1  # the outlier channel moved something
    # the past values are the smoothed model's own present values: V / s
    past_v = feed["past_v"] / s[start : start + 16].reshape(2, 1, 8)
    assert rel_error(before, _run_model(model, {**feed, "past_v": past_v.astype(np.float32)})) < 1e-5


@pytest.mark.parametrize("attributes", [{"v_quant_type": "PER_TENSOR"}, {"a_later_attribute": 1}])
def test_grouped_query_attention_with_a_quantized_or_unknown_value_path_is_not_folded(attributes):
    model = _gqa(packed=True, attributes=attributes)
    assert not [g for g in analyze(model.graph, through_linears=True).groups if g.through_linear]


def test_smoothing_a_tied_lm_head_leaves_no_transpose_behind(llama_dir):
    """The lm_head reads the tied embedding through a Transpose; smoothed, it reads its own [K, N] weight, and
    the Transpose goes with its last reader: sessions on large models do not fold constants, and ORT would
    transpose the whole table on every run for nothing."""
    from sq_onnx.passes.linears import find_linears, is_lm_head

    model = ir.load(llama_dir / "model.onnx")
    (head,) = [lin for lin in find_linears(model.graph) if is_lm_head(lin, model.graph)]
    before = head.node.inputs[1].producer()
    assert before is not None and before.op_type == "Transpose"
    analysis = analyze(model.graph)
    stats = {g.name: np.linspace(1, 50, g.channels).astype(np.float32) for g in analysis.groups}
    SmoothPass(analysis.groups, stats, alpha=0.5)(model)
    assert head.node.inputs[1].producer() is None
    dead = [n.op_type for n in model.graph if not any(o.uses() or o.is_graph_output() for o in n.outputs)]
    assert dead == []
    assert before.graph is None


def test_a_weight_read_transposed_is_smoothed_without_a_second_copy(monkeypatch):
    """A linear that reads its weight through a Transpose (a tied lm_head reads the embedding so) gets a
    smoothed weight computed row-major at once: it is held once while the lazy initializer is read, not as a
    column-major product plus its row-major copy (1 GB each at Llama-3.2-1B's lm_head)."""
    import tracemalloc

    monkeypatch.setattr(ir_graphs, "N", 32768)  # a [C, 32768] float32 weight, 8 MB: fixed costs do not count
    model = ir_graphs.build_norm_graph("SimplifiedLayerNormalization", consumers=1, transposed_weight=True)
    analysis = analyze(model.graph)
    stats = {g.name: np.linspace(1, 50, g.channels).astype(np.float32) for g in analysis.groups}
    SmoothPass(analysis.groups, stats, alpha=0.5)(model)
    (linear,) = analysis.groups[0].consumers
    tensor = linear.node.inputs[1].const_value
    tracemalloc.start()
    weight = tensor.numpy()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert weight.shape[1] == 32768 and weight.flags["C_CONTIGUOUS"]
    assert peak < 1.3 * weight.nbytes
