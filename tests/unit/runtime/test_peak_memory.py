"""A conversion reports its own peak memory, not the high-water mark of earlier work in the same process."""

from __future__ import annotations

import numpy as np
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.runtime.peak_memory import peak_rss_mb, reset_peak_rss

if not reset_peak_rss():
    pytest.skip("no resettable high-water mark here (/proc/self/clear_refs)", allow_module_level=True)


def _touch_and_free(mb: int) -> float:
    block = np.ones(mb * 2**20 // 8)  # written, so resident
    high = peak_rss_mb()
    del block
    return high


def test_reset_lowers_the_peak():
    high = _touch_and_free(400)
    reset_peak_rss()
    assert peak_rss_mb() < high - 300


def test_conversion_reports_its_own_peak(llama_dir, tmp_path, calib_ids):
    high = _touch_and_free(600)
    result = convert(
        llama_dir / "model.onnx",
        tmp_path / "w8.onnx",
        Recipe(scheme="w8a8", samples=2),
        calibration=calib_ids,
    )
    assert 0 < result.peak_rss_mb < high - 300
