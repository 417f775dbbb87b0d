"""The CUDA kernels' test cases, shared by the GPU tests (test_cuda_kernels.py, torch's CUDA memory) and the
CPU emulation of the same kernel source (test_cuda_kernels_emulated.py, numpy memory): each case runs the
library's C entry points and compares with the numpy reference, bit for bit."""

from __future__ import annotations

import contextlib
import ctypes
from typing import Any, Protocol

import kernel_reference as ref
import numpy as np

from sq_onnx.runtime import custom_ops

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
    (1, 1, 16),  # one column: dp4a, mma.sync, generic
    (20, 1, 16),
    (2, 1, 5),
    (3, 5, 0),  # K = 0: Y is the bias
]
# 5-16 rows on the tensor-core few-rows kernel (opt-in): partial column blocks, K not a whole 64-byte chunk,
# X rows 8-15 present or not, and LLM widths.
FEW_ROW_SHAPES = [(5, 33, 48), (16, 32, 16), (9, 40, 80), (12, 70, 1040), (16, 4096, 576), (8, 11008, 4096)]
# (2, 13000): the row in shared memory past the 48 KB default; (2, 70000): rows longer than any GPU's shared
# memory (280 KB), served by the kernel that reads the inputs again on each pass.
NORM_SHAPES = [(0, 64), (1, 1), (3, 576), (7, 1000), (33, 4096), (2, 13000), (2, 70000)]


class Memory(Protocol):
    """Where the kernels' operands live: GPU memory, or host memory for the CPU emulation."""

    def put(self, a: np.ndarray | None) -> Any: ...
    def empty(self, shape: tuple[int, ...], dtype: Any) -> Any: ...
    def ptr(self, t: Any) -> int | None: ...
    def get(self, t: Any) -> np.ndarray: ...
    def stream(self) -> int | None: ...


class HostMemory:
    """numpy arrays as "device" memory (the emulated kernels run on the CPU); the null stream."""

    def put(self, a):
        return None if a is None else np.ascontiguousarray(a)

    def empty(self, shape, dtype):
        """NaN (floats) or zeros: what the kernel leaves unwritten shows, or fails the comparison."""
        return np.zeros(shape, dtype) if dtype == np.int8 else np.full(shape, np.nan, dtype)

    def ptr(self, t):
        return None if t is None else t.ctypes.data

    def get(self, t):
        return t.copy()

    def stream(self):
        return None


def gemm_operands(m: int, n: int, k: int, dtype, seed: int, low: int = -127):
    """Random int8 operands in [low, 127], per-token and per-channel scales and a bias."""
    rng = np.random.default_rng(seed)
    xq = rng.integers(low, 128, (m, k), dtype=np.int8)
    wq = rng.integers(low, 128, (n, k), dtype=np.int8)
    xs = rng.uniform(0.001, 0.02, (m, 1)).astype(dtype)
    ws = rng.uniform(0.001, 0.02, n).astype(dtype)
    bias = rng.standard_normal(n).astype(dtype)
    return xq, xs, wq, ws, bias


def run_gemm(lib: ctypes.CDLL, mem: Memory, xq, xs, wq, ws, bias, stream=None) -> tuple[int, Any]:
    """The library's int8 GEMM on the operands (bias may be None): (its return code, Y in `mem`)."""
    (m, k), n = xq.shape, wq.shape[0]
    y = mem.empty((m, n), xs.dtype)
    d = [mem.put(a) for a in (xq, xs, wq, ws, bias)]
    rc = lib.sq_onnx_cuda_int8_matmul_dequant(
        int(xs.dtype == np.float16),
        *(mem.ptr(t) for t in d),
        m,
        n,
        k,
        mem.ptr(y),
        mem.stream() if stream is None else stream,
    )
    return rc, y


def gemm_case(lib, mem: Memory, m: int, n: int, k: int, dtype, seed: int, low: int = -127, bias: bool = True):
    """(the library's Y, the reference's Y) on random operands; asserts the call succeeded."""
    xq, xs, wq, ws, b = gemm_operands(m, n, k, dtype, seed, low)
    b = b if bias else None
    rc, y = run_gemm(lib, mem, xq, xs, wq, ws, b)
    assert rc == 0
    return mem.get(y), ref.int8_matmul_dequant(xq, xs, wq, ws, b)


@contextlib.contextmanager
def few_rows_on_tensor_cores(lib: ctypes.CDLL):
    """The tensor-core kernel for 5-16 rows (opt-in) inside the block; dp4a, the default, after it."""
    assert lib.sq_onnx_cuda_select_few_rows(custom_ops.FEW_ROWS_MMA) == 0
    try:
        yield
    finally:
        lib.sq_onnx_cuda_select_few_rows(custom_ops.FEW_ROWS_DP4A)


def few_rows_case(lib, mem: Memory, m: int, n: int, k: int, dtype):
    """gemm_case on the few-rows tensor-core kernel (int8 down to -128); asserts that kernel served it."""
    with few_rows_on_tensor_cores(lib):
        got, expect = gemm_case(lib, mem, m, n, k, dtype, seed=m * 5 + n + k, low=-128)
        assert lib.sq_onnx_cuda_last_gemm_kernel() == custom_ops.SERVED_FEW_ROWS_MMA
    return got, expect


def check_norm_quant(lib, mem: Memory, rows: int, k: int, dtype) -> None:
    """QuantizePerToken, RMSNormQuant with and without skip + bias, LayerNormQuant on one random input."""
    rng = np.random.default_rng(rows + k)
    x = (rng.standard_normal((rows, k)) * 3).astype(dtype)
    skip = rng.standard_normal((rows, k)).astype(dtype)
    gamma = rng.uniform(0.5, 2, k).astype(dtype)
    beta = rng.standard_normal(k).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype)
    half = int(dtype == np.float16)
    dx, dskip, dg, db, dbias = (mem.put(a) for a in (x, skip, gamma, beta, bias))
    p, st = mem.ptr, mem.stream()

    def outs(with_sum=False):
        total = mem.empty((rows, k), dtype) if with_sum else None
        return mem.empty((rows, k), np.int8), mem.empty((rows, 1), dtype), total

    def expect(got, want):
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(mem.get(g), w)

    q, s, _ = outs()
    assert lib.sq_onnx_cuda_quantize_per_token(half, p(dx), p(dg), rows, k, p(q), p(s), st) == 0
    expect((q, s), ref.quantize_per_token(x, gamma))

    q, s, _ = outs()
    assert (
        lib.sq_onnx_cuda_rmsnorm_quant(half, p(dx), None, None, p(dg), 1e-6, rows, k, p(q), p(s), None, st)
        == 0
    )
    expect((q, s), ref.rmsnorm_quant(x, gamma, 1e-6))

    q, s, total = outs(True)
    rc = lib.sq_onnx_cuda_rmsnorm_quant(
        half, p(dx), p(dskip), p(dbias), p(dg), 1e-6, rows, k, p(q), p(s), p(total), st
    )
    assert rc == 0
    expect((q, s, total), ref.rmsnorm_quant(x, gamma, 1e-6, skip=skip, bias=bias))

    q, s, _ = outs()
    assert lib.sq_onnx_cuda_layernorm_quant(half, p(dx), p(dg), p(db), 1e-5, rows, k, p(q), p(s), st) == 0
    expect((q, s), ref.layernorm_quant(x, gamma, beta, 1e-5))
