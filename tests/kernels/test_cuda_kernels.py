"""The CUDA kernels against the numpy reference, bit for bit, through the library's C entry points on
torch's CUDA tensors and stream (cases in cuda_kernel_cases.py, which test_cuda_kernels_emulated.py also
runs on the CPU). Skips (with the reason) without a GPU or a CUDA build of the library."""

from __future__ import annotations

import cuda_kernel_cases as cases
import kernel_reference as ref
import numpy as np
import pytest

from sq_onnx.runtime import custom_ops

if not custom_ops.available():
    pytest.skip("custom-op library not built", allow_module_level=True)
if not custom_ops.cuda_device_present():
    pytest.skip("no CUDA GPU (asked libcuda)", allow_module_level=True)
if not custom_ops.built_with_cuda():
    pytest.skip("custom-op library built without CUDA", allow_module_level=True)
if not custom_ops.has_test_hooks():
    pytest.skip("library built without its test entry points (SQ_ONNX_TEST_HOOKS)", allow_module_level=True)
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("this torch build has no CUDA", allow_module_level=True)


LIB = custom_ops.cuda_launchers()
SM90_SHAPES = ref.SM90_SHAPES
MMA, SM90, SERVED_SM90 = custom_ops.GEMM_MMA, custom_ops.GEMM_SM90, custom_ops.SERVED_SM90


class CudaMemory:
    """torch's CUDA tensors and current stream."""

    def put(self, a):
        return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).cuda()

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=_TORCH_DTYPES[np.dtype(dtype)], device="cuda")

    def ptr(self, t):
        return None if t is None else t.data_ptr()

    def get(self, t):
        torch.cuda.synchronize()
        return t.cpu().numpy()

    def stream(self):
        return torch.cuda.current_stream().cuda_stream


_TORCH_DTYPES = {
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float16): torch.float16,
    np.dtype(np.int8): torch.int8,
}
MEM = CudaMemory()


@pytest.fixture(params=[MMA, SM90], ids=["mma", "sm90"])
def gemm_path(request):
    """Select the int8 GEMM for the test; back to the default mma.sync after it."""
    if LIB.sq_onnx_cuda_select_gemm(request.param) != 0:
        pytest.skip("the CUTLASS Hopper GEMM is not built in or this GPU is not sm_90")
    yield request.param
    LIB.sq_onnx_cuda_select_gemm(MMA)


@pytest.mark.parametrize("m,n,k", cases.GEMM_SHAPES + SM90_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_int8_matmul_dequant_matches_reference(m, n, k, dtype, gemm_path):
    got, expect = cases.gemm_case(LIB, MEM, m, n, k, dtype, seed=m * 7 + n + k)
    np.testing.assert_array_equal(got, expect)
    if gemm_path == SM90 and (m, n, k) in SM90_SHAPES and dtype == np.float16:
        assert LIB.sq_onnx_cuda_last_gemm_kernel() == SERVED_SM90, "fell back instead of running CUTLASS"


def test_int8_matmul_dequant_more_row_tiles_than_one_launch_takes():
    """65,535 row tiles of 128 fill grid.y; the rows past them go in a second launch. Checked on samples of
    rows from both launches (the whole reference would take numpy minutes)."""
    m, n, k = 65535 * 128 + 130, 8, 16
    xq, xs, wq, ws, _ = cases.gemm_operands(m, n, k, np.float32, seed=1)
    y = torch.full((m, n), float("nan"), dtype=torch.float32, device="cuda")
    d = [MEM.put(a) for a in (xq, xs, wq, ws)]
    rc = LIB.sq_onnx_cuda_int8_matmul_dequant(
        0, *(MEM.ptr(t) for t in d), None, m, n, k, MEM.ptr(y), MEM.stream()
    )
    assert rc == 0
    got = MEM.get(y)
    rows = np.concatenate(
        [np.arange(200), np.random.default_rng(1).integers(0, m, 2000), np.arange(m - 400, m)]
    )
    np.testing.assert_array_equal(got[rows], ref.int8_matmul_dequant(xq[rows], xs[rows], wq, ws))
    assert not np.isnan(got).any(), "rows left unwritten"


@pytest.mark.parametrize("m,n,k", cases.FEW_ROW_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_few_rows_on_tensor_cores_match_reference(m, n, k, dtype):
    got, expect = cases.few_rows_case(LIB, MEM, m, n, k, dtype)
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("m,n,k", [(300, 256, 2048), (40, 128, 64)])
def test_int8_matmul_dequant_without_bias(m, n, k, gemm_path):
    """No bias: the Hopper epilogue reads a null bias as zero."""
    got, expect = cases.gemm_case(LIB, MEM, m, n, k, np.float16, seed=m + n + k, bias=False)
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("rows,k", cases.NORM_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_norm_quant_kernels_match_reference(rows, k, dtype):
    cases.check_norm_quant(LIB, MEM, rows, k, dtype)


def test_kernels_use_the_given_stream():
    """A launch on a busy side stream waits behind that stream's work: had it gone to another stream,
    its result would be visible while the side stream still sleeps."""
    import time

    m, n, k = 512, 512, 512
    rng = np.random.default_rng(0)
    xq, wq = (rng.integers(-127, 128, s, dtype=np.int8) for s in ((m, k), (n, k)))
    xs, ws = np.full((m, 1), 0.01, np.float32), np.full(n, 0.01, np.float32)
    d = [MEM.put(a) for a in (xq, xs, wq, ws)]
    side, other = torch.cuda.Stream(), torch.cuda.Stream()
    y = torch.zeros((m, n), device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time
        rc = LIB.sq_onnx_cuda_int8_matmul_dequant(
            0, *(MEM.ptr(t) for t in d), None, m, n, k, MEM.ptr(y), side.cuda_stream
        )
    assert rc == 0
    time.sleep(0.01)
    with torch.cuda.stream(other):
        early = y.cpu().numpy()
    assert not early.any(), "the kernel ran before the side stream's earlier work finished"
    side.synchronize()
    np.testing.assert_array_equal(y.cpu().numpy(), ref.int8_matmul_dequant(xq, xs, wq, ws))
