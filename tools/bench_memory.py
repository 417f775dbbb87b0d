"""Peak memory of ``sq-onnx convert`` against model size, on synthetic transformer-shaped models.

    python tools/bench_memory.py                      # 0.25, 0.5, 1, 2.2 GB, W4
    python tools/bench_memory.py --sizes 0.5,3 --scheme w8a8

Each size is built with tools/synthetic_transformer.py (external data), converted in a fresh process
(`sq-onnx convert --json`, whose peak_rss_mb is the process's VmHWM), and deleted. Prints a table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
from synthetic_transformer import build_of_size  # noqa: E402

HIDDEN = 2048


def convert_once(model: Path, scheme: str, workdir: Path) -> dict:
    calib = workdir / "calib.npz"
    np.savez(calib, hidden_states=np.random.default_rng(0).normal(size=(2, 1, 32, HIDDEN)).astype(np.float32))
    cmd = [sys.executable, "-m", "sq_onnx", "convert", str(model), "-o", str(workdir / "out" / "model.onnx")]
    cmd += ["--scheme", scheme, "--calib", str(calib), "--samples", "1", "--verify-samples", "1", "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"convert failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0.25,0.5,1,2.2", help="weights in GB, comma-separated")
    parser.add_argument("--scheme", default="w4", choices=("w4", "w8a8"))
    args = parser.parse_args()
    table = Table(title=f"sq-onnx convert --scheme {args.scheme}: peak RSS vs model size")
    for col in ("weights (GB)", "peak RSS (GB)", "peak / weights", "output (GB)", "seconds"):
        table.add_column(col, justify="right")
    for size in (float(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory(prefix="sq-onnx-bench-") as tmp:
            work = Path(tmp)
            weights = build_of_size(work / "in" / "model.onnx", size)
            result = convert_once(work / "in" / "model.onnx", args.scheme, work)
        peak = result["peak_rss_mb"] * 1024**2
        table.add_row(
            f"{weights / 1e9:.2f}",
            f"{peak / 1e9:.2f}",
            f"{peak / weights:.2f}",
            f"{result['output_bytes'] / 1e9:.2f}",
            f"{result['seconds']:.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    main()
