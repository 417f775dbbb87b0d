"""CPU benchmark of the sq_onnx Int8MatMulDequant kernel against ONNX Runtime's MatMulIntegerToFloat
(MLAS) on LLM shapes (SmolLM2's and a 7B's), both as one-node ORT sessions on the same int8 inputs with
per-token scales (as the stock W8A8 graph), and ORT once more with one scalar activation scale (its
per-tensor form), same threads; and ORT's float32 MatMul on the same shapes, the speed to beat.
Our kernel is timed on each instruction set this CPU has (scalar, avx2, avxvnni, avx512vnni; the library
picks the best by itself), and on the best VNNI path once more with the weights packed when the session was
made (SQ_ONNX_CPU_PREPACK=1, opt-in: a second copy of W). The ratio is our best time over ORT's per-token
time (below 1: we are faster).

    python tools/bench_cpu_kernels.py [--threads 2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper
from rich.console import Console
from rich.table import Table

from sq_onnx.runtime import custom_ops
from sq_onnx.runtime.ort_session import session_options

SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096)]
ROWS = [1, 16, 64, 256]
PREPACKED_ROWS = 256  # prepacked weights serve 2-255 rows (cpu_kernels.h)


def one_node_model(op: str, domain: str, wq: np.ndarray, ws: np.ndarray, per_token: bool = True) -> bytes:
    """A model with one int8 matmul node over graph inputs xq/xs and constant weights."""
    k = wq.shape[1] if domain == "sq_onnx" else wq.shape[0]
    inputs = ["xq", "xs", "wq", "ws"] if domain == "sq_onnx" else ["xq", "wq", "xs", "ws"]
    node = helper.make_node(op, inputs, ["y"], domain=domain)
    graph = helper.make_graph(
        [node],
        "bench",
        [
            helper.make_tensor_value_info("xq", TensorProto.INT8, ["m", k]),
            helper.make_tensor_value_info("xs", TensorProto.FLOAT, ["m", 1] if per_token else []),
        ],
        [helper.make_value_info("y", onnx.TypeProto())],
        initializer=[onnx.numpy_helper.from_array(wq, "wq"), onnx.numpy_helper.from_array(ws, "ws")],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def float_matmul_model(w: np.ndarray) -> bytes:
    """x [m, K] @ w [K, N] in float32, the op an unquantized model runs."""
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph(
        [node],
        "bench_fp32",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", w.shape[0]])],
        [helper.make_value_info("y", onnx.TypeProto())],
        initializer=[onnx.numpy_helper.from_array(w, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def prepacked_session(model: bytes, threads: int):
    """A session whose Int8MatMulDequant packed its weights when made (the variable is read then)."""
    import onnxruntime as ort

    before = os.environ.get("SQ_ONNX_CPU_PREPACK")
    os.environ["SQ_ONNX_CPU_PREPACK"] = "1"
    try:
        return ort.InferenceSession(model, session_options(threads, custom_ops=True))
    finally:
        if before is None:
            del os.environ["SQ_ONNX_CPU_PREPACK"]
        else:
            os.environ["SQ_ONNX_CPU_PREPACK"] = before


def median_ms(sess, feed: dict[str, np.ndarray], repeat: int) -> float:
    sess.run(None, feed)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    isa_switch = custom_ops.cpu_isa_control()
    best = isa_switch.sq_onnx_cpu_best_isa()
    isas = [i for i in range(1, best + 1) if isa_switch.sq_onnx_cpu_select_isa(i) == 0] or [best]
    table = Table(title=f"int8 matmul on the CPU, {args.threads} threads (ms, median of {args.repeat})")
    prepack = custom_ops.CPU_ISAS[best] in ("avxvnni", "avx512vnni")
    columns = ["M", "K x N", *(f"sq_onnx {custom_ops.CPU_ISAS[i]}" for i in isas)]
    columns += [f"sq_onnx {custom_ops.CPU_ISAS[best]}, prepacked"] if prepack else []
    columns += ["ORT MatMulIntegerToFloat", "ratio", "ORT, scalar x_scale", "ORT fp32 MatMul", "GOPS (sq)"]
    for col in columns:
        table.add_column(col, justify="right")
    try:
        for k, n in SHAPES:
            wq = rng.integers(-127, 128, (n, k), dtype=np.int8)
            ws = rng.uniform(0.001, 0.01, n).astype(np.float32)
            sq_model = one_node_model("Int8MatMulDequant", "sq_onnx", wq, ws)
            sq = ort.InferenceSession(sq_model, session_options(args.threads, custom_ops=True))
            sq_prepacked = prepacked_session(sq_model, args.threads) if prepack else None
            wt = np.ascontiguousarray(wq.T)
            mlas = ort.InferenceSession(
                one_node_model("MatMulIntegerToFloat", "com.microsoft", wt, ws), session_options(args.threads)
            )
            mlas_scalar = ort.InferenceSession(
                one_node_model("MatMulIntegerToFloat", "com.microsoft", wt, ws, per_token=False),
                session_options(args.threads),
            )
            fp32 = ort.InferenceSession(
                float_matmul_model(wt.astype(np.float32)), session_options(args.threads)
            )
            for m in ROWS:
                xq = rng.integers(-127, 128, (m, k), dtype=np.int8)
                xs = rng.uniform(0.001, 0.01, (m, 1)).astype(np.float32)
                t_isa = []
                for i in isas:
                    isa_switch.sq_onnx_cpu_select_isa(i)
                    t_isa.append(median_ms(sq, {"xq": xq, "xs": xs}, args.repeat))
                if prepack and 1 < m < PREPACKED_ROWS:  # one row stays on gemv, 256 and more pack in the call
                    isa_switch.sq_onnx_cpu_select_isa(best)
                    t_isa.append(median_ms(sq_prepacked, {"xq": xq, "xs": xs}, args.repeat))
                    assert isa_switch.sq_onnx_cpu_last_gemm_weights() == custom_ops.WEIGHTS_PREPACKED
                elif prepack:
                    t_isa.append(float("nan"))
                t_sq = min(t for t in t_isa if t == t)  # nan: not run
                t_ort = median_ms(mlas, {"xq": xq, "xs": xs}, args.repeat)
                t_scalar = median_ms(mlas_scalar, {"xq": xq, "xs": np.array(0.005, np.float32)}, args.repeat)
                t_fp32 = median_ms(fp32, {"x": xq.astype(np.float32)}, args.repeat)
                table.add_row(
                    str(m),
                    f"{k} x {n}",
                    *(f"{t:.3f}" if t == t else "-" for t in t_isa),
                    f"{t_ort:.3f}",
                    f"{t_sq / t_ort:.2f}x",
                    f"{t_scalar:.3f}",
                    f"{t_fp32:.3f}",
                    f"{2 * m * n * k / t_sq / 1e6:.1f}",
                )
    finally:
        isa_switch.sq_onnx_cpu_select_isa(best)
    Console(width=200).print(table)
    print("library:", custom_ops.library_path())


if __name__ == "__main__":
    main()
