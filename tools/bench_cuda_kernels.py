"""GPU benchmark of the sq_onnx CUDA kernels (needs a CUDA GPU, torch with CUDA, and the library built
with CUDA). Prints two tables:

Times are per call, from CUDA graphs of 20 calls (no Python launch cost), with weights rotated through
copies larger than twice the L2 cache.

1. int8 GEMM with the dequantizing epilogue (Int8MatMulDequant, fp16 out), with the default kernels (dp4a up
   to 16 rows, mma.sync above), where the library has it and the GPU is sm_90 the CUTLASS Hopper kernel, and
   for 5-16 rows the opt-in tensor-core few-rows kernel (speed-up and floor use the fastest), against torch fp16 matmul (cuBLAS) and torch._int_mm (cuBLASLt int8 -> int32, no epilogue), with the floors: the memory floor
   (bytes moved at the measured copy bandwidth) and the compute floor (2MNK at the int8 dense peak given).
2. fused RMSNorm + per-token quantization against the same done in torch eager ops, and its memory floor;
   K = 65536 (256 KB of float32 row, more than any GPU's shared memory) times the kernel that reads the row
   again on each pass instead of keeping it in shared memory.

    python tools/bench_cuda_kernels.py [--peak-tops 1979] [--iters 50]
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from rich.console import Console
from rich.table import Table

from sq_onnx.runtime import custom_ops

SHAPES = [(4096, 4096), (4096, 11008), (11008, 4096)]
ROWS = [1, 16, 256, 2048]


def timed_ms(fn, iters: int, reps: int = 20) -> float:
    """Milliseconds per call of fn(i): reps calls (i = 0..reps-1, so callers rotate buffers past L2) are
    captured in a CUDA graph, which takes the Python launch cost out; median over iters replays."""
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fn(i)
    graph.replay()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / reps)
    return statistics.median(times)


def copies_past_l2(nbytes: int) -> int:
    """How many copies of a buffer make the rotation larger than twice the L2 cache."""
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    return max(1, -(-2 * l2 // max(nbytes, 1)))


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth, bytes read + written per second."""
    a = torch.empty(1024**3, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = timed_ms(lambda i: b.copy_(a), 10, reps=5)
    return 2 * a.numel() / (ms / 1e3)


def load_library():
    path = custom_ops.library_path()
    if path is None or not custom_ops.built_with_cuda():
        sys.exit("the sq_onnx library was not built with CUDA (pip install with nvcc on PATH)")
    return custom_ops.cuda_launchers()


MMA, SM90 = custom_ops.GEMM_MMA, custom_ops.GEMM_SM90


def gemm_times(lib, m: int, wq: list, ws, wh: list, iters: int) -> tuple[float, float, float, float, float]:
    """(ours by default, ours with the CUTLASS Hopper kernel or nan, ours with the tensor-core few-rows kernel
    or nan (5-16 rows), fp16 cuBLAS, torch._int_mm) milliseconds per call for M = m rows."""
    n, k = wq[0].shape
    xq = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
    xs = torch.rand(m, 1, dtype=torch.float16, device="cuda") * 0.01
    xh = torch.randn(m, k, dtype=torch.float16, device="cuda")
    y = torch.empty(m, n, dtype=torch.float16, device="cuda")

    def ours(i):
        stream = torch.cuda.current_stream().cuda_stream
        w = wq[i % len(wq)]
        rc = lib.sq_onnx_cuda_int8_matmul_dequant(
            1, xq.data_ptr(), xs.data_ptr(), w.data_ptr(), ws.data_ptr(), None, m, n, k, y.data_ptr(), stream
        )
        assert rc == 0

    ms_sm90 = float("nan")
    if m > 4 and lib.sq_onnx_cuda_select_gemm(SM90) == 0:  # up to 4 rows the dp4a kernel serves either way
        ms_sm90 = timed_ms(ours, iters)
        assert lib.sq_onnx_cuda_last_gemm_kernel() == custom_ops.SERVED_SM90, (
            "the Hopper kernel did not serve this shape"
        )
    lib.sq_onnx_cuda_select_gemm(MMA)
    ms_few = float("nan")
    if 4 < m <= 16 and lib.sq_onnx_cuda_select_few_rows(custom_ops.FEW_ROWS_MMA) == 0:
        ms_few = timed_ms(ours, iters)
        assert lib.sq_onnx_cuda_last_gemm_kernel() == custom_ops.SERVED_FEW_ROWS_MMA
        lib.sq_onnx_cuda_select_few_rows(custom_ops.FEW_ROWS_DP4A)
    ms_ours = timed_ms(ours, iters)
    ms_fp16 = timed_ms(lambda i: torch.matmul(xh, wh[i % len(wh)].t()), iters)
    ms_intmm = float("nan")
    if m > 16:  # torch._int_mm needs M > 16
        ms_intmm = timed_ms(lambda i: torch._int_mm(xq, wq[i % len(wq)].t()), iters)
    return ms_ours, ms_sm90, ms_few, ms_fp16, ms_intmm


def gemm_table(lib, iters: int, peak_tops: float, bandwidth: float) -> Table:
    t = Table(title="int8 GEMM + dequant epilogue (fp16 out) vs fp16 cuBLAS")
    for col in (
        "M",
        "K x N",
        "sq default us",
        "sq sm90 us",
        "sq few-rows mma us",
        "TOPS (best)",
        "fp16 cuBLAS us",
        "speed-up",
        "torch._int_mm us",
        "floor us",
        "of floor",
    ):
        t.add_column(col, justify="right")
    for k, n in SHAPES:
        wq = [
            torch.randint(-127, 128, (n, k), dtype=torch.int8, device="cuda")
            for _ in range(copies_past_l2(n * k))
        ]
        ws = torch.rand(n, dtype=torch.float16, device="cuda") * 0.01
        wh = [torch.randn(n, k, dtype=torch.float16, device="cuda") for _ in range(copies_past_l2(2 * n * k))]
        for m in ROWS:
            ms_mma, ms_sm90, ms_few, ms_fp16, ms_intmm = gemm_times(lib, m, wq, ws, wh, iters)
            ms_ours = min(t for t in (ms_mma, ms_sm90, ms_few) if t == t)  # nan != nan: paths not run
            bytes_moved = m * k + n * k + 2 * m * n + 2 * (m + n)
            floor_ms = max(bytes_moved / bandwidth, 2 * m * n * k / (peak_tops * 1e12)) * 1e3
            t.add_row(
                str(m),
                f"{k} x {n}",
                f"{ms_mma * 1e3:.1f}",
                f"{ms_sm90 * 1e3:.1f}",
                f"{ms_few * 1e3:.1f}",
                f"{2 * m * n * k / ms_ours / 1e9:.0f}",
                f"{ms_fp16 * 1e3:.1f}",
                f"{ms_fp16 / ms_ours:.2f}x",
                f"{ms_intmm * 1e3:.1f}",
                f"{floor_ms * 1e3:.1f}",
                f"{floor_ms / ms_ours:.0%}",
            )
    return t


def norm_times(lib, rows: int, k: int, iters: int) -> tuple[float, float]:
    """(ours, torch eager) milliseconds per RMSNorm + per-token quantization of rows x k fp16."""
    g = torch.rand(k, dtype=torch.float16, device="cuda") + 0.5
    x = torch.randn(rows, k, dtype=torch.float16, device="cuda")
    q = torch.empty(rows, k, dtype=torch.int8, device="cuda")
    s = torch.empty(rows, 1, dtype=torch.float16, device="cuda")

    def ours(i):
        stream = torch.cuda.current_stream().cuda_stream
        rc = lib.sq_onnx_cuda_rmsnorm_quant(
            1, x.data_ptr(), None, None, g.data_ptr(), 1e-6, rows, k, q.data_ptr(), s.data_ptr(), None, stream
        )
        assert rc == 0

    def eager(i):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6) * g.float()
        sc = (y.abs().amax(-1, keepdim=True).clamp_min(1e-12) / 127).half()
        return torch.clamp(torch.round(y / sc.float()), -127, 127).to(torch.int8), sc

    return timed_ms(ours, iters), timed_ms(eager, iters)


def norm_table(lib, iters: int, bandwidth: float) -> Table:
    t = Table(title="fused RMSNorm + per-token int8 quantization (fp16 in)")
    for col in ("rows", "K", "sq fused us", "torch eager us", "speed-up", "floor us", "of floor"):
        t.add_column(col, justify="right")
    for k in (4096, 11008, 65536):
        for rows in ROWS:
            ms_ours, ms_eager = norm_times(lib, rows, k, iters)
            floor_ms = (rows * k * 3 + 2 * k + 2 * rows) / bandwidth * 1e3
            t.add_row(
                str(rows),
                str(k),
                f"{ms_ours * 1e3:.1f}",
                f"{ms_eager * 1e3:.1f}",
                f"{ms_eager / ms_ours:.1f}x",
                f"{floor_ms * 1e3:.1f}",
                f"{floor_ms / ms_ours:.0%}",
            )
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument(
        "--peak-tops",
        type=float,
        default=1979.0,
        help="int8 dense tensor peak for the compute floor (H100 SXM: 1979)",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU")
    lib = load_library()
    bw = copy_bandwidth()
    console = Console(width=160)
    console.print(
        f"{torch.cuda.get_device_name()} | copy bandwidth {bw / 1e12:.2f} TB/s | torch {torch.__version__}"
    )
    console.print(gemm_table(lib, args.iters, args.peak_tops, bw))
    console.print(norm_table(lib, args.iters, bw))


if __name__ == "__main__":
    main()
