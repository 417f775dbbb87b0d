"""The sq_onnx ops inside an ONNX Runtime CUDA session (onnxruntime-gpu on a GPU): ORT places them on the CUDA
execution provider (read back from ORT's own profile), they run on ORT's compute stream and give the numpy
reference's results bit for bit, and a ``--kernels sq_onnx`` model gives the CPU session's logits to within
the quantization noise. Skips, with the reason, without a GPU, without a CUDA build of the library, or with
an onnxruntime that has no CUDA execution provider."""

from __future__ import annotations

import kernel_reference as ref
import numpy as np
import ort_ops
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.runtime import custom_ops

from conftest import ids_feed, rel_error

ort = pytest.importorskip("onnxruntime")
if not custom_ops.available():
    pytest.skip("custom-op library not built", allow_module_level=True)
if not custom_ops.built_with_cuda():
    pytest.skip("custom-op library built without CUDA", allow_module_level=True)
if not custom_ops.cuda_device_present():
    pytest.skip("no CUDA GPU (asked libcuda)", allow_module_level=True)
if "CUDAExecutionProvider" not in ort.get_available_providers():
    pytest.skip("this onnxruntime has no CUDA execution provider (onnxruntime-gpu)", allow_module_level=True)
if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21: CUDA and cuDNN from the nvidia-* wheels, as on
    ort.preload_dlls()  # machines where only pip (torch's dependencies) installed them

CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]


def _run_on_cuda(op, inputs, n_out, tmp_path, **attrs):
    """Outputs of one node run by the CUDA provider; fails if ORT put the node anywhere else."""
    sess = ort_ops.make_session(ort_ops.single_op_model(op, inputs, n_out, **attrs), CUDA, tmp_path)
    assert sess.get_providers()[0] == "CUDAExecutionProvider", "the CUDA provider did not load"
    outs = sess.run(None, {k: v for k, v in inputs.items() if v is not None})
    assert ort_ops.placed(sess).get(op) == {"CUDAExecutionProvider"}
    return outs


@pytest.mark.parametrize("m,n,k", [(1, 64, 576), (5, 9, 33), (16, 256, 512), (300, 264, 2048)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_int8_matmul_dequant_in_a_cuda_session(m, n, k, dtype, tmp_path):
    rng = np.random.default_rng(m + n + k)
    xq = rng.integers(-127, 128, (m, k), dtype=np.int8)
    wq = rng.integers(-127, 128, (n, k), dtype=np.int8)
    xs = rng.uniform(0.001, 0.02, (m, 1)).astype(dtype)
    ws = rng.uniform(0.001, 0.02, n).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    inputs = {"xq": xq, "xs": xs, "wq": wq, "ws": ws, "bias": bias}
    (y,) = _run_on_cuda("Int8MatMulDequant", inputs, 1, tmp_path)
    np.testing.assert_array_equal(y, ref.int8_matmul_dequant(xq, xs, wq, ws, bias))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_norm_quant_ops_in_a_cuda_session(dtype, tmp_path):
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((2, 9, 576)) * 3).astype(dtype)
    skip = rng.standard_normal(x.shape).astype(dtype)
    gamma = rng.uniform(0.5, 2, 576).astype(dtype)
    beta = rng.standard_normal(576).astype(dtype)

    q, s = _run_on_cuda("QuantizePerToken", {"x": x, "si": gamma}, 2, tmp_path)
    eq, es = ref.quantize_per_token(x, gamma)
    np.testing.assert_array_equal(q, eq)
    np.testing.assert_array_equal(s, es)

    q, s, total = _run_on_cuda(
        "SkipRMSNormQuant", {"x": x, "skip": skip, "g": gamma}, 3, tmp_path, epsilon=1e-6
    )
    eq, es, et = ref.rmsnorm_quant(x, gamma, 1e-6, skip=skip)
    np.testing.assert_array_equal(q, eq)
    np.testing.assert_array_equal(s, es)
    np.testing.assert_array_equal(total, et)

    q, s = _run_on_cuda("LayerNormQuant", {"x": x, "g": gamma, "b": beta}, 2, tmp_path, epsilon=1e-5)
    eq, es = ref.layernorm_quant(x, gamma, beta, 1e-5)
    np.testing.assert_array_equal(q, eq)
    np.testing.assert_array_equal(s, es)


def test_converted_model_runs_on_cuda_like_on_cpu(llama_fused, tmp_path, calib_ids):
    """A whole W8A8 model with the fused ops: the custom nodes run on CUDA, and the logits match the CPU
    session's to far below the quantization error (norm statistics are summed in another order)."""
    out = tmp_path / "w8k.onnx"
    convert(
        llama_fused / "model.onnx",
        out,
        Recipe(scheme="w8a8", samples=4, kernels="sq_onnx"),
        calibration=calib_ids,
    )
    feed = ids_feed()
    sess = ort_ops.make_session(out, CUDA, tmp_path)
    on_gpu = sess.run(None, feed)[0]
    where = ort_ops.placed(sess)
    for op in ("Int8MatMulDequant", "SkipRMSNormQuant"):
        assert where.get(op) == {"CUDAExecutionProvider"}, f"{op} ran on {where.get(op)}"
    on_cpu = ort_ops.make_session(out, ["CPUExecutionProvider"]).run(None, feed)[0]
    fp = ort_ops.make_session(llama_fused / "model.onnx", ["CPUExecutionProvider"]).run(None, feed)[0]
    assert rel_error(on_cpu, on_gpu) < 0.1 * rel_error(fp, on_cpu) + 1e-5
