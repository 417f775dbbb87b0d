"""``sq_onnx::MatMulNBitsA8`` (custom_ops/src/cpu_nbits_a8.h) against the two things it must equal: ORT's own
MatMulNBits at accuracy_level 4 on the same inputs, and the numpy statement of that arithmetic (A rounded to
int8 per block as ``quant.int8.fake_blockwise``, times the dequantized 4-bit weights). Both to float
rounding, on every instruction set this machine has (the AVX-512 VNNI path and the portable one), for
initializer weights (packed once) and weights fed as inputs (packed per call); then the pass that swaps the
op in, and a ``--kernels sq_onnx`` W4 conversion against the stock-op one.

Without the library these tests skip, except where SQ_ONNX_REQUIRE_OPS=1 (tools/dev.sh test, CI)."""

from __future__ import annotations

import ctypes

import numpy as np
import onnx_ir as ir
import ort_ops
import pytest
from onnx import TensorProto, helper, numpy_helper

from sq_onnx import Recipe, convert
from sq_onnx.errors import RecipeError
from sq_onnx.passes.graph_edit import MS
from sq_onnx.passes.use_nbits_a8_kernel import UseNBitsA8KernelPass, why_not
from sq_onnx.quant.blockwise import quantize_blockwise
from sq_onnx.quant.int8 import fake_blockwise
from sq_onnx.runtime import custom_ops
from sq_onnx.runtime.ort_session import session, session_options

from conftest import ids_feed, op_types, rel_error

ort_ops.skip_module_without_library()

BEST = custom_ops.CPU_ISAS[
    ctypes.CDLL(str(custom_ops.library_path())).sq_onnx_cpu_isa()
]  # the library's pick


def _session(model):
    """An in-memory session (a ModelProto or an ir.Model) with the sq_onnx ops registered."""
    import onnxruntime as ort

    proto = ir.to_proto(model) if isinstance(model, ir.Model) else model
    opts = session_options(custom_ops=True)
    return ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _weights(k: int, n: int, block: int, symmetric: bool, seed: int, bits: int = 4):
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, (k, n)).astype(np.float32)
    w[:, rng.integers(0, n)] *= 30  # one loud column: its scales differ from the rest
    return quantize_blockwise(w, bits, block, symmetric)


def _model(op: str, k: int, n: int, block: int, bq, bias: np.ndarray | None, constant: bool, bits: int = 4):
    """One node: ORT's MatMulNBits at level 4 (op 'MatMulNBits') or ours; weights as initializers or inputs."""
    arrays = {"B": bq.packed, "scales": bq.scales.reshape(-1)}
    zp = bq.packed_zero_points()
    names = ["A", "B", "scales", "zp" if zp is not None else ""]
    if zp is not None:
        arrays["zp"] = zp
    if bias is not None:
        names += ([""] if op == "MatMulNBits" else []) + ["bias"]  # MatMulNBits' g_idx slot
        arrays["bias"] = bias
    while names[-1] == "":
        names.pop()
    attrs = {"K": k, "N": n, "bits": bits, "block_size": block}
    if op == "MatMulNBits":
        node = helper.make_node(op, names, ["Y"], domain=MS, accuracy_level=4, **attrs)
    else:
        node = helper.make_node(op, names, ["Y"], domain="sq_onnx", **attrs)
    graph_inputs = [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["batch", "seq", k])]
    inits = [numpy_helper.from_array(a, name) for name, a in arrays.items()]
    if not constant:
        graph_inputs += [
            helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(a.dtype), list(a.shape))
            for name, a in arrays.items()
        ]
        inits = []
    graph = helper.make_graph(
        [node], "g", graph_inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], inits
    )
    opsets = [helper.make_opsetid("", 21), helper.make_opsetid(MS, 1), helper.make_opsetid("sq_onnx", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model, (arrays if not constant else {})


SHAPES = [  # rows, K, N, block
    (1, 576, 1536, 128),  # decode of SmolLM2's q/k/v joined, one row
    (5, 576, 100, 128),  # N not a whole number of 16-column panels
    (70, 1536, 576, 32),  # more than one 64-row task; many blocks
    (3, 200, 33, 16),  # K not a whole block: the last block is short
    (4, 64, 17, 64),
    (130, 96, 64, 32),
]


# The library's own path with and without zero points, weights packed once or per call; the other paths (which
# share the packing and the epilogue) asymmetric and packed once.
CASES = [
    (isa, symmetric, constant)
    for isa in custom_ops.CPU_ISAS
    for symmetric in (False, True)
    for constant in (True, False)
    if isa == BEST or (not symmetric and constant)
]


@pytest.mark.parametrize("rows,k,n,block", SHAPES)
@pytest.mark.parametrize("isa,symmetric,constant", CASES, indirect=["isa"])
@pytest.mark.parametrize("bits", [4, 8])
def test_matches_matmulnbits_level4(rows, k, n, block, symmetric, constant, bits, isa):
    rng = np.random.default_rng(rows * 7 + k)
    bq = _weights(k, n, block, symmetric, seed=k + n, bits=bits)
    bias = rng.normal(0, 1, n).astype(np.float32) if rows % 2 else None
    a = rng.normal(0, 1, (1, rows, k)).astype(np.float32)
    a[..., 3] *= 40  # an outlier channel, as smoothing leaves fewer of
    if rows > 2:
        a[0, 1] = 0.0  # a row of zeros: every block's scale is 0
    outs = {}
    for op in ("MatMulNBits", "MatMulNBitsA8"):
        model, feeds = _model(op, k, n, block, bq, bias, constant, bits)
        outs[op] = _session(model).run(None, {"A": a, **feeds})[0]
    assert outs["MatMulNBitsA8"].shape == (1, rows, n)
    if constant:  # ORT runs level 4 only on prepacked (initializer) weights; fed ones it multiplies in float
        assert rel_error(outs["MatMulNBits"], outs["MatMulNBitsA8"]) < 1e-6
    expected = fake_blockwise(a, block) @ bq.dequantize() + (bias if bias is not None else 0)
    assert rel_error(expected, outs["MatMulNBitsA8"]) < 1e-6
    assert np.abs(expected - outs["MatMulNBitsA8"]).max() <= 1e-5 * np.abs(expected).max()


def test_takes_no_rows():
    bq = _weights(64, 32, 32, False, 0)
    model, _ = _model("MatMulNBitsA8", 64, 32, 32, bq, None, True)
    assert _session(model).run(None, {"A": np.zeros((1, 0, 64), np.float32)})[0].shape == (1, 0, 32)


def test_bad_inputs_are_clear_errors():
    bq = _weights(64, 32, 32, False, 0)
    model, _ = _model("MatMulNBitsA8", 64, 32, 32, bq, None, True)
    model.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "k"  # let a wrong K reach the kernel
    with pytest.raises(Exception, match="last dimension of A must be K"):
        _session(model).run(None, {"A": np.zeros((1, 2, 48), np.float32)})
    model.graph.node[0].attribute[1].i = 31  # N
    with pytest.raises(Exception, match="B must be"):
        _session(model).run(None, {"A": np.zeros((1, 2, 64), np.float32)})


def _matmulnbits_graph() -> ir.Model:
    """x -> four MatMulNBits: 4-bit level 4 (twice, one with a bias), 4-bit level 0, 8-bit level 4."""
    k, block = 64, 32
    tape = ir.tape.Tape()
    x = ir.Value(name="x", shape=ir.Shape([1, 3, k]), type=ir.TensorType(ir.DataType.FLOAT))
    outs = []
    for i, (bits, level, bias) in enumerate([(4, 4, False), (4, 4, True), (4, 0, False), (8, 4, False)]):
        rng = np.random.default_rng(i)
        bq = quantize_blockwise(rng.normal(0, 1, (k, 24)).astype(np.float32), bits, block, False)
        inputs = [
            x,
            tape.initializer(ir.tensor(bq.packed, name=f"w{i}.q")),
            tape.initializer(ir.tensor(bq.scales, name=f"w{i}.s")),
            tape.initializer(ir.tensor(bq.packed_zero_points(), name=f"w{i}.zp")),
        ]
        if bias:
            inputs += [
                None,
                tape.initializer(ir.tensor(rng.normal(0, 1, 24).astype(np.float32), name=f"w{i}.b")),
            ]
        attrs = {"K": k, "N": 24, "bits": bits, "block_size": block, "accuracy_level": level}
        out = tape.op("MatMulNBits", inputs, attrs, domain=MS)
        out.name, out.type = f"y{i}", ir.TensorType(ir.DataType.FLOAT)
        outs.append(out)
    graph = ir.Graph(
        [x], outs, nodes=tape.nodes, initializers=tape.initializers, opset_imports={"": 21, MS: 1}
    )
    return ir.Model(graph, ir_version=10)


def test_pass_swaps_only_what_computes_the_same():
    model = _matmulnbits_graph()
    feed = {"x": np.random.default_rng(0).normal(0, 1, (1, 3, 64)).astype(np.float32)}
    before = _session(model).run(None, feed)
    swap = UseNBitsA8KernelPass()
    swap(model)
    assert swap.swapped == 3 and swap.kept == {"accuracy_level 0": 1}
    assert [n.op_type for n in model.graph] == [
        "MatMulNBitsA8",
        "MatMulNBitsA8",
        "MatMulNBits",
        "MatMulNBitsA8",
    ]
    assert [v.name for v in model.graph.outputs] == ["y0", "y1", "y2", "y3"]
    after = _session(model).run(None, feed)
    for b, a in zip(before, after, strict=True):
        assert rel_error(b, a) < 1e-6


def test_why_not_names_each_refusal():
    model = _matmulnbits_graph()
    node = next(iter(model.graph))
    assert why_not(node) is None
    node.inputs[0].dtype = ir.DataType.FLOAT16
    assert why_not(node) == "activations not float32"


def test_w4_conversion_on_the_kernel_agrees_with_stock_ops(llama_dir, tmp_path, calib_ids):
    """The same W4 recipe at level 4 with the stock MatMulNBits and with MatMulNBitsA8: the same model to float
    rounding (the conversion is deterministic; only the op differs)."""
    outs, results = {}, {}
    for kernels in ("ort", "sq_onnx"):
        out = tmp_path / f"{kernels}.onnx"
        recipe = Recipe(scheme="w4", accuracy_level="4", samples=4, gptq_samples=4, kernels=kernels)
        results[kernels] = convert(llama_dir / "model.onnx", out, recipe, calibration=calib_ids)
        outs[kernels] = out
    ops = op_types(outs["sq_onnx"])
    w4 = results["sq_onnx"].nbits_a8_kernels
    assert w4["swapped"] == ops.count("MatMulNBitsA8") > 0 and w4["kept"] == {}  # the 8-bit lm_head too
    assert "MatMulNBits" not in ops
    assert results["ort"].nbits_a8_kernels is None
    feed = ids_feed()
    stock = session(outs["ort"]).run(None, feed)[0]
    ours = session(outs["sq_onnx"]).run(None, feed)[0]
    assert rel_error(stock, ours) < 1e-5


def test_w4_kernels_need_level_4():
    with pytest.raises(RecipeError, match="accuracy level 4"):
        Recipe(scheme="w4", accuracy_level="0", kernels="sq_onnx")
    Recipe(scheme="w4", kernels="sq_onnx")  # auto: the kernel takes the linears left at level 4
    with pytest.raises(RecipeError, match="smooth"):
        Recipe(scheme="smooth", kernels="sq_onnx")
