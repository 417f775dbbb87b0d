"""GPTQ with its refinement at one linear's shape: this checkout's sq_onnx/quant/gptq.py against another
commit's, side by side in one process (same inputs, alternating runs), and this checkout's GPTQ through the torch
code path (torch's CPU device, or "cuda") against numpy. Prints seconds per run and whether codes and scales are
bit-identical to the other commit's.

    python tools/bench_gptq_refine.py f668103 [--k 2048 --n 4096 --rounds 4 --device cpu]
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from sq_onnx.quant import gptq as current


def _gptq_at(commit: str, folder: Path):
    """The module sq_onnx/quant/gptq.py as it was at ``commit`` (its imports resolve to this checkout)."""
    source = subprocess.run(
        ["git", "show", f"{commit}:sq_onnx/quant/gptq.py"], capture_output=True, text=True, check=True
    ).stdout
    path = folder / f"gptq_{commit}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(f"gptq_{commit}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timed(run) -> tuple[float, object]:
    start = time.perf_counter()
    out = run()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("commit", help="the commit whose gptq.py to compare with")
    parser.add_argument("--k", type=int, default=2048)
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="torch device for the torch code path")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = rng.standard_t(4, (4 * args.k, args.k)).astype(np.float32)
    h = (x.T @ x).astype(np.float64)
    w = rng.normal(0, 0.02, (args.k, args.n)).astype(np.float32)
    options = dict(clip_search=True, act_order=True, refine_rounds=args.rounds)
    table = Table(title=f"GPTQ + {args.rounds} refine rounds, K = {args.k}, N = {args.n}, seconds")
    for column in ("run", args.commit, "this checkout (numpy)", f"this checkout (torch {args.device})"):
        table.add_column(column, justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        other = _gptq_at(args.commit, Path(tmp))
        same = True
        for r in range(args.repeat):
            t_old, a = _timed(lambda: other.gptq_quantize(w, h, 4, 128, False, **options))
            t_new, b = _timed(lambda: current.gptq_quantize(w, h, 4, 128, False, **options))
            t_torch, _ = _timed(
                lambda: current.gptq_quantize(w, h, 4, 128, False, **options, device=args.device)
            )
            same &= np.array_equal(a.q, b.q) and np.array_equal(a.scales, b.scales)
            table.add_row(str(r + 1), f"{t_old:.1f}", f"{t_new:.1f}", f"{t_torch:.1f}")
    Console().print(table)
    print(f"codes and scales bit-identical to {args.commit}'s: {same}")


if __name__ == "__main__":
    sys.exit(main())
