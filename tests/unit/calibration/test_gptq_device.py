"""GPTQ's maths on a torch device (the GPU when a conversion runs on CUDA) give what numpy gives on the CPU, to
float rounding: the Gram sums (the same float32 products summed in float64), and the inverse Hessian's factor, the
error feedback and the refinement (the same codes, the scales to rounding). Tested here through the torch code
path on the CPU device; on a machine with a CUDA GPU also on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sq_onnx import Recipe, convert
from sq_onnx.calibration.gptq_method import batch_grams
from sq_onnx.calibration.segment_runner import SegmentInputs
from sq_onnx.quant.gptq import dampened_hessian, gptq_quantize
from sq_onnx.runtime import device
from sq_onnx.runtime.device import gptq_device

from conftest import ids_feed, rel_error, run

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
    correction = want.target(w) - w  # the solve's share, to its float32 rounding in the target
    np.testing.assert_allclose(got.target(w) - w, correction, rtol=2e-4, atol=1e-6 * float(np.abs(w).max()))


def test_the_grams_stay_in_numpy_unless_the_sessions_run_on_cuda(monkeypatch):
    assert gptq_device() is None  # sessions on the CPU
    monkeypatch.setattr(device, "_torch_cuda", lambda: True)
    token = device._PROVIDERS.set(device.PROVIDERS["cuda"])
    try:
        assert gptq_device() == "cuda"
        monkeypatch.setattr(device, "_torch_cuda", lambda: False)  # a CPU-only torch beside onnxruntime-gpu
        assert gptq_device() is None
    finally:
        device._PROVIDERS.reset(token)


@pytest.mark.parametrize("where", DEVICES)
@pytest.mark.parametrize(
    ("act_order", "symmetric", "refine"), [(True, False, 3), (False, True, 2), (True, True, 0)]
)
def test_gptq_on_a_torch_device_matches_numpy(where, act_order, symmetric, refine):
    rng = np.random.default_rng(11)
    k, n = 320, 48  # K padded to three blocks of 128
    x = rng.normal(size=(1024, k)).astype(np.float32) @ (np.eye(k) + rng.normal(0, 0.2, (k, k))).astype(
        np.float32
    )
    x[:, 17] = 0.0  # a channel calibration never saw active
    h = x.T.astype(np.float64) @ x
    w = rng.normal(0, 0.1, (k, n)).astype(np.float32)
    args = (w, h, 4, 128, symmetric, True, act_order)
    want = gptq_quantize(*args, refine_rounds=refine)
    got = gptq_quantize(*args, refine_rounds=refine, device=where)
    assert got.packed.shape == want.packed.shape and isinstance(got.scales, np.ndarray)
    codes_equal = float(np.mean(got.q == want.q))
    assert codes_equal > 0.999, f"{codes_equal:.4%} of the codes equal"
    np.testing.assert_allclose(got.scales, want.scales, rtol=1e-4)
    assert (got.zero_points is None) == symmetric
    hd, _ = dampened_hessian(h)

    def loss(bq) -> float:
        r = (w - bq.dequantize()).astype(np.float64)
        return float(np.einsum("kn,kj,jn->", r, hd, r))

    assert loss(got) == pytest.approx(loss(want), rel=1e-4)


def test_a_conversion_runs_gptq_where_gptq_device_says(llama_dir, tmp_path, calib_ids, monkeypatch):
    """The whole W4 path with GPTQ's maths on a torch device (CPU here) is as accurate as numpy's. Not the same
    codes: on this tiny model with 4 samples GPTQ is chaotic in its Hessians' rounding (numpy's own Hessians
    scaled by 1 + 1e-6 noise left 63-100% of the codes equal per linear, outputs 2-3% apart, as the torch
    device's sums do); each step alone matches numpy (the tests above)."""
    import sq_onnx.quant.gptq_ops as gptq_ops
    import sq_onnx.quantize_model as qm

    recipe = Recipe(samples=4, block_size=32, lm_head="fp")
    numpy_out, torch_out = tmp_path / "numpy.onnx", tmp_path / "torch.onnx"
    convert(llama_dir / "model.onnx", numpy_out, recipe, calibration=calib_ids)
    seen = []
    real = gptq_ops.gptq_ops
    monkeypatch.setattr(gptq_ops, "gptq_ops", lambda device: seen.append(device) or real(device))
    monkeypatch.setattr(qm, "gptq_device", lambda: "cpu")
    convert(llama_dir / "model.onnx", torch_out, recipe, calibration=calib_ids)
    assert seen and set(seen) == {"cpu"}
    for seed in range(3):
        feed = ids_feed(seq=32, seed=seed)
        ref, by_numpy, by_torch = (run(m, feed) for m in (llama_dir / "model.onnx", numpy_out, torch_out))
        numpy_error, torch_error = rel_error(ref, by_numpy), rel_error(ref, by_torch)
        assert torch_error < 1.15 * numpy_error, (seed, numpy_error, torch_error)
        assert rel_error(by_numpy, by_torch) < numpy_error
