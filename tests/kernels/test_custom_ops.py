"""The sq_onnx custom ops on the CPU, through ONNX Runtime: integer outputs bit-exact against the numpy
reference (tests/kernel_reference.py) on many shapes, clean errors on bad shapes, and ``--kernels sq_onnx``
conversions that agree with the stock-op form of the same model.

Without the library these tests skip, except where SQ_ONNX_REQUIRE_OPS=1 (set by tools/dev.sh test and so
by CI), where a missing library is a failure: the build must have produced it."""

from __future__ import annotations

import ctypes
import os
import subprocess
import sys

import kernel_reference as ref
import numpy as np
import onnx_ir as ir
import ort_ops
import pytest
from onnx import TensorProto

from sq_onnx import Recipe, convert
from sq_onnx.runtime import custom_ops
from sq_onnx.runtime.ort_session import session

import ir_graphs
from conftest import ids_feed, op_types, rel_error

ort_ops.skip_module_without_library()

# Forcing an instruction set and asking how the GEMM took W need the library's test entry points, which
# tools/dev.sh builds in (SQ_ONNX_TEST_HOOKS=ON); a user's build has none, and those tests skip there.
HOOKS = custom_ops.has_test_hooks()
if os.environ.get("SQ_ONNX_REQUIRE_OPS") == "1" and not HOOKS:
    raise RuntimeError("SQ_ONNX_REQUIRE_OPS=1 but the library was built without SQ_ONNX_TEST_HOOKS=ON")
needs_hooks = pytest.mark.skipif(
    not HOOKS, reason="library built without its test entry points (SQ_ONNX_TEST_HOOKS)"
)

ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


_run_op = ort_ops.run_op  # one sq_onnx node on the CPU; None inputs are left out


GEMM_SHAPES = [
    (0, 8, 16),
    (1, 1, 1),
    (1, 64, 576),
    (3, 5, 7),
    (4, 2, 16),
    (5, 9, 33),
    (17, 130, 100),
    (65, 67, 1040),
    (2, 3, 32),
    (1, 9, 95),
    (6, 70, 529),
    (1, 71, 529),
    (128, 64, 48),
    (48, 520, 67),  # from 48 rows W is packed a block of 64 columns at a time: 9 blocks, odd K
    (100, 600, 36),
    (255, 130, 575),  # the most rows prepacked W serves
    (256, 33, 7),  # from 256 rows the VNNI paths repack W: K and N not whole groups or panels
    (270, 130, 575),
]


@pytest.fixture
def cpu_isa(isa):
    """``isa`` (tests/conftest.py) as its index in CPU_ISAS, as the GEMM's entry points take it."""
    return custom_ops.CPU_ISAS.index(isa)


@needs_hooks
@pytest.mark.parametrize("asked", ["scalar", "avx2", "no-such-isa"])
def test_cpu_isa_comes_from_the_environment(asked):
    """SQ_ONNX_CPU_ISA holds the GEMM to a path this CPU has; anything else leaves the best (read once, so in a
    fresh process)."""
    code = (
        "from sq_onnx.runtime import custom_ops; l = custom_ops.cpu_isa_control(); "
        "print(l.sq_onnx_cpu_isa(), l.sq_onnx_cpu_best_isa(), l.sq_onnx_cpu_select_isa(1))"
    )
    env = {**os.environ, "SQ_ONNX_CPU_ISA": asked}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    now, best, avx2_missing = map(int, out.stdout.split())
    if asked in custom_ops.CPU_ISAS and not (asked == "avx2" and avx2_missing):
        assert now == custom_ops.CPU_ISAS.index(asked)
    else:
        assert now == best


VNNI = {custom_ops.CPU_ISAS.index("avxvnni"), custom_ops.CPU_ISAS.index("avx512vnni")}
# vnni::kBlockPackMinRows and kPackedMinRows: from 48 rows the VNNI paths pack W within the call, a block of
# columns at a time, from 256 all of it at once; prepacked W (opt-in) serves 2..255 rows.
BLOCK_PACK_MIN_ROWS, PACKED_MIN_ROWS = 48, 256


def expected_weights_path(m: int, w_is_constant: bool, isa: int) -> int:
    """How the GEMM should take W (custom_ops.WEIGHTS_*) with SQ_ONNX_CPU_PREPACK=1."""
    if isa not in VNNI:
        return custom_ops.WEIGHTS_AS_GIVEN
    if w_is_constant and 1 < m < PACKED_MIN_ROWS:
        return custom_ops.WEIGHTS_PREPACKED
    if m >= PACKED_MIN_ROWS:
        return custom_ops.WEIGHTS_REPACKED
    if m >= BLOCK_PACK_MIN_ROWS:
        return custom_ops.WEIGHTS_PACKED_BY_BLOCK
    return custom_ops.WEIGHTS_AS_GIVEN


# Wq as a graph input (read as given, or repacked in the call for many rows), or as an initializer (as in a
# converted model) with SQ_ONNX_CPU_PREPACK=1: on VNNI, packed once when the session is made.
W_SOURCES = {"W input": frozenset(), "W prepacked": frozenset({"wq"})}


@pytest.fixture
def prepack_constants(monkeypatch):
    """Opts in to prepacking (read when a session is made); returns the check that the GEMM took W the way
    it should have, so no path passes these tests by never running."""
    monkeypatch.setenv("SQ_ONNX_CPU_PREPACK", "1")

    def check(m: int, constants: frozenset[str], isa: int) -> None:
        if m > 0 and HOOKS:  # without the test entry points the path taken cannot be asked
            taken = custom_ops.cpu_isa_control().sq_onnx_cpu_last_gemm_weights()
            assert taken == expected_weights_path(m, "wq" in constants, isa)

    return check


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("constants", W_SOURCES.values(), ids=W_SOURCES.keys())
def test_int8_matmul_dequant_is_exact(m, n, k, dtype, with_bias, constants, cpu_isa, prepack_constants):
    rng = np.random.default_rng(m * 31 + n * 7 + k)
    xq = rng.integers(-127, 128, (m, k), dtype=np.int8)
    wq = rng.integers(-127, 128, (n, k), dtype=np.int8)
    xs = rng.uniform(0.001, 0.02, (m, 1)).astype(dtype)
    ws = rng.uniform(0.001, 0.02, n).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype) if with_bias else None
    inputs = {"xq": xq, "xs": xs, "wq": wq, "ws": ws, "bias": bias}
    (y,) = _run_op("Int8MatMulDequant", inputs, 1, constants=constants)
    np.testing.assert_array_equal(y, ref.int8_matmul_dequant(xq, xs, wq, ws, bias))
    prepack_constants(m, constants, cpu_isa)


@pytest.mark.parametrize("m", [1, 3, 256])
@pytest.mark.parametrize("low", [-127, -128])
@pytest.mark.parametrize("constants", W_SOURCES.values(), ids=W_SOURCES.keys())
def test_int8_accumulation_is_exact_at_full_range(m, low, constants, cpu_isa, prepack_constants):
    """Extreme operands at K = 1040 give int32 sums of 16.8M: exact in int32 and in float32. -128 never comes
    out of our quantizers, but the op takes any int8 (the VNNI paths shift X by 128 and must undo it exactly)."""
    k = 1040
    xq = np.full((m, k), low, np.int8)
    xq[0, ::3] = 127
    wq = np.full((5, k), low, np.int8)
    wq[1] = 127
    wq[2, 1::2] = 127
    inputs = {"xq": xq, "xs": np.ones((m, 1), np.float32), "wq": wq, "ws": np.ones(5, np.float32)}
    (y,) = _run_op("Int8MatMulDequant", inputs, 1, constants=constants)
    expect = (xq.astype(np.int64) @ wq.astype(np.int64).T).astype(np.float32)
    np.testing.assert_array_equal(y, expect)
    prepack_constants(m, constants, cpu_isa)


def _gemm_session_with_constant_w(m: int, n: int, k: int):
    rng = np.random.default_rng(5)
    inputs = {
        "xq": rng.integers(-127, 128, (m, k), dtype=np.int8),
        "xs": rng.uniform(0.001, 0.02, (m, 1)).astype(np.float32),
        "wq": rng.integers(-127, 128, (n, k), dtype=np.int8),
        "ws": rng.uniform(0.001, 0.02, n).astype(np.float32),
    }
    model = ort_ops.single_op_model("Int8MatMulDequant", inputs, 1, frozenset({"wq"}))
    sess = ort_ops.make_session(model, ["CPUExecutionProvider"])
    feed = {name: inputs[name] for name in ("xq", "xs", "ws")}
    return sess, feed, ref.int8_matmul_dequant(*(inputs[name] for name in ("xq", "xs", "wq", "ws")))


@needs_hooks
@pytest.mark.parametrize("setting", [None, "0", "yes"])
def test_prepacking_is_opt_in(monkeypatch, setting):
    """Without SQ_ONNX_CPU_PREPACK=1 the weights stay one copy in memory (ONNX Runtime's)."""
    if setting is None:
        monkeypatch.delenv("SQ_ONNX_CPU_PREPACK", raising=False)
    else:
        monkeypatch.setenv("SQ_ONNX_CPU_PREPACK", setting)
    sess, feed, expect = _gemm_session_with_constant_w(3, 40, 64)
    np.testing.assert_array_equal(sess.run(None, feed)[0], expect)
    assert custom_ops.cpu_isa_control().sq_onnx_cpu_last_gemm_weights() == custom_ops.WEIGHTS_AS_GIVEN


@needs_hooks
def test_weights_packed_for_another_instruction_set_are_not_used(monkeypatch):
    """Panels packed for AVX512-VNNI (16 columns) are not AVX-VNNI's (8): after a switch of the instruction set,
    the session made before it reads W as given, with the same result."""
    lib = custom_ops.cpu_isa_control()
    if lib.sq_onnx_cpu_best_isa() not in VNNI:
        pytest.skip("this CPU has no VNNI: nothing is prepacked")
    monkeypatch.setenv("SQ_ONNX_CPU_PREPACK", "1")
    sess, feed, expect = _gemm_session_with_constant_w(3, 40, 64)
    np.testing.assert_array_equal(sess.run(None, feed)[0], expect)
    assert lib.sq_onnx_cpu_last_gemm_weights() == custom_ops.WEIGHTS_PREPACKED
    try:
        assert lib.sq_onnx_cpu_select_isa(custom_ops.CPU_ISAS.index("avx2")) == 0
        np.testing.assert_array_equal(sess.run(None, feed)[0], expect)
        assert lib.sq_onnx_cpu_last_gemm_weights() == custom_ops.WEIGHTS_AS_GIVEN
    finally:
        lib.sq_onnx_cpu_select_isa(lib.sq_onnx_cpu_best_isa())


@pytest.mark.parametrize("m", [2, 5])
def test_float16_output_rounds_like_numpy_across_its_range(m, cpu_isa):
    """fp16 outputs from subnormal to overflow, with round-half-even ties (|acc| above 2048 has more bits than
    fp16 keeps): the vectorised epilogue converts with F16C, the reference with numpy."""
    rng = np.random.default_rng(7)
    k, n = 72, 64
    xq = rng.integers(-127, 128, (m, k), dtype=np.int8)
    wq = rng.integers(-127, 128, (n, k), dtype=np.int8)
    ws = np.exp2(np.linspace(-24, 4, n).round()).astype(np.float16)  # 2^-24 .. 2^4: exact in fp16
    xs = np.exp2(np.linspace(-10, 4, m).round()).astype(np.float16)[:, None]
    (y,) = _run_op("Int8MatMulDequant", {"xq": xq, "xs": xs, "wq": wq, "ws": ws}, 1)
    with np.errstate(over="ignore"):
        expect = ref.int8_matmul_dequant(xq, xs, wq, ws)
    assert np.isinf(expect).any() and (np.abs(expect[expect != 0]) < 2**-14).any()  # the range is covered
    np.testing.assert_array_equal(y.view(np.uint16), expect.view(np.uint16))


# Lengths around the vector widths (8 lanes of double, 16 of float) and their tails.
ROW_SHAPES = [(0, 8), (1, 1), (2, 3, 7), (5, 64), (2, 39), (33, 576), (3, 1000)]


@pytest.mark.parametrize("shape", ROW_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_quantize_and_norm_ops_are_exact(shape, dtype, cpu_isa):
    """Every instruction set's row loops (cpu_row_loops.h follows the GEMM's choice) against the reference."""
    rng = np.random.default_rng(len(shape) * 100 + shape[-1])
    k = shape[-1]
    x = (rng.standard_normal(shape) * 3).astype(dtype)
    x.reshape(-1, k)[:1] *= 40  # one row with outliers
    skip = rng.standard_normal(shape).astype(dtype)
    gamma = rng.uniform(0.5, 2, k).astype(dtype)
    beta = rng.standard_normal(k).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)

    q, s = _run_op("QuantizePerToken", {"x": x}, 2)
    eq, es = ref.quantize_per_token(x)
    np.testing.assert_array_equal(q, eq)
    np.testing.assert_array_equal(s, es)

    q, s = _run_op("QuantizePerToken", {"x": x, "si": gamma}, 2)
    eq, es = ref.quantize_per_token(x, gamma)
    np.testing.assert_array_equal(q, eq)
    np.testing.assert_array_equal(s, es)

    q, s = _run_op("RMSNormQuant", {"x": x, "g": gamma}, 2, epsilon=1e-6)
    eq, es = ref.rmsnorm_quant(x, gamma, 1e-6)
    np.testing.assert_array_equal(q, eq)
    np.testing.assert_array_equal(s, es)

    for b in (None, bias):
        q, s, total = _run_op("SkipRMSNormQuant", {"x": x, "skip": skip, "g": gamma, "b": b}, 3, epsilon=1e-6)
        eq, es, et = ref.rmsnorm_quant(x, gamma, 1e-6, skip=skip, bias=b)
        np.testing.assert_array_equal(q, eq)
        np.testing.assert_array_equal(s, es)
        np.testing.assert_array_equal(total, et)

    for b in (None, beta):
        q, s = _run_op("LayerNormQuant", {"x": x, "g": gamma, "b": b}, 2, epsilon=1e-5)
        eq, es = ref.layernorm_quant(x, gamma, b, 1e-5)
        np.testing.assert_array_equal(q, eq)
        np.testing.assert_array_equal(s, es)


def test_tiny_and_zero_rows_quantize_to_zero():
    x = np.zeros((2, 8), np.float16)
    x[1] = 1e-7  # fp16 scale underflows to 0: q must be 0, not NaN garbage
    q, s = _run_op("QuantizePerToken", {"x": x}, 2)
    assert not q.any()
    np.testing.assert_array_equal(s, ref.quantize_per_token(x)[1])


def test_bad_shapes_are_clear_errors():
    xq = np.zeros((2, 8), np.int8)
    with pytest.raises(Exception, match="Wq must be \\[N, K\\]"):
        _run_op(
            "Int8MatMulDequant",
            {
                "xq": xq,
                "xs": np.ones((2, 1), np.float32),
                "wq": np.zeros((4, 7), np.int8),
                "ws": np.ones(4, np.float32),
            },
            1,
        )
    with pytest.raises(Exception, match="gamma must be a vector"):
        _run_op("RMSNormQuant", {"x": np.ones((2, 8), np.float32), "g": np.ones(5, np.float32)}, 2)


def _convert_both(model, out_dir, calibration):
    outs = {}
    for kernels in ("ort", "sq_onnx"):
        out = out_dir / f"{kernels}.onnx"
        convert(model, out, Recipe(scheme="w8a8", samples=4, kernels=kernels), calibration=calibration)
        outs[kernels] = out
    return outs


@pytest.mark.parametrize(
    "fixture,fused_op",
    [("llama_fused", "SkipRMSNormQuant"), ("opt_dir", "LayerNormQuant"), ("llama_dir", "RMSNormQuant")],
)
def test_custom_kernels_agree_with_stock_ops(fixture, fused_op, request, tmp_path, calib_ids):
    folder = request.getfixturevalue(fixture)
    outs = _convert_both(folder / "model.onnx", tmp_path, calib_ids)
    ops = op_types(outs["sq_onnx"])
    assert "MatMulIntegerToFloat" not in ops and ops.count("Int8MatMulDequant") == op_types(
        outs["ort"]
    ).count("MatMulIntegerToFloat")
    if fused_op:
        assert fused_op in ops
    feed = ids_feed()
    stock = session(outs["ort"]).run(None, feed)[0]
    fused = session(outs["sq_onnx"]).run(None, feed)[0]
    ref_out = session(folder / "model.onnx").run(None, feed)[0]
    # the two forms differ only where a fused norm rounds once less: far below the quantization error
    assert rel_error(stock, fused) < 0.1 * rel_error(ref_out, stock) + 1e-5


@pytest.mark.parametrize(
    "kind,fused_op",
    [
        ("SimplifiedLayerNormalization", "RMSNormQuant"),
        ("RMSNormalization", "RMSNormQuant"),
        ("SkipSimplifiedLayerNormalization", "SkipRMSNormQuant"),
        ("LayerNormalization", "LayerNormQuant"),
        ("DecomposedRMSNorm", "RMSNormQuant"),
    ],
)
def test_norm_kinds_fuse(kind, fused_op, tmp_path):
    model = ir_graphs.build_norm_graph(kind, consumers=3)
    arrays = ir_graphs.sample_inputs(model, samples=4)
    outs = _convert_both(model, tmp_path, arrays)
    ops = op_types(outs["sq_onnx"])
    assert ops.count(fused_op) == 1 and ops.count("Int8MatMulDequant") == 3
    feed = {k: v[0] for k, v in arrays.items()}
    stock = session(outs["ort"]).run(None, feed)[0]
    fused = session(outs["sq_onnx"]).run(None, feed)[0]
    assert rel_error(stock, fused) < 1e-3


def test_norm_with_a_float_user_is_not_fused(tmp_path):
    model = ir_graphs.build_norm_graph("LayerNormalization", consumers=2, extra_consumer="Relu")
    arrays = ir_graphs.sample_inputs(model, samples=4)
    out = tmp_path / "m.onnx"
    result = convert(model, out, Recipe(scheme="w8a8", samples=4, kernels="sq_onnx"), calibration=arrays)
    ops = op_types(out)
    assert "LayerNormalization" in ops and "LayerNormQuant" not in ops and "QuantizePerToken" in ops
    (refusal,) = result.to_dict()["fusions"]["not_fused"]  # what --json and the report show
    assert "also read by Relu" in refusal["reason"] and result.fusions["fused"] == 0


def _norm_reshape_quant(last: int) -> ir.Model:
    """x [2, 3, 16] -> LayerNormalization -> Reshape to [-1, last] -> QuantizePerToken, as W8A8 with the kernels
    writes GPT-2's Conv1D input (before the norm fusion)."""
    rng = np.random.default_rng(0)
    tape = ir.tape.Tape()
    x = ir.Value(name="x", shape=ir.Shape([2, 3, 16]), type=ir.TensorType(ir.DataType.FLOAT))
    gamma = tape.initializer(ir.tensor(rng.normal(1, 0.2, 16).astype(np.float32), name="g"))
    beta = tape.initializer(ir.tensor(rng.normal(0, 0.2, 16).astype(np.float32), name="b"))
    y = tape.op("LayerNormalization", [x, gamma, beta], {"axis": -1, "epsilon": 1e-5})
    y.shape, y.type = ir.Shape([2, 3, 16]), ir.TensorType(ir.DataType.FLOAT)
    flat = tape.op("Reshape", [y, tape.initializer(ir.tensor(np.array([-1, last], np.int64), name="shape"))])
    xq, xs = tape.op_multi_out("QuantizePerToken", [flat], num_outputs=2, domain="sq_onnx")
    xq.name, xs.name = "xq", "xs"
    graph = ir.Graph(
        [x], [xq, xs], nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 21, "sq_onnx": 1}
    )
    return ir.Model(graph, ir_version=10)


def test_norm_fuses_through_a_reshape_that_keeps_rows():
    """GPT-2's case: the reshape moves after the fused op (codes to [-1, C], scales to [-1, 1]), same numbers;
    a reshape that regroups the channels is refused, with the reason."""
    from sq_onnx.passes.fuse_norm_quant import FuseNormQuantPass

    feed = {"x": np.random.default_rng(1).normal(0, 3, (2, 3, 16)).astype(np.float32)}
    model = _norm_reshape_quant(16)
    before = ort_ops.make_session(ir.to_proto(model), ["CPUExecutionProvider"]).run(None, feed)
    fuse = FuseNormQuantPass()
    fuse(model)
    assert fuse.fused == 1 and "LayerNormalization" not in [n.op_type for n in model.graph]
    after = ort_ops.make_session(ir.to_proto(model), ["CPUExecutionProvider"]).run(None, feed)
    assert [a.shape for a in after] == [(6, 16), (6, 1)]
    assert np.abs(after[0].astype(int) - before[0]).max() <= 1 and rel_error(before[1], after[1]) < 1e-6
    model = _norm_reshape_quant(32)
    fuse(model)
    assert fuse.fused == 0 and "does not keep the last axis" in fuse.refused[0].reason


def test_kernels_option_is_checked():
    from sq_onnx.errors import RecipeError

    with pytest.raises(RecipeError, match="per-token"):
        Recipe(scheme="w8a8", act="static", kernels="sq_onnx")
    with pytest.raises(RecipeError, match="accuracy level 4"):
        Recipe(scheme="w4", kernels="sq_onnx", accuracy_level="0")


def test_profile_shows_where_each_op_ran(tmp_path):
    """The profile reading the CUDA-session tests rely on, checked where it can run: on the CPU."""
    inputs = {"x": np.ones((2, 8), np.float32)}
    sess = ort_ops.make_session(
        ort_ops.single_op_model("QuantizePerToken", inputs, 2), ["CPUExecutionProvider"], tmp_path
    )
    sess.run(None, inputs)
    assert ort_ops.placed(sess) == {"QuantizePerToken": {"CPUExecutionProvider"}}


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_quantization_ties_round_to_even(dtype):
    """amax 254 gives the scale 2 exactly, so x / 2 lands on .5 ties: 0.5 -> 0, 1.5 -> 2, 2.5 -> 2, -1.5 -> -2."""
    x = np.array([[254, 1, 3, 5, -1, -3, -5, 7]], dtype)
    q, s = _run_op("QuantizePerToken", {"x": x}, 2)
    assert float(s[0, 0]) == 2.0
    np.testing.assert_array_equal(q[0], [127, 0, 2, 2, 0, -2, -2, 4])
    np.testing.assert_array_equal(q, ref.quantize_per_token(x)[0])


def test_float16_model_on_the_kernels(llama_dir, tmp_path, calib_ids):
    """The GPU deployment format: an fp16 model converts to fp16 sq_onnx ops (fused norms included) and is as
    close to the float32 original as its stock-op form. In fp16 the two forms differ by more than in float32: the
    stock ops round every step of the norm and of the quantization to fp16 (the quotient x / scale too), the
    kernels work in float32 inside, so a share of the int8 codes land differently."""
    import onnx_ir as ir

    import tiny_models

    src = tiny_models.to_float_type(llama_dir / "model.onnx", tmp_path / "f16.onnx", ir.DataType.FLOAT16)
    outs = _convert_both(src, tmp_path, calib_ids)
    ops = op_types(outs["sq_onnx"])
    assert "RMSNormQuant" in ops and "Int8MatMulDequant" in ops
    scales = [v for v in ir.load(outs["sq_onnx"]).graph.initializers.values() if v.name.endswith(".w_scale")]
    assert scales and all(v.const_value.dtype == ir.DataType.FLOAT16 for v in scales)
    feed = ids_feed()
    fp32 = session(llama_dir / "model.onnx").run(None, feed)[0]
    stock, fused = (session(outs[k]).run(None, feed)[0] for k in ("ort", "sq_onnx"))
    assert fused.dtype == np.float16
    stock_error = rel_error(fp32, stock.astype(np.float32))
    assert rel_error(fp32, fused.astype(np.float32)) < 1.5 * stock_error
    assert rel_error(stock.astype(np.float32), fused.astype(np.float32)) < stock_error


def test_bench_names_the_cpu_kernels(llama_dir, tmp_path, calib_ids, monkeypatch):
    """`sq-onnx bench` says which instruction set (and whether prepacked weights) a model on the kernels ran
    with, and nothing for a model without them."""
    from sq_onnx.lm.bench import bench

    out = tmp_path / "kernels.onnx"
    recipe = Recipe(scheme="w8a8", samples=4, kernels="sq_onnx")
    convert(llama_dir / "model.onnx", out, recipe, calibration=calib_ids)
    monkeypatch.setenv("SQ_ONNX_CPU_PREPACK", "1")
    isa = ctypes.CDLL(str(custom_ops.library_path())).sq_onnx_cpu_isa()
    expected = custom_ops.CPU_ISAS[isa] + (", weights prepacked" if isa in VNNI else "")
    assert bench(out, (8,), decode_tokens=2, repeats=1).cpu_kernels == expected
    assert bench(llama_dir / "model.onnx", (8,), decode_tokens=2, repeats=1).cpu_kernels is None
