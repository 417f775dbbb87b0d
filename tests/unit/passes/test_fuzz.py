"""Property and fuzz tests (hypothesis): random norm -> linear fan-outs keep their function when smoothed
or are reported as skipped; random byte damage to a model file gives a clean SqOnnxError, never a crash."""

from __future__ import annotations

import os

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sq_onnx import Recipe, SqOnnxError, convert
from sq_onnx.calibration.calibrate import collect_absmax
from sq_onnx.passes.analyze import analyze
from sq_onnx.passes.smooth import smooth_groups

import ir_graphs
from conftest import rel_error

# The suite runs a fixed, derandomized sample (CI stays reproducible); SQ_ONNX_FUZZ_EXAMPLES=500 explores more.
EXAMPLES = int(os.environ.get("SQ_ONNX_FUZZ_EXAMPLES", "30"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize="SQ_ONNX_FUZZ_EXAMPLES" not in os.environ,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


def _run(model: ir.Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    sess = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


@FUZZ
@given(
    kind=st.sampled_from(ir_graphs.NORM_KINDS),
    consumers=st.integers(1, 4),
    form=st.sampled_from(["matmul", "gemm", "transposed"]),
    foreign=st.sampled_from([None, "Relu"]),
    alpha=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_smoothing_keeps_the_function_or_reports_a_skip(kind, consumers, form, foreign, alpha, seed):
    model = ir_graphs.build_norm_graph(
        kind,
        consumers=consumers,
        gemm=form == "gemm",
        transposed_weight=form == "transposed",
        extra_consumer=foreign,
        seed=seed,
    )
    arrays = ir_graphs.sample_inputs(model, seed=seed)
    feeds = [{k: v[i] for k, v in arrays.items()} for i in range(len(next(iter(arrays.values()))))]
    before = _run(model, feeds[0])
    analysis = analyze(model.graph)
    if foreign:
        # The norm output also feeds a Relu: folding 1/s into γ would change the Relu's input.
        assert not analysis.groups
        assert analysis.skipped and all(s.reason for s in analysis.skipped)
    else:
        assert len(analysis.groups) == 1 and len(analysis.groups[0].consumers) == consumers
    stats = collect_absmax(model, {g.name: g.channels for g in analysis.groups}, feeds, show_progress=False)
    smooth_groups(model.graph, analysis.groups, stats, alpha)
    assert rel_error(before, _run(model, feeds[0])) < 1e-5


@pytest.fixture(scope="module")
def small_model_bytes(tmp_path_factory) -> tuple[bytes, dict[str, np.ndarray]]:
    model = ir_graphs.build_norm_graph("DecomposedRMSNorm", consumers=2)
    path = tmp_path_factory.mktemp("fuzz") / "m.onnx"
    ir.save(model, path)
    return path.read_bytes(), ir_graphs.sample_inputs(model)


@FUZZ
@given(data=st.data())
def test_random_byte_damage_gives_a_clean_error(data, small_model_bytes, tmp_path_factory):
    raw, arrays = small_model_bytes
    damaged = bytearray(raw)
    how = data.draw(st.sampled_from(["flip", "truncate", "splice"]))
    if how == "truncate":
        damaged = damaged[: data.draw(st.integers(0, len(raw) - 1))]
    elif how == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=8)):
            damaged[pos] = data.draw(st.integers(0, 255))
    else:
        start = data.draw(st.integers(0, len(raw) - 1))
        damaged[start:start] = data.draw(st.binary(min_size=1, max_size=64))
    folder = tmp_path_factory.mktemp("damaged")
    (folder / "m.onnx").write_bytes(bytes(damaged))
    try:
        convert(
            folder / "m.onnx", folder / "out.onnx", Recipe(samples=2, verify_samples=1), calibration=arrays
        )
    except SqOnnxError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
        assert not (folder / "out.onnx").exists()
