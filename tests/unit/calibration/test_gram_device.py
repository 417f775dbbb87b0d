"""GPTQ's Gram sums on a torch device (the GPU when a conversion runs on CUDA) give what numpy gives on the CPU,
to float rounding: the same float32 products summed in float64. Tested here through the torch code path on the
CPU device; on a machine with a CUDA GPU also on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sq_onnx.calibration.gptq_method import batch_grams
from sq_onnx.calibration.segment_runner import SegmentInputs
from sq_onnx.runtime import device
from sq_onnx.runtime.device import gram_device

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
]


def _inputs(k: int, rng: np.random.Generator, samples: int = 5):
    xf = [
        rng.normal(size=(1, 37, k)).astype(np.float32) * rng.uniform(0.1, 20, k).astype(np.float32)
        for _ in range(samples)
    ]
    xq = [x + 0.05 * rng.normal(size=x.shape).astype(np.float32) for x in xf]
    return xq, xf


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize("n", [8, 40], ids=["narrowing (shift)", "cross"])
def test_grams_on_a_torch_device_match_numpy(where, n, monkeypatch):
    import sq_onnx.calibration.gptq_method as gm

    monkeypatch.setattr(gm, "GRAM_ROWS", 64)  # several blocks per flush, as at real sizes
    rng = np.random.default_rng(7)
    k = 48
    xq, xf = _inputs(k, rng)
    w = rng.normal(size=(k, n)).astype(np.float32)
    want = batch_grams(SegmentInputs.of(0, "x", k, xq, xf), holdout=2, weight=w)
    got = batch_grams(SegmentInputs.of(0, "x", k, xq, xf), holdout=2, weight=w, device=where)
    scale = float(np.abs(want.hessian).max())
    np.testing.assert_allclose(got.hessian, want.hessian, rtol=1e-5, atol=1e-6 * scale)
    assert isinstance(got.hessian, np.ndarray) and got.hessian.dtype == np.float32
    for a, b in ((got.cross, want.cross), (got.shift, want.shift), *zip(got.held, want.held, strict=True)):
        assert (a is None) == (b is None)
        if a is not None:
            assert isinstance(a, np.ndarray)
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6 * float(np.abs(b).max()))
    np.testing.assert_allclose(got.target(w), want.target(w), rtol=1e-4, atol=1e-5)


def test_the_grams_stay_in_numpy_unless_the_sessions_run_on_cuda(monkeypatch):
    assert gram_device() is None  # sessions on the CPU
    monkeypatch.setattr(device, "_torch_cuda", lambda: True)
    token = device._PROVIDERS.set(device.PROVIDERS["cuda"])
    try:
        assert gram_device() == "cuda"
        monkeypatch.setattr(device, "_torch_cuda", lambda: False)  # a CPU-only torch beside onnxruntime-gpu
        assert gram_device() is None
    finally:
        device._PROVIDERS.reset(token)
