"""Builds custom_ops/src/cuda_kernels.cu as C++ for the CPU emulation in tests/cuda_emulation/ and loads it.

The kernels' own source runs, unchanged but for mechanical rewrites the C++ compiler needs
(`kernel<<<cfg>>>(args)` becomes a call, `extern __shared__ T name[]` a pointer to the block's dynamic
shared memory, `__shared__ T name[n]` a reference to storage the emulator refills at each block), so the index arithmetic, bounds, tiling and launch choices that only a GPU could run are
checked here, bit for bit, against the numpy reference."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "custom_ops" / "src" / "cuda_kernels.cu"
EMULATION = Path(__file__).resolve().parent / "cuda_emulation"
# CUDA allows 65,535 in grid.y; 3 here, so the GEMM's multi-launch path runs on small problems.
MAX_GRID_Y = 3
FLAGS = [
    "-std=c++17",
    "-O1",
    "-fPIC",
    "-shared",
    "-ffp-contract=off",  # no fused multiply-adds, like the kernels' __f*_rn arithmetic
    "-fvisibility=hidden",
    "-DSQ_ONNX_CUDA_ON_CPU",
    "-DSQ_ONNX_TEST_HOOKS",  # the C entry points the tests call
    f"-DSQ_ONNX_CUDA_MAX_GRID_Y={MAX_GRID_Y}",
]

# AddressSanitizer, and UndefinedBehaviorSanitizer made fatal (signed overflow, indices past a fixed-size
# array, misaligned accesses, float-to-int conversions out of range).
ASAN_FLAGS = (
    "-fsanitize=address,undefined,float-cast-overflow,bounds-strict",
    "-fno-sanitize-recover=all",
    "-fno-omit-frame-pointer",
)

_LAUNCH = re.compile(r"([\w:]+(?:<[^<>;()]*>)?)<<<(.*?)>>>\(")
_EXTERN_SHARED = re.compile(r"extern __shared__ (?:__align__\(\d+\) )?(\w+) (\w+)\[\];")
_STATIC_SHARED = re.compile(r"(?<!extern )__shared__ (\w+) (\w+)((?:\[\w+\])+);")


def compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "g++"))


def rewrite(source: str) -> str:
    """The two rewrites; fails if the source has a launch or dynamic shared array they do not cover."""
    launches = source.count("<<<")
    out, n = _LAUNCH.subn(r"::sq_emu::launch(\1, \2, ", source)
    if n != launches:
        raise RuntimeError(f"rewrote {n} of {launches} kernel launches")
    shared = source.count("extern __shared__")
    out, n = _EXTERN_SHARED.subn(r"\1* \2 = ::sq_emu::dynamic_shared<\1>();", out)
    if n != shared:
        raise RuntimeError(f"rewrote {n} of {shared} dynamic shared arrays")
    # Static ones: storage per declaration (its line), refilled with 0xA5 at each block's start.
    lines = out.splitlines(keepends=True)
    for i, line in enumerate(lines):
        lines[i] = _STATIC_SHARED.sub(rf"auto& \2 = ::sq_emu::block_shared<\1\3, {i + 1}>();", line)
    out = "".join(lines)
    if "__shared__" in out:
        raise RuntimeError("a __shared__ declaration the rewrite does not cover")
    return out


def build(extra_flags: tuple[str, ...] = (), source: str | None = None) -> Path:
    """The emulated library, built once per source text and flags into the temp folder; `source`: a
    variant of cuda_kernels.cu (the tests' deliberately broken kernels)."""
    cxx = compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler")
    source = rewrite(SOURCE.read_text() if source is None else source)
    files = [EMULATION / "sq_cuda_emu.cc", *EMULATION.glob("*.h"), *(EMULATION / "include").glob("*.h")]
    key = hashlib.sha256(
        "\0".join([source, *(f.read_text() for f in sorted(files)), *FLAGS, *extra_flags]).encode()
    ).hexdigest()[:16]
    out_dir = Path(tempfile.gettempdir()) / "sq_onnx_cuda_emulation" / key
    lib = out_dir / "libsq_cuda_emu.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    rewritten = out_dir / "cuda_kernels_emulated.cc"
    rewritten.write_text(source)
    tmp = out_dir / f"lib.{os.getpid()}.so"
    cmd = [
        cxx,
        *FLAGS,
        *extra_flags,
        f"-I{EMULATION / 'include'}",
        f"-I{EMULATION}",
        f"-I{SOURCE.parent}",
        str(rewritten),
        str(EMULATION / "sq_cuda_emu.cc"),
        "-o",
        str(tmp),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"emulated build failed:\n{' '.join(cmd)}\n{done.stderr[-4000:]}")
    tmp.replace(lib)
    return lib


def asan_runtime() -> str | None:
    """The compiler's AddressSanitizer runtime, to preload into a Python that loads an ASan build."""
    cxx = compiler()
    if cxx is None:
        return None
    done = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True)
    path = Path(done.stdout.strip())
    return str(path) if done.returncode == 0 and path.is_absolute() and path.exists() else None


def load(path: Path, optin_smem: int, sm_count: int) -> ctypes.CDLL:
    """The library with the same C entry points as the real one (argument types set) and the emulation's
    controls; the device's opt-in shared memory and SM count are fixed at the first launch."""
    from sq_onnx.runtime import custom_ops

    lib = custom_ops.cuda_launchers(path)
    lib.sq_emu_configure.argtypes = [ctypes.c_int, ctypes.c_int]
    # (order: 0 by thread id, 1 reversed, 2 shuffled; lockstep: 0 warp-serial, 1 lockstep; cp.async late; seed)
    lib.sq_emu_schedule.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_uint]
    lib.sq_emu_launches.restype = ctypes.c_long
    lib.sq_emu_last_fault.restype = ctypes.c_char_p
    u = ctypes.POINTER(ctypes.c_uint)
    lib.sq_emu_last_launch.argtypes = [u, u, u, ctypes.POINTER(ctypes.c_ulong)]
    lib.sq_emu_configure(optin_smem, sm_count)
    return lib


def last_launch(lib: ctypes.CDLL) -> tuple[int, int, int, int]:
    """(grid.x, grid.y, threads per block, dynamic shared memory) of the last launch."""
    gx, gy, threads, smem = ctypes.c_uint(), ctypes.c_uint(), ctypes.c_uint(), ctypes.c_ulong()
    lib.sq_emu_last_launch(ctypes.byref(gx), ctypes.byref(gy), ctypes.byref(threads), ctypes.byref(smem))
    return gx.value, gy.value, threads.value, smem.value
