"""The CUDA kernels' own source run on the CPU (tests/cuda_emulation/: threads as fibers, warp collectives
and mma.sync / ldmatrix / cp.async from the PTX fragment layouts), bit for bit against the numpy reference,
so every path that only a GPU could run is checked in CI: the index arithmetic, the bounds and odd sizes,
which kernel and tile each shape takes, the launches (grid limits, shared-memory opt-in), and that nothing
depends on the order threads run in (shared memory, static and dynamic, starts as 0xA5 in every block).
Not covered: the CUTLASS Hopper kernel (wgmma and TMA are not emulated) and timing. With SQ_ONNX_EMULATION_SANITIZE=address the library is built with AddressSanitizer and
UndefinedBehaviorSanitizer (test_kernels_stay_in_bounds runs this module so), a CPU stand-in for
compute-sanitizer's memcheck."""

from __future__ import annotations

import os
import subprocess
import sys

import cuda_emulation as emu
import cuda_kernel_cases as cases
import numpy as np
import pytest

from sq_onnx.runtime import custom_ops

# CI (SQ_ONNX_REQUIRE_OPS=1) builds the library, so it has a compiler: there these tests must run, not skip.
REQUIRED = os.environ.get("SQ_ONNX_REQUIRE_OPS") == "1"
if emu.compiler() is None:
    if REQUIRED:
        raise RuntimeError("SQ_ONNX_REQUIRE_OPS=1 but no C++ compiler to build the emulated CUDA kernels")
    pytest.skip("no C++ compiler to build the emulated kernels", allow_module_level=True)

SANITIZE = os.environ.get("SQ_ONNX_EMULATION_SANITIZE") == "address"
# The emulated device: sm_86/89's opt-in shared memory (the least of the sm_80+ GPUs) and 4 SMs, so that
# small problems take each of the three mma.sync tile shapes.
OPTIN_SMEM, SMS = 99 * 1024, 4
MEM = cases.HostMemory()
ROW_TILE = 128  # the 128 x 256 and 128 x 128 tiles' rows


@pytest.fixture(scope="module")
def lib():
    return emu.load(emu.build(emu.ASAN_FLAGS if SANITIZE else ()), OPTIN_SMEM, SMS)


def _tile_smem(rows: int, cols: int) -> int:
    return 3 * (rows + cols) * 80  # kStages x (BM + BN) rows of kRowBytes


# The GPU tests' shapes that run in about a second here, and the paths' edges: one to four rows (dp4a),
# K not a multiple of 16 (generic), each mma.sync tile, partial tiles in M, N and K.
GEMM_SHAPES = [s for s in cases.GEMM_SHAPES if s[0] * s[1] * s[2] <= 62_000_000 and s[1] <= 2048] + [
    (4, 520, 4096),
    (16, 512, 576),
    (33, 264, 512),
    (100, 1032, 160),
    (256, 256, 128),
    (7, 9, 1),
]


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_int8_matmul_dequant_matches_reference(lib, m, n, k, dtype):
    got, expect = cases.gemm_case(lib, MEM, m, n, k, dtype, seed=m * 7 + n + k)
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize(
    "m,n,k,served,smem",
    [
        (1, 64, 64, custom_ops.SERVED_DP4A, 0),
        (16, 96, 64, custom_ops.SERVED_DP4A, 0),
        (5, 33, 37, custom_ops.SERVED_GENERIC, 0),
        (17, 129, 80, custom_ops.SERVED_MMA, _tile_smem(64, 128)),  # 2 tiles of 128 x 128 < 4 SMs
        (256, 256, 128, custom_ops.SERVED_MMA, _tile_smem(128, 128)),
        (200, 300, 256, custom_ops.SERVED_MMA, _tile_smem(128, 256)),  # the 92 KB tile needs the opt-in
    ],
)
def test_each_shape_takes_its_kernel(lib, m, n, k, served, smem):
    got, expect = cases.gemm_case(lib, MEM, m, n, k, np.float16, seed=3)
    np.testing.assert_array_equal(got, expect)
    assert lib.sq_onnx_cuda_last_gemm_kernel() == served
    assert emu.last_launch(lib)[3] == smem


@pytest.mark.parametrize("m", [emu.MAX_GRID_Y * ROW_TILE + 130, 3 * emu.MAX_GRID_Y * ROW_TILE])
def test_more_row_tiles_than_one_launch_takes(lib, m):
    """grid.y is capped (65,535 on GPUs, MAX_GRID_Y here): the rows past it go in further launches, each
    with its own offsets into X, its scales and Y."""
    before = lib.sq_emu_launches()
    got, expect = cases.gemm_case(lib, MEM, m, 8, 32, np.float32, seed=m)
    np.testing.assert_array_equal(got, expect)
    tiles = -(-m // ROW_TILE)
    assert lib.sq_emu_launches() - before == -(-tiles // emu.MAX_GRID_Y)


@pytest.mark.parametrize(
    "m,n,k", [s for s in cases.FEW_ROW_SHAPES if s[1] * s[2] <= 4096 * 576] + [(8, 264, 4096)]
)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_few_rows_on_tensor_cores_match_reference(lib, m, n, k, dtype):
    got, expect = cases.few_rows_case(lib, MEM, m, n, k, dtype)
    np.testing.assert_array_equal(got, expect)


def test_without_bias(lib):
    got, expect = cases.gemm_case(lib, MEM, 40, 128, 64, np.float16, seed=5, bias=False)
    np.testing.assert_array_equal(got, expect)


@pytest.mark.parametrize("rows,k", cases.NORM_SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_norm_quant_kernels_match_reference(lib, rows, k, dtype):
    cases.check_norm_quant(lib, MEM, rows, k, dtype)


@pytest.mark.parametrize(
    "k,smem",
    [(12_000, 48_000), (13_000, 52_000), (30_000, 0)],
    ids=["default-smem", "opt-in-smem", "uncached"],
)
def test_row_length_picks_the_row_kernel(lib, k, smem):
    """Rows up to 48 KB in shared memory, then up to the device's opt-in limit (99 KB here, after
    cudaFuncSetAttribute), then the kernel that keeps nothing in shared memory."""
    cases.check_norm_quant(lib, MEM, 2, k, np.float32)
    assert emu.last_launch(lib)[3] == smem


# (order, lockstep, cp.async late): warp-serial by thread id with early copies is the default.
SCHEDULES = {
    "reversed": (1, 0, 0),
    "shuffled": (2, 0, 0),
    "late-cp.async": (0, 0, 1),
    "reversed-late": (1, 0, 1),
    "lockstep-shuffled": (2, 1, 1),
}


@pytest.mark.parametrize("schedule", SCHEDULES, ids=list(SCHEDULES))
def test_results_do_not_depend_on_thread_order(lib, schedule):
    """Warps and threads run in reverse or shuffled order, one warp ahead of the others or all in lockstep,
    and cp.async lands as late as its wait allows: a missing barrier or wait would read stale shared memory
    and change the result."""
    order, lockstep, late = SCHEDULES[schedule]
    lib.sq_emu_schedule(order, lockstep, late, 7)
    try:
        for m, n, k in [(256, 256, 200), (200, 300, 320), (3, 70, 64)]:
            got, expect = cases.gemm_case(lib, MEM, m, n, k, np.float16, seed=k)
            np.testing.assert_array_equal(got, expect)
        got, expect = cases.few_rows_case(lib, MEM, 12, 70, 1040, np.float32)
        np.testing.assert_array_equal(got, expect)
        cases.check_norm_quant(lib, MEM, 3, 30_000, np.float16)
        cases.check_norm_quant(lib, MEM, 5, 4096, np.float32)
    finally:
        lib.sq_emu_schedule(0, 0, 0, 1)


def _broken(old: str, new: str) -> str:
    source = emu.SOURCE.read_text()
    assert source.count(old) == 1, f"the mutation's anchor is gone: {old!r}"
    return source.replace(old, new)


MMA_TILE, FEW_ROWS, FEW_ROWS_ONE_CHUNK = (200, 300, 256), (12, 70, 1040), (5, 33, 48)


@pytest.mark.skipif(SANITIZE, reason="the mutations are checked without the sanitizer")
@pytest.mark.parametrize(
    "old,new,late,shape",
    [
        # B fragments of the mma.sync tile in the wrong order
        (
            "bf[2 * p][0], bf[2 * p][1], bf[2 * p + 1][0], bf[2 * p + 1][1]",
            "bf[2 * p][0], bf[2 * p + 1][0], bf[2 * p][1], bf[2 * p + 1][1]",
            0,
            MMA_TILE,
        ),
        # the barrier after waiting for a stage's copies: other threads' copies not yet landed
        (
            "    cp_async_wait<kStages - 2>();\n    __syncthreads();",
            "    cp_async_wait<kStages - 2>();",
            1,
            MMA_TILE,
        ),
        # waiting for one group too few
        ("cp_async_wait<kStages - 2>();", "cp_async_wait<kStages - 1>();", 1, MMA_TILE),
        # the few-rows kernel's second W column half fed as the first's upper K
        (
            "a[1] = static_cast<uint32_t>(step == 0 ? wv[t][1].x : wv[t][1].z);",
            "a[1] = static_cast<uint32_t>(step == 0 ? wv[t][0].y : wv[t][0].w);",
            0,
            FEW_ROWS,
        ),
        # the few-rows kernel's last warp never writes its partial sums: with one 64-byte chunk of K they are
        # zeros, so only static shared memory that does not start as zeros (refilled each block) shows it
        (
            "      for (int r = 0; r < 4; ++r) partial[warp][lane][(t * 2 + u) * 4 + r] = acc[t][u][r];",
            "      for (int r = 0; r < 4; ++r)\n"
            "        if (warp < kFewWarps - 1) partial[warp][lane][(t * 2 + u) * 4 + r] = acc[t][u][r];",
            0,
            FEW_ROWS_ONE_CHUNK,
        ),
    ],
    ids=["ldmatrix-order", "no-barrier", "wait-too-short", "few-rows-fragment", "unwritten-shared"],
)
def test_emulation_catches_broken_kernels(old, new, late, shape):
    """Each mutation of the kernel source fails here, on a shape the unmutated kernel passes (the tests above),
    so the emulation does run what it claims to check."""
    broken = emu.load(emu.build(source=_broken(old, new)), OPTIN_SMEM, SMS)
    broken.sq_emu_schedule(0, 0, late, 1)
    broken.sq_onnx_cuda_select_few_rows(custom_ops.FEW_ROWS_MMA)  # a library of its own: nothing to restore
    got, expect = cases.gemm_case(broken, MEM, *shape, np.float32, seed=1)
    assert not np.array_equal(got, expect)


def test_the_mutation_shapes_pass_unmutated(lib):
    with cases.few_rows_on_tensor_cores(lib):
        for shape in (MMA_TILE, FEW_ROWS, FEW_ROWS_ONE_CHUNK):
            got, expect = cases.gemm_case(lib, MEM, *shape, np.float32, seed=1)
            np.testing.assert_array_equal(got, expect)


# Run under the sanitizer by test_kernels_stay_in_bounds: a GEMM told K is 16 more than its operands hold.
_OVERFLOW = """
import sys; sys.path.insert(0, "tests")
import numpy as np, cuda_emulation as emu, cuda_kernel_cases as cases
lib = emu.load(emu.build(emu.ASAN_FLAGS), 99 * 1024, 4)
xq, xs, wq, ws, b = cases.gemm_operands(17, 129, 80, np.float32, 1)
y = np.empty((17, 129), np.float32)
lib.sq_onnx_cuda_int8_matmul_dequant(0, *(a.ctypes.data for a in (xq, xs, wq, ws, b)), 17, 129, 96, y.ctypes.data, None)
"""


@pytest.mark.skipif(SANITIZE, reason="already running under the sanitizer")
def test_kernels_stay_in_bounds():
    """This module again, built with AddressSanitizer (preloaded) and UndefinedBehaviorSanitizer: a read or
    write past any operand (numpy's exact-size buffers) or past the block's shared memory, a signed
    overflow or an index past a fixed-size array aborts that run. First, that it does catch such a read."""
    runtime = emu.asan_runtime()
    if runtime is None:
        assert not REQUIRED, "SQ_ONNX_REQUIRE_OPS=1 but the compiler has no AddressSanitizer runtime"
        pytest.skip("the compiler has no AddressSanitizer runtime")
    env = dict(
        os.environ, LD_PRELOAD=runtime, ASAN_OPTIONS="detect_leaks=0", SQ_ONNX_EMULATION_SANITIZE="address"
    )
    caught = subprocess.run(
        [sys.executable, "-c", _OVERFLOW], env=env, capture_output=True, text=True, cwd=emu.ROOT
    )
    assert caught.returncode != 0 and "heap-buffer-overflow" in caught.stderr, caught.stderr[-3000:]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-x", __file__, "-k", "not thread_order"],
        env=env,
        capture_output=True,
        text=True,
        cwd=emu.ROOT,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout and "AddressSanitizer" not in done.stderr
