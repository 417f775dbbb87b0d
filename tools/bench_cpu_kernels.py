"""CPU benchmark of the sq_onnx Int8MatMulDequant kernel against ONNX Runtime's MatMulIntegerToFloat
(MLAS) on LLM shapes (SmolLM2's and a 7B's), both as one-node ORT sessions on the same int8 inputs with
per-token scales (as the stock W8A8 graph), and ORT once more with one scalar activation scale (its
per-tensor form), same threads. The ratio is sq_onnx time over ORT per-token time (below 1: we are faster).

    python tools/bench_cpu_kernels.py [--threads 2] [--repeat 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnx
from onnx import TensorProto, helper
from rich.console import Console
from rich.table import Table

from sq_onnx import custom_ops
from sq_onnx.ort_session import session_options

SHAPES = [(576, 576), (576, 1536), (1536, 576), (4096, 4096)]
ROWS = [1, 16, 256]


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
    table = Table(title=f"int8 matmul on the CPU, {args.threads} threads (ms, median of {args.repeat})")
    for col in (
        "M",
        "K x N",
        "sq_onnx Int8MatMulDequant",
        "ORT MatMulIntegerToFloat",
        "ratio",
        "ORT, scalar x_scale",
        "GOPS (sq)",
    ):
        table.add_column(col, justify="right")
    for k, n in SHAPES:
        wq = rng.integers(-127, 128, (n, k), dtype=np.int8)
        ws = rng.uniform(0.001, 0.01, n).astype(np.float32)
        sq = ort.InferenceSession(
            one_node_model("Int8MatMulDequant", "sq_onnx", wq, ws),
            session_options(args.threads, custom_ops=True),
        )
        mlas = ort.InferenceSession(
            one_node_model("MatMulIntegerToFloat", "com.microsoft", np.ascontiguousarray(wq.T), ws),
            session_options(args.threads),
        )
        mlas_scalar = ort.InferenceSession(
            one_node_model(
                "MatMulIntegerToFloat", "com.microsoft", np.ascontiguousarray(wq.T), ws, per_token=False
            ),
            session_options(args.threads),
        )
        for m in ROWS:
            xq = rng.integers(-127, 128, (m, k), dtype=np.int8)
            xs = rng.uniform(0.001, 0.01, (m, 1)).astype(np.float32)
            t_sq = median_ms(sq, {"xq": xq, "xs": xs}, args.repeat)
            t_ort = median_ms(mlas, {"xq": xq, "xs": xs}, args.repeat)
            t_scalar = median_ms(mlas_scalar, {"xq": xq, "xs": np.array(0.005, np.float32)}, args.repeat)
            table.add_row(
                str(m),
                f"{k} x {n}",
                f"{t_sq:.3f}",
                f"{t_ort:.3f}",
                f"{t_sq / t_ort:.2f}x",
                f"{t_scalar:.3f}",
                f"{2 * m * n * k / t_sq / 1e6:.1f}",
            )
    Console(width=140).print(table)
    print("library:", custom_ops.library_path())


if __name__ == "__main__":
    main()
