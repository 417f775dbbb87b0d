"""Checks the index arithmetic of the CUDA few-rows kernel (gemm_few_rows_mma in custom_ops/src/cuda_kernels.cu)
without a GPU: its loads, its permutation of K, its split-K sum and its epilogue mapping, replayed lane by lane in
numpy against mma.m16n8k32's fragment layouts as the PTX ISA gives them (s8 inputs, s32 accumulators). It mirrors
the kernel by hand, so it proves the scheme, not the compiled code: the GPU tests (tests/test_cuda_kernels.py)
do that. Keep the two in step when either changes.

    python tools/emulate_few_rows_mma.py
"""

from __future__ import annotations

import numpy as np

WARPS, COLS = 8, 32  # kFewWarps, kFewCols


def mma_m16n8k32(a: list, b: list, c: list) -> list:
    """D = A B + C for one warp: a[lane] = 4 words of 4 int8, b[lane] = 2 words, c[lane] = 4 int32."""
    big_a, big_b = np.zeros((16, 32), np.int64), np.zeros((32, 8), np.int64)
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        for i in range(16):  # A element i of this lane: register i // 4, byte i % 4
            row = gid if i < 4 or 8 <= i < 12 else gid + 8
            big_a[row, tig * 4 + (i & 3) + (16 if i >= 8 else 0)] = a[lane][i // 4][i % 4]
        for i in range(8):
            big_b[tig * 4 + (i & 3) + (16 if i >= 4 else 0), gid] = b[lane][i // 4][i % 4]
    prod = big_a @ big_b
    out = []
    for lane in range(32):
        gid, tig = lane // 4, lane % 4
        add = (prod[gid, tig * 2], prod[gid, tig * 2 + 1], prod[gid + 8, tig * 2], prod[gid + 8, tig * 2 + 1])
        out.append([c[lane][r] + add[r] for r in range(4)])
    return out


def words(v: np.ndarray) -> list:
    return [v[0:4], v[4:8], v[8:12], v[12:16]]


def warp_partial(xq, wq, m, n, k, n0, warp) -> np.ndarray:
    """One warp's accumulators over its chunks of K: [lane][(t * 2 + u) * 4 + r]."""
    zero = np.zeros(16, np.int8)
    acc = [[[[0] * 4 for _ in range(32)] for _ in range(2)] for _ in range(2)]
    for c in range(warp, (k + 63) // 64, WARPS):
        wv, xv = {}, {}
        for lane in range(32):
            gid, tig = lane // 4, lane % 4
            kb = c * 64 + tig * 16
            for t in range(2):
                for h in range(2):
                    col = n0 + t * 16 + h * 8 + gid
                    wv[lane, t, h] = wq[col, kb : kb + 16] if kb < k and col < n else zero
            for u in range(2):
                row = u * 8 + gid
                xv[lane, u] = xq[row, kb : kb + 16] if kb < k and row < m else zero
        for step in range(2):
            lo, hi = (0, 1) if step == 0 else (2, 3)
            for t in range(2):
                a = [
                    [
                        words(wv[lane, t, 0])[lo],
                        words(wv[lane, t, 1])[lo],
                        words(wv[lane, t, 0])[hi],
                        words(wv[lane, t, 1])[hi],
                    ]
                    for lane in range(32)
                ]
                for u in range(2):
                    b = [[words(xv[lane, u])[lo], words(xv[lane, u])[hi]] for lane in range(32)]
                    acc[t][u] = mma_m16n8k32(a, b, acc[t][u])
    out = np.zeros((32, 16), np.int64)
    for lane in range(32):
        for t in range(2):
            for u in range(2):
                out[lane, (t * 2 + u) * 4 : (t * 2 + u) * 4 + 4] = acc[t][u][lane]
    return out


def few_rows_gemm(xq: np.ndarray, wq: np.ndarray) -> np.ndarray:
    """The int32 Y the kernel would write ([M, N]; -1 where it would write nothing)."""
    (m, k), n = xq.shape, wq.shape[0]
    y = np.full((m, n), -1, np.int64)
    for n0 in range(0, n, COLS):
        total = sum(warp_partial(xq, wq, m, n, k, n0, w) for w in range(WARPS))
        for lane in range(32):
            gid, tig = lane // 4, lane % 4
            for t in range(2):
                for u in range(2):
                    s = total[lane, (t * 2 + u) * 4 : (t * 2 + u) * 4 + 4]
                    col, row = n0 + t * 16 + gid, u * 8 + tig * 2
                    for rr, cc, v in (
                        (row, col, s[0]),
                        (row + 1, col, s[1]),
                        (row, col + 8, s[2]),
                        (row + 1, col + 8, s[3]),
                    ):
                        if rr < m and cc < n:
                            y[rr, cc] = v
    return y


def main() -> None:
    rng = np.random.default_rng(0)
    for m, n, k in [(5, 33, 48), (16, 64, 576), (9, 40, 80), (12, 70, 1040), (16, 32, 16)]:
        xq = rng.integers(-128, 128, (m, k), dtype=np.int8)
        wq = rng.integers(-128, 128, (n, k), dtype=np.int8)
        ok = np.array_equal(few_rows_gemm(xq, wq), xq.astype(np.int64) @ wq.astype(np.int64).T)
        print(f"M {m:2d}, N {n:3d}, K {k:4d}: {'exact' if ok else 'WRONG'}")
        assert ok


if __name__ == "__main__":
    main()
