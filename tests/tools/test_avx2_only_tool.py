"""tools/avx2_only.sh: the command it runs sees a CPU without AVX-512 (numpy's own CPUID reading says so) but
with AVX2, while the same command outside sees this CPU as it is; a real segmentation fault still ends the
process instead of looping in the CPUID handler; programs with SIGSEGV handlers of their own (Python's
faulthandler, GCC) keep working and keep them."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "avx2_only.sh"
CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").is_file() else set()

pytestmark = pytest.mark.skipif(
    platform.machine() != "x86_64"
    or not {"cpuid_fault", "avx2"} <= CPU_FLAGS
    or shutil.which(os.environ.get("CC", "cc")) is None,
    reason="needs an x86-64 CPU with AVX2 whose kernel can make CPUID fault (cpuid_fault), and a C compiler",
)

FEATURES = "from numpy._core._multiarray_umath import __cpu_features__ as f; print(f['AVX512F'], f['AVX2'], f['FMA3'])"


def run(
    args: list[str], tmp_path: Path, masked: bool = True, timeout: int = 120
) -> subprocess.CompletedProcess:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), PYTHON=sys.executable, SQ_AVX2_ONLY_QUIET="1")
    cmd = [str(SCRIPT), *args] if masked else args
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_the_command_sees_avx2_without_avx512(tmp_path) -> None:
    done = run([sys.executable, "-c", FEATURES], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True"]
    assert (tmp_path / "sq-onnx" / "avx2_only.so").is_file()
    from numpy._core._multiarray_umath import __cpu_features__

    if __cpu_features__["AVX512F"]:  # the mask, not the machine, took AVX-512 away
        plain = run([sys.executable, "-c", FEATURES], tmp_path, masked=False)
        assert plain.stdout.split()[0] == "True"


def test_programs_keep_their_own_segv_handlers(tmp_path) -> None:
    done = run([sys.executable, "-X", "faulthandler", "-c", FEATURES], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "True", "True"]
    crash = [sys.executable, "-X", "faulthandler", "-c", "import ctypes; ctypes.string_at(0)"]
    done = run(crash, tmp_path, timeout=30)
    assert done.returncode in (-11, 139)
    assert "Fatal Python error: Segmentation fault" in done.stderr  # faulthandler's own report
    # GCC's cc1 installs a SIGSEGV handler, then reads CPUID for -march=native
    src = tmp_path / "f.c"
    src.write_text("int f(int x) { return x + 1; }\n")
    cc = os.environ.get("CC", "cc")
    done = run([cc, "-march=native", "-O2", "-c", str(src), "-o", str(tmp_path / "f.o")], tmp_path)
    assert done.returncode == 0, done.stderr


def test_bench_readings_name_the_instructions_the_process_sees(tmp_path) -> None:
    """``sq-onnx bench`` records ``cpu``: under the mask it must read AVX2, or a masked reading could pass for a
    native one."""
    code = "from sq_onnx.runtime.cpu_info import cpu_description; print(cpu_description())"
    masked = run([sys.executable, "-c", code], tmp_path)
    assert masked.returncode == 0, masked.stderr
    assert masked.stdout.strip().endswith(", AVX2")


def test_a_real_fault_still_ends_the_process(tmp_path) -> None:
    done = run([sys.executable, "-c", "import ctypes; ctypes.string_at(0)"], tmp_path, timeout=30)
    assert done.returncode in (-11, 139)


def test_the_script_says_what_it_needs(tmp_path) -> None:
    done = subprocess.run([str(SCRIPT)], capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "usage" in done.stderr
