"""Where a language model's prefill time goes, by operator type: ONNX Runtime's own profile (one event per
node run) summed per op type over a few prompt runs after a warm-up, with the sq_onnx ops registered.
Prints a table, largest first (ms per run, share of the runs' wall time).

    python tools/profile_ops.py MODEL.onnx [--tokens 512] [--runs 3] [--threads 2] [--top 15]

SQ_ONNX_OPS_LIB=<lib> profiles another build of the op library; SQ_ONNX_CPU_ISA holds its CPU kernels to a
lower instruction set (docs/EXPERIMENTS.md uses both for A/B readings).
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from sq_onnx.lm.lm_runner import LMRunner
from sq_onnx.runtime import custom_ops
from sq_onnx.runtime.model_inputs import input_specs
from sq_onnx.runtime.model_io import load_model
from sq_onnx.runtime.ort_session import session_options


def profile(model: Path, tokens: int, runs: int, threads: int | None) -> tuple[dict[str, float], list[float]]:
    """(total microseconds per op type over `runs` prefills of `tokens` random tokens, each run's wall µs)."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = session_options(threads, custom_ops=custom_ops.available())
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "ops")
        sess = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"])
        runner = LMRunner(sess, input_specs(load_model(model)))
        ids = np.random.default_rng(0).integers(0, 1000, (1, tokens), dtype=np.int64)
        runner.prefill(ids)  # warm-up, dropped below
        for _ in range(runs):
            runner.prefill(ids)
        events = json.loads(Path(sess.end_profiling()).read_text())
    walls = [e["dur"] for e in events if e.get("name") == "model_run"][1:]
    per_op: collections.Counter[str] = collections.Counter()
    seen_runs = 0
    for e in events:
        if e.get("name") == "model_run":
            seen_runs += 1
        elif seen_runs >= 1 and e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"]
    return dict(per_op), walls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    if not args.model.exists():
        raise SystemExit(f"no model at {args.model}")
    per_op, walls = profile(args.model, args.tokens, args.runs, args.threads)
    wall = sum(walls) / len(walls)
    table = Table()
    for col in ("op type", "ms per run", "share"):
        table.add_column(col, justify="left" if col == "op type" else "right")
    for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[: args.top]:
        table.add_row(op, f"{us / args.runs / 1000:.1f}", f"{us / args.runs / wall:.0%}")
    console = Console()
    console.print(
        f"{args.model}: prefill of {args.tokens} tokens, {wall / 1000:.1f} ms a run ({args.runs} runs)"
    )
    console.print(table)


if __name__ == "__main__":
    main()
