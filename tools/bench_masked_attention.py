"""One layer's attention, stock ONNX ops against ``sq_onnx::MaskedAttention``, side by side: what a W4
``--kernels sq_onnx`` conversion changes in each attention block (passes/fuse_masked_attention.py).

The stock graph is what torch.onnx exports: repeat_kv of the cache (Unsqueeze, Expand, Reshape) for K and V,
MatMul(Q, Kᵀ), Mul by the scale, Add of the causal mask, Softmax, MatMul with V. The fused graph is the one op on
the cache itself. Both run in ONNX Runtime with the same inputs, in interleaved rounds; the table prints the best
of each (ms per run) and the ratio.

    python tools/bench_masked_attention.py [--heads 9] [--kv-heads 3] [--head-size 64] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from onnx import TensorProto, helper
from rich.console import Console
from rich.table import Table

from sq_onnx.runtime.ort_session import session_options

MIN = np.finfo(np.float32).min


def _models(heads: int, kv_heads: int, head_size: int, scale: float):
    """(stock, fused) ONNX models taking q [1, H, S, D], the cache k and v [1, Hk, T, D] and the mask."""
    f = TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info(n, f, None) for n in ("q", "k", "v", "mask")]
    out = [helper.make_tensor_value_info("y", f, None)]
    rep = heads // kv_heads
    consts = [
        helper.make_tensor("axis2", TensorProto.INT64, [1], [2]),
        helper.make_tensor("scale", f, [], [scale]),
    ]
    nodes = []
    for x in ("k", "v"):
        nodes += [
            helper.make_node("Unsqueeze", [x, "axis2"], [f"{x}5"]),
            helper.make_node("Shape", [f"{x}5"], [f"{x}shape"]),
            helper.make_node("Mul", [f"{x}shape", "repeat"], [f"{x}target"]),
            helper.make_node("Expand", [f"{x}5", f"{x}target"], [f"{x}x"]),
            helper.make_node("Reshape", [f"{x}x", "shape4"], [f"{x}r"]),
        ]
    consts += [
        helper.make_tensor("repeat", TensorProto.INT64, [5], [1, 1, rep, 1, 1]),
        helper.make_tensor("shape4", TensorProto.INT64, [4], [0, heads, -1, head_size]),
    ]
    nodes += [
        helper.make_node("Transpose", ["kr"], ["kt"], perm=[0, 1, 3, 2]),
        helper.make_node("MatMul", ["q", "kt"], ["s"]),
        helper.make_node("Mul", ["s", "scale"], ["scaled"]),
        helper.make_node("Add", ["scaled", "mask"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["p"], axis=-1),
        helper.make_node("MatMul", ["p", "vr"], ["y"]),
    ]
    stock = helper.make_model(
        helper.make_graph(nodes, "stock", inputs, out, initializer=consts),
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=10,
    )
    fused_node = helper.make_node(
        "MaskedAttention", ["q", "k", "v", "mask"], ["y"], domain="sq_onnx", scale=scale
    )
    fused = helper.make_model(
        helper.make_graph([fused_node], "fused", inputs, out),
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sq_onnx", 1)],
        ir_version=10,
    )
    return stock, fused


def _feeds(heads: int, kv_heads: int, head_size: int, queries: int, keys: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(queries + keys)
    i = np.arange(queries)[:, None] + keys - queries
    mask = np.where(np.arange(keys)[None] > i, MIN, 0.0).astype(np.float32)[None, None]
    return {
        "q": rng.normal(0, 1, (1, heads, queries, head_size)).astype(np.float32),
        "k": rng.normal(0, 1, (1, kv_heads, keys, head_size)).astype(np.float32),
        "v": rng.normal(0, 1, (1, kv_heads, keys, head_size)).astype(np.float32),
        "mask": mask,
    }


def _best_ms(sess, feeds, runs: int) -> float:
    sess.run(None, feeds)
    start = time.perf_counter()
    for _ in range(runs):
        sess.run(None, feeds)
    return (time.perf_counter() - start) / runs * 1e3


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--head-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    stock, fused = _models(args.heads, args.kv_heads, args.head_size, args.head_size**-0.5)
    sessions = {}
    for name, model in (("stock", stock), ("MaskedAttention", fused)):
        opts = session_options(args.threads, custom_ops=name != "stock")
        sessions[name] = ort.InferenceSession(
            model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
        )
    table = Table(
        title=f"one attention layer, {args.heads} heads on {args.kv_heads} kv heads of {args.head_size}, "
        f"{args.threads} threads (best of {args.rounds} interleaved rounds)"
    )
    for col in ("queries x keys", "stock ms", "MaskedAttention ms", "speed-up"):
        table.add_column(col, justify="right")
    for queries, keys in ((512, 512), (128, 128), (32, 32), (1, 128), (1, 512), (1, 2048)):
        feeds = _feeds(args.heads, args.kv_heads, args.head_size, queries, keys)
        ref, out = (sess.run(None, feeds)[0] for sess in sessions.values())
        if np.abs(ref - out).max() > 1e-5 * np.abs(ref).max():
            raise SystemExit(f"{queries} x {keys}: the two graphs disagree")
        runs = max(3, 20_000 // (queries * keys // 64 + 100))
        best = {name: float("inf") for name in sessions}
        for _ in range(args.rounds):
            for name, sess in sessions.items():
                best[name] = min(best[name], _best_ms(sess, feeds, runs))
        ratio = best["stock"] / best["MaskedAttention"]
        table.add_row(
            f"{queries} x {keys}", f"{best['stock']:.3f}", f"{best['MaskedAttention']:.3f}", f"{ratio:.2f}x"
        )
    Console().print(table)


if __name__ == "__main__":
    main()
