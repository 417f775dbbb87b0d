"""The CPU line of every bench reading: the widest vector level numpy's CPUID reading reports."""

from __future__ import annotations

import platform

import pytest

from sq_onnx.runtime.cpu_info import _vector_isa, cpu_description


@pytest.mark.parametrize(
    ("features", "isa"),
    [
        ({"AVX2": True, "AVX512F": True, "AVX512VNNI": True}, "AVX-512 VNNI"),
        ({"AVX2": True, "AVX512F": True, "AVX512VNNI": False}, "AVX-512"),
        ({"AVX2": True, "AVX512F": False}, "AVX2"),
        ({"AVX2": False}, "no AVX2"),
    ],
)
def test_vector_isa_is_the_widest_level(features, isa) -> None:
    assert _vector_isa(features) == isa


def test_cpu_description_names_this_cpu() -> None:
    text = cpu_description()
    assert text and ", " in text
    if platform.machine() == "x86_64":
        assert text.rsplit(", ", 1)[1] in ("AVX-512 VNNI", "AVX-512", "AVX2", "no AVX2")
