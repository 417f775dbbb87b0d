"""sq-onnx's grids against the spec references (tests/quant_reference.py) and codes known by hand."""

from __future__ import annotations

import numpy as np
import pytest

from sq_onnx.quant.blockwise import BlockQuantized, quantize_blockwise
from sq_onnx.quant.int8 import quantize_per_channel

from quant_reference import ref_dequant, ref_pack, ref_per_channel, ref_rtn, ref_symmetric, ref_unpack


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize(("k", "block"), [(17, 16), (100, 32), (130, 64), (256, 128), (64, 128)])
def test_blockwise_rtn_is_the_reference(bits, symmetric, k, block):
    rng = np.random.default_rng(k + block + bits)
    w = rng.normal(0, 0.5, (k, 9)).astype(np.float32)
    w[rng.integers(0, k)] *= 12.0  # an outlier row
    w[:, 2] = 0.0  # a dead column: every block all zero
    bq = quantize_blockwise(w, bits, block, symmetric)
    if symmetric:
        codes, scales = ref_symmetric(w, bits, block)
        zps = None
        assert bq.zero_points is None
    else:
        codes, scales, zps = ref_rtn(w, bits, block)
        np.testing.assert_array_equal(bq.zero_points, zps)
    np.testing.assert_array_equal(bq.packed, ref_pack(codes, bits))
    np.testing.assert_array_equal(bq.scales, scales)
    want = ref_dequant(codes, scales, zps, bits, k)
    np.testing.assert_array_equal(bq.dequantize(), want)
    # and the bytes ORT reads, unpacked by the spec, are the same weight
    inputs = [None, bq.packed, bq.scales, bq.packed_zero_points()]
    np.testing.assert_array_equal(ref_unpack(inputs, k, 9, bits, block), want)
    # reading the blobs back (the per-layer error does) gives the same weight
    read = BlockQuantized.from_matmulnbits(bq.packed, bq.scales, bq.packed_zero_points(), k, 9, bits, block)
    np.testing.assert_array_equal(read.dequantize(), want)


def test_asymmetric_codes_known_by_hand():
    # one block of 16: 0, 0.25, ..., 3.75 -> scale 0.25, zero point 0, codes 0..15 (both endpoints exact)
    w = (np.arange(16, dtype=np.float32) * 0.25)[:, None]
    bq = quantize_blockwise(w, 4, 16, symmetric=False)
    assert bq.scales[0, 0] == 0.25 and bq.zero_points[0, 0] == 0
    assert bq.q[0, 0].tolist() == list(range(16))
    assert bq.packed[0, 0].tolist() == [(2 * i) | ((2 * i + 1) << 4) for i in range(8)]
    # ties round to even: 0.125 / 0.25 = 0.5 -> 0, 0.375 -> 1.5 -> 2, 0.625 -> 2.5 -> 2
    w2 = w.copy()
    w2[1:4, 0] = [0.125, 0.375, 0.625]
    assert quantize_blockwise(w2, 4, 16, symmetric=False).q[0, 0, :4].tolist() == [0, 0, 2, 2]
    # a block of -1.5 .. 0: range [-1.5, 0], scale 0.1, zero point 15 (0 is exact)
    neg = -(np.arange(16, dtype=np.float32) * 0.1)[:, None]
    bq = quantize_blockwise(neg, 4, 16, symmetric=False)
    assert bq.zero_points[0, 0] == 15 and bq.q[0, 0, 0] == 15 and bq.q[0, 0, 15] == 0
    # all zeros: scale 1, zero point 0, every code 0, exact
    zero = quantize_blockwise(np.zeros((16, 1), np.float32), 4, 16, symmetric=False)
    assert zero.scales[0, 0] == 1.0 and zero.zero_points[0, 0] == 0 and not zero.q.any()
    assert zero.packed_zero_points().tolist() == [0]


def test_symmetric_codes_known_by_hand():
    # largest magnitude -0.8 maps to code 0 (= -8 steps): scale 0.1, zero point 8
    w = np.array([-0.8, 0.7, 0.0, 0.25, 0.35] + [0.0] * 11, np.float32)[:, None]
    bq = quantize_blockwise(w, 4, 16, symmetric=True)
    assert bq.scales[0, 0] == np.float32(0.1)
    assert bq.q[0, 0, :5].tolist() == [0, 15, 8, 10, 12]  # 2.5 -> 2 (even), 3.5 -> 4 (even)
    # largest magnitude positive: the scale is negative, so +0.8 is code 0 too (ORT's convention)
    bq = quantize_blockwise(-w, 4, 16, symmetric=True)
    assert bq.scales[0, 0] == np.float32(-0.1) and bq.q[0, 0, 0] == 0
    # 8 bits: -1.28 -> code 0 with scale 0.01, 1.27 -> 255
    w8 = np.array([-1.28, 1.27] + [0.0] * 14, np.float32)[:, None]
    assert quantize_blockwise(w8, 8, 16, symmetric=True).q[0, 0, :3].tolist() == [0, 255, 128]


def test_zero_points_pack_two_per_byte_low_nibble_first():
    w = np.zeros((48, 1), np.float32)
    w[0:16, 0] = -np.arange(16) * 0.1  # zero point 15
    w[16:32, 0] = np.arange(16) * 0.1  # zero point 0
    w[32:48, 0] = np.linspace(-0.5, 1.0, 16)  # zero point round(0.5 / 0.1) = 5
    bq = quantize_blockwise(w, 4, 16, symmetric=False)
    assert bq.zero_points[0].tolist() == [15, 0, 5]
    assert bq.packed_zero_points().tolist() == [
        15 | (0 << 4),
        5,
    ]  # odd block count: high nibble of the last byte 0


@pytest.mark.parametrize("n", [1, 7])
def test_per_channel_int8_is_the_reference(n):
    rng = np.random.default_rng(n)
    w = rng.normal(0, 1, (33, n)).astype(np.float32)
    wq, scale = quantize_per_channel(w)
    ref_q, ref_scale = ref_per_channel(w)
    np.testing.assert_array_equal(wq, ref_q)
    np.testing.assert_allclose(scale, ref_scale, rtol=1e-7)


def test_per_channel_codes_known_by_hand():
    w = np.array([[1.27, 2.54], [-0.635, 0.0], [0.0, -2.54]], np.float32)
    wq, scale = quantize_per_channel(w)
    np.testing.assert_allclose(scale, [0.01, 0.02], rtol=1e-6)
    assert wq[:, 0].tolist() == [127, -64, 0] and wq[:, 1].tolist() == [127, 0, -127]  # -63.5 -> -64 (even)
    zero_q, zero_scale = quantize_per_channel(np.zeros((4, 1), np.float32))
    assert zero_scale.tolist() == [1.0] and not zero_q.any()
