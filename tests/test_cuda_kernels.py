"""The CUDA kernels against the numpy reference, bit for bit, through the library's C entry points on
torch's CUDA tensors and stream. Skips (with the reason) without a GPU or a CUDA build of the library."""

from __future__ import annotations

import kernel_reference as ref
import numpy as np
import pytest

from sq_onnx import custom_ops

if not custom_ops.available():
    pytest.skip("custom-op library not built", allow_module_level=True)
if not custom_ops.cuda_device_present():
    pytest.skip("no CUDA GPU (asked libcuda)", allow_module_level=True)
if not custom_ops.built_with_cuda():
    pytest.skip("custom-op library built without CUDA", allow_module_level=True)
torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("this torch build has no CUDA", allow_module_level=True)


LIB = custom_ops.cuda_launchers()


def _dev(a):
    return None if a is None else torch.from_numpy(np.ascontiguousarray(a)).cuda()


def _ptr(t):
    return None if t is None else t.data_ptr()


def _stream():
    return torch.cuda.current_stream().cuda_stream


def _host(t):
    torch.cuda.synchronize()
    return t.cpu().numpy()


GEMM_SHAPES = [
    (1, 64, 64),
    (3, 100, 48),
    (16, 4096, 576),
    (17, 129, 80),
    (200, 300, 1024),
    (300, 257, 2048),
    (2048, 1536, 576),
    (5, 33, 37),
    (64, 64, 24),
]


SM90_SHAPES = ref.SM90_SHAPES
MMA, SM90, SERVED_SM90 = custom_ops.GEMM_MMA, custom_ops.GEMM_SM90, custom_ops.SERVED_SM90


@pytest.fixture(params=[MMA, SM90], ids=["mma", "sm90"])
def gemm_path(request):
    """Select the int8 GEMM for the test; back to the default mma.sync after it."""
    if LIB.sq_onnx_cuda_select_gemm(request.param) != 0:
        pytest.skip("the CUTLASS Hopper GEMM is not built in or this GPU is not sm_90")
    yield request.param
    LIB.sq_onnx_cuda_select_gemm(MMA)


def _gemm_case(m: int, n: int, k: int, dtype, seed: int, low: int = -127) -> tuple[np.ndarray, np.ndarray]:
    """Random int8 operands in [low, 127], scales and a bias; runs the library's GEMM on the GPU and returns
    (its Y, the reference's Y)."""
    rng = np.random.default_rng(seed)
    xq = rng.integers(low, 128, (m, k), dtype=np.int8)
    wq = rng.integers(low, 128, (n, k), dtype=np.int8)
    xs = rng.uniform(0.001, 0.02, (m, 1)).astype(dtype)
    ws = rng.uniform(0.001, 0.02, n).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    y = torch.empty((m, n), dtype=torch.float16 if dtype == np.float16 else torch.float32, device="cuda")
    d = [_dev(a) for a in (xq, xs, wq, ws, bias)]
    rc = LIB.sq_onnx_cuda_int8_matmul_dequant(
        int(dtype == np.float16), *(_ptr(t) for t in d), m, n, k, _ptr(y), _stream()
    )
    assert rc == 0
    return _host(y), ref.int8_matmul_dequant(xq, xs, wq, ws, bias)


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES + SM90_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_int8_matmul_dequant_matches_reference(m, n, k, dtype, gemm_path):
    got, expect = _gemm_case(m, n, k, dtype, seed=m * 7 + n + k)
    np.testing.assert_array_equal(got, expect)
    if gemm_path == SM90 and (m, n, k) in SM90_SHAPES and dtype == np.float16:
        assert LIB.sq_onnx_cuda_last_gemm_kernel() == SERVED_SM90, "fell back instead of running CUTLASS"


def test_int8_matmul_dequant_more_row_tiles_than_one_launch_takes():
    """65,535 row tiles of 128 fill grid.y; the rows past them go in a second launch. Checked on samples of
    rows from both launches (the whole reference would take numpy minutes)."""
    m, n, k = 65535 * 128 + 130, 8, 16
    rng = np.random.default_rng(1)
    xq = rng.integers(-127, 128, (m, k), dtype=np.int8)
    wq = rng.integers(-127, 128, (n, k), dtype=np.int8)
    xs = rng.uniform(0.001, 0.02, (m, 1)).astype(np.float32)
    ws = rng.uniform(0.001, 0.02, n).astype(np.float32)
    y = torch.full((m, n), float("nan"), dtype=torch.float32, device="cuda")
    d = [_dev(a) for a in (xq, xs, wq, ws)]
    rc = LIB.sq_onnx_cuda_int8_matmul_dequant(0, *(_ptr(t) for t in d), None, m, n, k, _ptr(y), _stream())
    assert rc == 0
    got = _host(y)
    rows = np.concatenate([np.arange(200), rng.integers(0, m, 2000), np.arange(m - 400, m)])
    np.testing.assert_array_equal(got[rows], ref.int8_matmul_dequant(xq[rows], xs[rows], wq, ws))
    assert not np.isnan(got).any(), "rows left unwritten"


# 5-16 rows on the tensor-core few-rows kernel (opt-in): partial column blocks, K not a whole 64-byte chunk,
# X rows 8-15 present or not, and LLM widths.
FEW_ROW_SHAPES = [(5, 33, 48), (16, 32, 16), (9, 40, 80), (12, 70, 1040), (16, 4096, 576), (8, 11008, 4096)]


@pytest.mark.parametrize("m,n,k", FEW_ROW_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_few_rows_on_tensor_cores_match_reference(m, n, k, dtype):
    assert LIB.sq_onnx_cuda_select_few_rows(custom_ops.FEW_ROWS_MMA) == 0
    try:
        got, expect = _gemm_case(m, n, k, dtype, seed=m * 5 + n + k, low=-128)
        assert LIB.sq_onnx_cuda_last_gemm_kernel() == custom_ops.SERVED_FEW_ROWS_MMA
    finally:
        LIB.sq_onnx_cuda_select_few_rows(custom_ops.FEW_ROWS_DP4A)
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("m,n,k", [(300, 256, 2048), (40, 128, 64)])
def test_int8_matmul_dequant_without_bias(m, n, k, gemm_path):
    """No bias: the Hopper epilogue reads a null bias as zero."""
    rng = np.random.default_rng(m + n + k)
    xq = rng.integers(-127, 128, (m, k), dtype=np.int8)
    wq = rng.integers(-127, 128, (n, k), dtype=np.int8)
    xs = rng.uniform(0.001, 0.02, (m, 1)).astype(np.float16)
    ws = rng.uniform(0.001, 0.02, n).astype(np.float16)
    y = torch.empty((m, n), dtype=torch.float16, device="cuda")
    d = [_dev(a) for a in (xq, xs, wq, ws)]
    rc = LIB.sq_onnx_cuda_int8_matmul_dequant(1, *(_ptr(t) for t in d), None, m, n, k, _ptr(y), _stream())
    assert rc == 0
    np.testing.assert_array_equal(_host(y), ref.int8_matmul_dequant(xq, xs, wq, ws))


# (2, 13000): the row in shared memory past the 48 KB default; (2, 70000): rows longer than any GPU's shared
# memory (280 KB), served by the kernel that reads the inputs again on each pass.
@pytest.mark.parametrize("rows,k", [(0, 64), (1, 1), (3, 576), (7, 1000), (33, 4096), (2, 13000), (2, 70000)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_norm_quant_kernels_match_reference(rows, k, dtype):
    rng = np.random.default_rng(rows + k)
    x = (rng.standard_normal((rows, k)) * 3).astype(dtype)
    skip = rng.standard_normal((rows, k)).astype(dtype)
    gamma = rng.uniform(0.5, 2, k).astype(dtype)
    beta = rng.standard_normal(k).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)
    tdt = torch.float16 if dtype == np.float16 else torch.float32
    half = int(dtype == np.float16)
    dx, dskip, dg, db, dbias = (_dev(a) for a in (x, skip, gamma, beta, bias))

    def outs(with_sum=False):
        q = torch.empty((rows, k), dtype=torch.int8, device="cuda")
        s = torch.empty((rows, 1), dtype=tdt, device="cuda")
        total = torch.empty((rows, k), dtype=tdt, device="cuda") if with_sum else None
        return q, s, total

    q, s, _ = outs()
    assert (
        LIB.sq_onnx_cuda_quantize_per_token(half, _ptr(dx), _ptr(dg), rows, k, _ptr(q), _ptr(s), _stream())
        == 0
    )
    eq, es = ref.quantize_per_token(x, gamma)
    np.testing.assert_array_equal(_host(q), eq)
    np.testing.assert_array_equal(_host(s), es)

    q, s, _ = outs()
    assert (
        LIB.sq_onnx_cuda_rmsnorm_quant(
            half, _ptr(dx), None, None, _ptr(dg), 1e-6, rows, k, _ptr(q), _ptr(s), None, _stream()
        )
        == 0
    )
    eq, es = ref.rmsnorm_quant(x, gamma, 1e-6)
    np.testing.assert_array_equal(_host(q), eq)
    np.testing.assert_array_equal(_host(s), es)

    q, s, total = outs(True)
    rc = LIB.sq_onnx_cuda_rmsnorm_quant(
        half,
        _ptr(dx),
        _ptr(dskip),
        _ptr(dbias),
        _ptr(dg),
        1e-6,
        rows,
        k,
        _ptr(q),
        _ptr(s),
        _ptr(total),
        _stream(),
    )
    assert rc == 0
    eq, es, et = ref.rmsnorm_quant(x, gamma, 1e-6, skip=skip, bias=bias)
    np.testing.assert_array_equal(_host(q), eq)
    np.testing.assert_array_equal(_host(s), es)
    np.testing.assert_array_equal(_host(total), et)

    q, s, _ = outs()
    assert (
        LIB.sq_onnx_cuda_layernorm_quant(
            half, _ptr(dx), _ptr(dg), _ptr(db), 1e-5, rows, k, _ptr(q), _ptr(s), _stream()
        )
        == 0
    )
    eq, es = ref.layernorm_quant(x, gamma, beta, 1e-5)
    np.testing.assert_array_equal(_host(q), eq)
    np.testing.assert_array_equal(_host(s), es)


def test_kernels_use_the_given_stream():
    """A launch on a busy side stream waits behind that stream's work: had it gone to another stream,
    its result would be visible while the side stream still sleeps."""
    import time

    m, n, k = 512, 512, 512
    rng = np.random.default_rng(0)
    xq, wq = (rng.integers(-127, 128, s, dtype=np.int8) for s in ((m, k), (n, k)))
    xs, ws = np.full((m, 1), 0.01, np.float32), np.full(n, 0.01, np.float32)
    d = [_dev(a) for a in (xq, xs, wq, ws)]
    side, other = torch.cuda.Stream(), torch.cuda.Stream()
    y = torch.zeros((m, n), device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time
        rc = LIB.sq_onnx_cuda_int8_matmul_dequant(
            0, *(_ptr(t) for t in d), None, m, n, k, _ptr(y), side.cuda_stream
        )
    assert rc == 0
    time.sleep(0.01)
    with torch.cuda.stream(other):
        early = y.cpu().numpy()
    assert not early.any(), "the kernel ran before the side stream's earlier work finished"
    side.synchronize()
    np.testing.assert_array_equal(y.cpu().numpy(), ref.int8_matmul_dequant(xq, xs, wq, ws))
