"""CPU benchmark of ``sq_onnx::MatMulNBitsA8`` against ONNX Runtime's own ``MatMulNBits`` at accuracy_level 4
(MLAS CompInt8, the same arithmetic) and ORT's float32 ``MatMul`` on SmolLM2's W4 shapes (q/k/v and gate/up
joined as ``--join-linears`` writes them, o_proj, down_proj, and the 8-bit lm_head), from one row (decode) to
512 (prefill). Each op runs as a one-node session whose weights are initializers (as in a converted model),
several copies per session so the weights come from memory as they do in a model, same threads; our kernel on
each instruction set this CPU has (``SQ_ONNX_CPU_ISA`` in a child process). Times are the best of --repeat
rounds; the ratio is MLAS's time over ours (above 1: we are faster).

    python tools/bench_nbits_a8.py [--threads 2] [--repeat 5] [--rows 1,32,128,512]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper
from rich.console import Console
from rich.table import Table

from sq_onnx.quant.blockwise import quantize_blockwise
from sq_onnx.runtime import custom_ops
from sq_onnx.runtime.ort_session import session_options

# (name, K, N, bits): SmolLM2-135M's linears as the default W4 conversion writes them
SHAPES = [
    ("q/k/v joined", 576, 960, 4),
    ("o_proj", 576, 576, 4),
    ("gate/up joined", 576, 3072, 4),
    ("down_proj", 1536, 576, 4),
    ("lm_head (8-bit)", 576, 49152, 8),
]
COPIES = 8  # nodes per session, each with its own weights: more than the caches hold, as in a model
BLOCK = 128


def _model(op: str, k: int, n: int, bits: int, copies: int) -> bytes:
    rng = np.random.default_rng(0)
    nodes, inits, outs = [], [], []
    for c in range(copies):
        if op == "MatMul":
            inits.append(numpy_helper.from_array(rng.normal(0, 1, (k, n)).astype(np.float32), f"w{c}"))
            nodes.append(helper.make_node("MatMul", ["a", f"w{c}"], [f"y{c}"]))
        else:
            bq = quantize_blockwise(rng.normal(0, 1, (k, n)).astype(np.float32), bits, BLOCK, False)
            inits += [
                numpy_helper.from_array(bq.packed, f"b{c}"),
                numpy_helper.from_array(bq.scales.reshape(-1), f"s{c}"),
                numpy_helper.from_array(bq.packed_zero_points(), f"z{c}"),
            ]
            attrs = {"K": k, "N": n, "bits": bits, "block_size": BLOCK}
            domain = "com.microsoft" if op == "MatMulNBits" else "sq_onnx"
            if op == "MatMulNBits":
                attrs["accuracy_level"] = 4
            nodes.append(
                helper.make_node(op, ["a", f"b{c}", f"s{c}", f"z{c}"], [f"y{c}"], domain=domain, **attrs)
            )
        outs.append(helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, None))
    graph = helper.make_graph(
        nodes, "bench", [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["m", k])], outs, inits
    )
    opsets = [helper.make_opsetid(d, 21 if d == "" else 1) for d in ("", "com.microsoft", "sq_onnx")]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 10
    return model.SerializeToString()


def _time_op(op: str, threads: int, repeat: int, rows: list[int]) -> dict:
    """{shape name: {rows: microseconds per node}} for one op, in this process."""
    import onnxruntime as ort

    out: dict[str, dict[int, float]] = {}
    for name, k, n, bits in SHAPES:
        copies = 1 if n * k > 10_000_000 else COPIES  # the lm_head alone is larger than the caches
        so = session_options(threads=threads, custom_ops=op == "MatMulNBitsA8")
        sess = ort.InferenceSession(_model(op, k, n, bits, copies), so, providers=["CPUExecutionProvider"])
        out[name] = {}
        for m in rows:
            a = np.random.default_rng(m).normal(0, 1, (m, k)).astype(np.float32)
            sess.run(None, {"a": a})
            calls = max(2, int(64 / m))
            best = float("inf")
            for _ in range(repeat):
                t = time.perf_counter()
                for _ in range(calls):
                    sess.run(None, {"a": a})
                best = min(best, (time.perf_counter() - t) / calls / copies)
            out[name][m] = best * 1e6
    return out


def _child(op: str, isa: str | None, threads: int, repeat: int, rows: list[int]) -> dict:
    env = dict(os.environ)
    if isa:
        env["SQ_ONNX_CPU_ISA"] = isa
    args = [sys.executable, __file__, "--child", op, "--threads", str(threads), "--repeat", str(repeat)]
    args += ["--rows", ",".join(map(str, rows))]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--rows", default="1,32,128,512")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    if args.child:
        taken = custom_ops.CPU_ISAS[ctypes.CDLL(str(custom_ops.library_path())).sq_onnx_cpu_isa()]
        print(json.dumps({"isa": taken, "times": _time_op(args.child, args.threads, args.repeat, rows)}))
        return
    if not custom_ops.available():
        sys.exit("the sq_onnx custom-op library is not built (see README, 'Fused kernels').")
    runs = {"MatMul fp32": _child("MatMul", None, args.threads, args.repeat, rows)["times"]}
    runs["MatMulNBits level 4 (MLAS)"] = _child("MatMulNBits", None, args.threads, args.repeat, rows)["times"]
    isas = []
    for isa in ("avx512vnni", "avxvnni", "avx2", "scalar"):
        run = _child("MatMulNBitsA8", isa, args.threads, args.repeat, rows)
        if run["isa"] == isa:  # SQ_ONNX_CPU_ISA falls back to the best this CPU has: not this one
            runs[f"MatMulNBitsA8 {isa}"] = run["times"]
            isas.append(isa)
    mlas = runs["MatMulNBits level 4 (MLAS)"]
    ours = runs[f"MatMulNBitsA8 {isas[0]}"]
    table = Table(title=f"microseconds per linear, {args.threads} threads (best of {args.repeat})")
    for col in ("shape (K x N)", "rows", *runs, f"MLAS / ours ({isas[0]})"):
        table.add_column(col)
    for name, k, n, _ in SHAPES:
        for m in rows:
            cells = [f"{runs[r][name][str(m)]:.1f}" for r in runs]
            table.add_row(
                f"{name} ({k} x {n})", str(m), *cells, f"{mlas[name][str(m)] / ours[name][str(m)]:.2f}"
            )
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
