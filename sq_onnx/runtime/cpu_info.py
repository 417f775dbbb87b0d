"""The CPU a benchmark ran on, as this process sees it: the model name and the widest vector instructions its
CPUID reports. Speed ratios depend on both (ORT's MLAS picks its kernels from CPUID), so every bench reading
carries them; under ``tools/avx2_only.sh`` the instructions read as an AVX2-only CPU's."""

from __future__ import annotations

import platform
from pathlib import Path


def _model_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _vector_isa(features: dict[str, bool]) -> str:
    """The widest x86 vector level among numpy's CPUID-derived features (their names)."""
    if features.get("AVX512F"):
        return "AVX-512 VNNI" if features.get("AVX512VNNI") else "AVX-512"
    if features.get("AVX2"):
        return "AVX2"
    return "no AVX2"


def cpu_features() -> dict[str, bool]:
    """numpy's reading of CPUID at import (``AVX2``, ``AVX512F``, ``AVX512VNNI``, ...): what this process sees."""
    try:
        from numpy._core._multiarray_umath import __cpu_features__ as features
    except ImportError:  # numpy < 2
        from numpy.core._multiarray_umath import __cpu_features__ as features
    return dict(features)


def cpu_description() -> str:
    """E.g. ``AMD EPYC, AVX-512 VNNI`` (x86-64) or ``aarch64`` elsewhere."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"{_model_name()}, {platform.machine()}"
    return f"{_model_name()}, {_vector_isa(cpu_features())}"
