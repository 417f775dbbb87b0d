"""Find and register the sq_onnx custom-op library (``libsq_onnx_ops.so``, built from ``custom_ops/``).

Models converted with ``--kernels sq_onnx`` use ops of the ``sq_onnx`` domain; every other model runs on
stock ONNX Runtime and never needs the library. ``pip install`` builds it when ONNX Runtime's headers
can be had (see custom_ops/cmake/OrtHeaders.cmake); where they cannot, the rest of sq-onnx still works.
"""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path

from sq_onnx.errors import SqOnnxError
from sq_onnx.passes.graph_edit import SQ

DOMAIN = SQ  # the passes emit the ops in this domain; the library registers it

LIBRARY_NAME = "libsq_onnx_ops.so"
ENV_LIBRARY = "SQ_ONNX_OPS_LIB"


@functools.cache
def library_path() -> Path | None:
    """The built library: $SQ_ONNX_OPS_LIB, else beside the installed package (wheel or editable install)."""
    if os.environ.get(ENV_LIBRARY):
        path = Path(os.environ[ENV_LIBRARY])
        return path if path.is_file() else None
    beside = Path(__file__).resolve().parents[1] / LIBRARY_NAME  # a wheel installs it in the package
    if beside.is_file():
        return beside
    try:  # editable installs keep compiled files in site-packages, away from the sources
        from importlib.metadata import distribution

        for f in distribution("sq-onnx").files or []:
            if f.name == LIBRARY_NAME:
                located = Path(str(f.locate()))
                if located.is_file():
                    return located
    except Exception:  # noqa: BLE001 - not installed as a distribution: no library
        pass
    return None


def available() -> bool:
    return library_path() is not None


def require_library() -> Path:
    path = library_path()
    if path is None:
        raise SqOnnxError(
            "this model uses sq_onnx custom ops, but the custom-op library was not built "
            "(pip install builds it when ONNX Runtime's headers can be had; see README, 'Fused kernels')."
        )
    return path


def register_custom_ops(session_options) -> None:
    """Register the sq_onnx ops on an ``onnxruntime.SessionOptions`` (raises if the library is missing)."""
    session_options.register_custom_ops_library(str(require_library()))


def built_with_cuda() -> bool:
    path = library_path()
    return bool(path and ctypes.CDLL(str(path)).sq_onnx_built_with_cuda())


def built_with_sm90_gemm() -> bool:
    """Whether the library carries the CUTLASS Hopper (sm_90a) int8 GEMM, an opt-in path
    (``SQ_ONNX_CUDA_GEMM=sm90``) beside the default mma.sync kernel."""
    path = library_path()
    return bool(path and ctypes.CDLL(str(path)).sq_onnx_built_with_sm90_gemm())


def has_test_hooks(path: Path | None = None) -> bool:
    """Whether the library was built with its test and benchmark entry points (``SQ_ONNX_TEST_HOOKS=ON``, as
    tools/dev.sh builds it): forcing a kernel path, asking which one ran, calling a CUDA kernel directly."""
    path = path or library_path()
    if not path:
        return False
    lib = ctypes.CDLL(str(path))
    probe = getattr(lib, "sq_onnx_has_test_hooks", None)
    # a partial build (the tests' CPU emulation of the CUDA source) has no probe: look for a hook itself
    return bool(probe()) if probe is not None else hasattr(lib, "sq_onnx_cuda_select_gemm")


def _hooks(path: Path | None = None) -> ctypes.CDLL:
    """The library, refusing a build without the test hooks in one sentence."""
    path = path or require_library()
    if not has_test_hooks(path):
        raise RuntimeError(
            f"{path} was built without its test entry points; rebuild with SQ_ONNX_TEST_HOOKS=ON "
            "(SQ_ONNX_TEST_HOOKS=ON pip install -e ., as tools/dev.sh does)."
        )
    return ctypes.CDLL(str(path))


# The CPU int8 GEMM's instruction sets, lowest first (custom_ops/src/cpu_isa.h; SQ_ONNX_CPU_ISA takes the names).
CPU_ISAS = ("scalar", "avx2", "avxvnni", "avx512vnni")


def cpu_isa_control() -> ctypes.CDLL:
    """The library's switch of the CPU GEMM's instruction set, for tests and tools/bench_cpu_kernels.py:
    ``sq_onnx_cpu_select_isa(i)`` (0 = taken, 1 = this CPU lacks it), ``sq_onnx_cpu_isa()``,
    ``sq_onnx_cpu_best_isa()``; ``i`` indexes CPU_ISAS. It acts on the copy ONNX Runtime loaded too.
    ``sq_onnx_cpu_last_gemm_weights()`` says how the last GEMM took W (WEIGHTS_*). Needs the test hooks."""
    lib = _hooks()
    lib.sq_onnx_cpu_select_isa.argtypes = [ctypes.c_int]
    lib.sq_onnx_cpu_isa.argtypes = []
    lib.sq_onnx_cpu_best_isa.argtypes = []
    lib.sq_onnx_cpu_last_gemm_weights.argtypes = []
    return lib


def cpu_kernels_description() -> str:
    """What the CPU kernels run with in this process, for benchmark reports: the int8 GEMM's instruction set
    (after SQ_ONNX_CPU_ISA) and whether weights are packed at session creation (SQ_ONNX_CPU_PREPACK=1)."""
    isa = CPU_ISAS[ctypes.CDLL(str(require_library())).sq_onnx_cpu_isa()]
    prepack = os.environ.get("SQ_ONNX_CPU_PREPACK") == "1" and isa in ("avxvnni", "avx512vnni")
    return isa + (", weights prepacked" if prepack else "")


# sq_onnx_cpu_last_gemm_weights answers (custom_ops/src/cpu_kernels.h): W read as given, repacked whole within
# the call (VNNI, many rows), packed once when the session was made (VNNI, W an initializer, opt-in), or packed
# a block of columns at a time within the call (VNNI, tens of rows).
WEIGHTS_AS_GIVEN, WEIGHTS_REPACKED, WEIGHTS_PREPACKED, WEIGHTS_PACKED_BY_BLOCK = 0, 1, 2, 3


# sq_onnx_cuda_select_gemm paths, sq_onnx_cuda_select_few_rows paths (5-16 rows) and
# sq_onnx_cuda_last_gemm_kernel answers (custom_ops/src/cuda_kernels.h).
GEMM_MMA, GEMM_SM90 = 1, 2
FEW_ROWS_DP4A, FEW_ROWS_MMA = 1, 2
SERVED_GENERIC, SERVED_DP4A, SERVED_MMA, SERVED_SM90, SERVED_FEW_ROWS_MMA = 1, 2, 3, 4, 5


def cuda_launchers(path: Path | None = None) -> ctypes.CDLL:
    """The library's C entry points to the CUDA kernels (device pointers, a cudaStream_t; 0 = success),
    with their signatures, for the GPU tests and tools/bench_cuda_kernels.py; `path`: another build with
    the same entry points (the tests' CPU emulation of the kernels). Needs the test hooks."""
    lib = _hooks(path)
    p, i64, f, flag = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    lib.sq_onnx_cuda_int8_matmul_dequant.argtypes = [flag, p, p, p, p, p, i64, i64, i64, p, p]
    lib.sq_onnx_cuda_rmsnorm_quant.argtypes = [flag, p, p, p, p, f, i64, i64, p, p, p, p]
    lib.sq_onnx_cuda_layernorm_quant.argtypes = [flag, p, p, p, f, i64, i64, p, p, p]
    lib.sq_onnx_cuda_quantize_per_token.argtypes = [flag, p, p, i64, i64, p, p, p]
    lib.sq_onnx_cuda_select_gemm.argtypes = [flag]  # GEMM_*; 0 = taken
    lib.sq_onnx_cuda_select_few_rows.argtypes = [flag]  # FEW_ROWS_*; 0 = taken
    lib.sq_onnx_cuda_last_gemm_kernel.argtypes = []  # SERVED_*
    lib.sq_onnx_cuda_sm90_accepts.argtypes = [i64, i64, i64]  # 0 yes, 1/2 no, -1 not built
    return lib


@functools.cache
def cuda_device_present() -> bool:
    """Whether a CUDA GPU is usable, asked of the driver (libcuda) itself: ORT's
    ``get_available_providers()`` lists CUDA on machines without any GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return False
    return count.value > 0
