"""The custom-op library as built: it loads on this machine whatever its GPU, exports only its entry points,
carries the CUDA kernels (and the CUTLASS Hopper GEMM) when the build had nvcc, and its CUDA entry points
answer cleanly where there is no GPU. Skips without the library unless SQ_ONNX_REQUIRE_OPS=1 (CI)."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import kernel_reference as ref
import pytest

from sq_onnx.runtime import custom_ops

REQUIRED = os.environ.get("SQ_ONNX_REQUIRE_OPS") == "1"
if not custom_ops.available():
    if REQUIRED:
        raise RuntimeError("SQ_ONNX_REQUIRE_OPS=1 but the sq_onnx custom-op library was not built")
    pytest.skip("custom-op library not built", allow_module_level=True)


def _nvcc_present() -> bool:
    """Where CMake's check_language(CUDA) looks: $CUDACXX, nvcc on the PATH, /usr/local/cuda."""
    return bool(
        os.environ.get("CUDACXX") or shutil.which("nvcc") or os.path.exists("/usr/local/cuda/bin/nvcc")
    )


def exported_symbols() -> set[str]:
    """The library's dynamic symbols (nm -D); skips where binutils are missing."""
    nm = shutil.which("nm")
    if nm is None:
        pytest.skip("no nm (binutils) to list the library's symbols")
    out = subprocess.run(
        [nm, "-D", "--defined-only", str(custom_ops.library_path())],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_only_entry_points_are_exported():
    names = exported_symbols()
    assert "RegisterCustomOps" in names
    stray = {n for n in names if n != "RegisterCustomOps" and not n.startswith("sq_onnx_")}
    assert not stray, (
        f"symbols leak out of the library (the static CUDA runtime's would clash): {sorted(stray)[:10]}"
    )


# Entry points only tests/ and tools/ call: exported by the SQ_ONNX_TEST_HOOKS=ON build alone.
HOOK_SYMBOLS = {"sq_onnx_cpu_select_isa", "sq_onnx_cpu_best_isa", "sq_onnx_cpu_last_gemm_weights"}
CUDA_HOOK_SYMBOLS = {
    "sq_onnx_cuda_select_gemm",
    "sq_onnx_cuda_int8_matmul_dequant",
    "sq_onnx_cuda_sm90_accepts",
}


def test_test_entry_points_are_exported_only_by_the_test_build():
    names = exported_symbols()
    hooks = HOOK_SYMBOLS | (CUDA_HOOK_SYMBOLS if custom_ops.built_with_cuda() else set())
    assert {"RegisterCustomOps", "sq_onnx_cpu_isa", "sq_onnx_has_test_hooks"} <= names
    if custom_ops.has_test_hooks():
        assert hooks <= names
    else:
        assert not names & (HOOK_SYMBOLS | CUDA_HOOK_SYMBOLS)
    if REQUIRED:  # tools/dev.sh (and so CI) builds the test entry points in
        assert custom_ops.has_test_hooks()


@pytest.mark.skipif(not REQUIRED, reason="only where the build must be complete (SQ_ONNX_REQUIRE_OPS=1)")
def test_cuda_kernels_are_built_when_nvcc_is_there():
    if not _nvcc_present() or os.environ.get("SQ_ONNX_CUDA", "").upper() == "OFF":
        pytest.skip("no nvcc at build time")
    assert custom_ops.built_with_cuda()
    if os.environ.get("SQ_ONNX_SM90_GEMM", "").upper() != "OFF":
        assert custom_ops.built_with_sm90_gemm(), "CUTLASS headers could not be had (see the pip install log)"


def test_cuda_entry_points_answer_without_a_gpu():
    """With no usable GPU the Hopper GEMM cannot be selected and the launchers return an error code: the
    static CUDA runtime reports 'no driver / no device' instead of taking the process down."""
    if not custom_ops.built_with_cuda() or not custom_ops.has_test_hooks():
        pytest.skip("library built without CUDA or without its test entry points")
    if custom_ops.cuda_device_present():
        pytest.skip("a GPU is present: tests/kernels/test_cuda_kernels.py covers the launchers")
    lib = custom_ops.cuda_launchers()
    assert lib.sq_onnx_cuda_select_gemm(2) == 1
    assert lib.sq_onnx_cuda_select_gemm(7) == 1
    assert lib.sq_onnx_cuda_select_gemm(1) == 0
    assert lib.sq_onnx_cuda_select_few_rows(custom_ops.FEW_ROWS_MMA) == 0  # host-side: taken without a GPU
    assert lib.sq_onnx_cuda_select_few_rows(7) == 1
    assert lib.sq_onnx_cuda_select_few_rows(custom_ops.FEW_ROWS_DP4A) == 0
    y = ctypes.create_string_buffer(64)
    rc = lib.sq_onnx_cuda_quantize_per_token(0, None, None, 4, 4, None, y, None)
    assert rc == 1


def test_hopper_gemm_takes_the_shapes_it_should():
    """CUTLASS's host-side checks (can_implement, no workspace) on the shapes the GPU tests and LLMs use; no
    GPU needed. A refusal here would mean the Hopper path silently falls back to mma.sync."""
    if not custom_ops.built_with_sm90_gemm() or not custom_ops.has_test_hooks():
        pytest.skip("library built without the CUTLASS Hopper GEMM or without its test entry points")
    lib = custom_ops.cuda_launchers()
    takes = list(ref.SM90_SHAPES)
    takes += [(m, n, k) for m in (256, 2048) for k, n in ((4096, 4096), (4096, 11008), (11008, 4096))]
    for m, n, k in takes:
        assert lib.sq_onnx_cuda_sm90_accepts(m, n, k) == 0, (m, n, k)
    for m, n, k in [(32, 100, 64), (32, 128, 40), (0, 128, 64), (2**31, 128, 64)]:
        assert lib.sq_onnx_cuda_sm90_accepts(m, n, k) == 1, (m, n, k)
