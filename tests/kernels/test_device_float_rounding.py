"""Every float32 add, subtract and multiply in our device code carries an explicit rounding mode, and nothing is
fused into an fma: the GPU kernels must round each step the way the CPU reference does, or the bit-exact GPU
tests fail (rarely, at the last bit of a product). nvcc contracts a plain `a * b + c` into one fma by default,
and did so in the Hopper GEMM's epilogue before it took its own rounded functors. This reads the PTX nvcc emits;
no GPU needed, only nvcc (and CUTLASS's headers for the Hopper file)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "custom_ops" / "src"
NVCC = shutil.which("nvcc") or next(
    (p for p in (os.environ.get("CUDACXX"), "/usr/local/cuda/bin/nvcc") if p and os.path.exists(p)), None
)
pytestmark = pytest.mark.skipif(NVCC is None, reason="no nvcc to compile the CUDA sources to PTX")

# A float32 op that ptxas may still fuse (no .rn/.rz/...), or a fused one already.
CONTRACTIBLE = re.compile(r"^\s*(?:(?:add|sub|mul)(?:\.ftz)?(?:\.sat)?\.f32|fma\.\w+(?:\.\w+)*\.f32)\s", re.M)
ROUNDED_MUL = re.compile(r"^\s*mul\.rn\.f32\s", re.M)


def _cutlass_source() -> Path | None:
    """The CUTLASS tree the build uses (custom_ops/cmake/CutlassHeaders.cmake): $SQ_ONNX_CUTLASS_DIR, else the
    headers the build cached in the user's cache folder."""
    if os.environ.get("SQ_ONNX_CUTLASS_DIR"):
        return Path(os.environ["SQ_ONNX_CUTLASS_DIR"])
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sq-onnx"
    found = sorted(cache.glob("cutlass-*/cutlass_library/source"))
    return found[-1] if found else None


def _ptx(source: str, arch: str, tmp_path: Path, *flags: str) -> str:
    out = tmp_path / f"{source}.{arch}.ptx"
    cmd = [
        NVCC,
        "-ptx",
        f"-arch={arch}",
        "-O3",
        "-DNDEBUG",
        "-std=c++17",
        f"-I{SRC}",
        *flags,
        str(SRC / source),
    ]
    done = subprocess.run([*cmd, "-o", str(out)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return out.read_text()


def _assert_rounded(ptx: str, where: str) -> None:
    bad = CONTRACTIBLE.findall(ptx)
    assert not bad, f"{where}: {len(bad)} float32 ops an fma may absorb, e.g. {bad[0].strip()!r}"
    assert ROUNDED_MUL.search(ptx), f"{where}: no rounded multiply found; did the epilogue move?"


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_kernels_round_every_float_op(arch, tmp_path):
    _assert_rounded(_ptx("cuda_kernels.cu", arch, tmp_path), f"cuda_kernels.cu ({arch})")


def test_hopper_gemm_epilogue_rounds_every_float_op(tmp_path):
    root = _cutlass_source()
    if root is None or not (root / "include" / "cutlass" / "cutlass.h").exists():
        pytest.skip("no CUTLASS headers (the build fetches them into the user cache; SQ_ONNX_CUTLASS_DIR)")
    includes = [f"-isystem={root / 'include'}", f"-isystem={root / 'tools' / 'util' / 'include'}"]
    ptx = _ptx("cuda_gemm_sm90.cu", "sm_90a", tmp_path, "--expt-relaxed-constexpr", *includes)
    _assert_rounded(ptx, "cuda_gemm_sm90.cu")
