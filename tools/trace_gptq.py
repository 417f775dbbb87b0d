"""Where a conversion's time and memory go, stage by stage and GPTQ batch by batch (issue: 1B-class models in bounded time).

    python tools/trace_gptq.py MODEL.onnx --vocab 128256              # default W4, random ids as calibration
    python tools/trace_gptq.py MODEL.onnx --vocab 49152 --gptq-samples 64
    python tools/trace_gptq.py MODEL.onnx --vocab 128256 --no-lm-head-gptq
    python tools/trace_gptq.py MODEL.onnx --vocab 128256 --tracemalloc   # who holds the memory at the peak
    python tools/trace_gptq.py MODEL.onnx --vocab 128256 --scheme w8a8
    python tools/trace_gptq.py MODEL.onnx --vocab 128256 --no-gptq      # the stages around GPTQ, quickly

Converts in this process with the default W4 (or W8A8) recipe (``--gptq-samples`` aside) while a thread samples the
resident memory every 0.1 s, and marks each GPTQ batch's two phases: running its segment and summing its Gram
matrices (``segments+grams``), then fitting its weights (``gptq``); the other stages mark their own phases. Prints the stages' seconds, the peak over
the weights' file size per phase, and the seconds of every batch: the per-layer cost of a shape exported with
a few layers (``tools/bench_scale.py --layers``) times its layer count estimates the whole model's.
``--tracemalloc`` also snapshots Python's and numpy's allocations at each new high (every 64 MB) and prints
where the highest one's bytes were allocated: what is not in it (ORT's own buffers, pages of the memory-mapped
weights) is the resident memory less its total.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

import sq_onnx.quantize_model as quantize_model
import sq_onnx.stages as stages
from sq_onnx import Recipe, convert
from sq_onnx.runtime.peak_memory import current_rss_bytes

SEQ_LEN = 256
MB = 1024**2


class Tracer:
    """Resident memory sampled every ``every`` seconds, each sample labelled with the phase set last."""

    def __init__(self, every: float = 0.1, snapshots: bool = False) -> None:
        self.phase = "load"
        self.samples: list[tuple[float, int, str]] = []
        self.anon: list[int] = []  # the anonymous part of each sample's resident memory
        self.snapshots = snapshots
        self.highest: tuple[int, int, str, tracemalloc.Snapshot] | None = None  # traced, RSS, phase, snapshot
        self._every, self._stop = every, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.mark(self.phase)
            if self.snapshots:
                self._snapshot_if_higher()
            self._stop.wait(self._every)

    def _snapshot_if_higher(self) -> None:
        traced, _ = tracemalloc.get_traced_memory()
        if self.highest is None or traced > self.highest[0] + 64 * MB:
            self.highest = (traced, current_rss_bytes(), self.phase, tracemalloc.take_snapshot())

    def mark(self, phase: str) -> None:
        """Enter ``phase`` now (also taking a sample, so a phase shorter than the interval is seen)."""
        self.phase = phase
        self.samples.append((time.perf_counter(), current_rss_bytes(), phase))
        self.anon.append(current_rss_bytes("RssAnon"))

    def __enter__(self) -> Tracer:
        if self.snapshots:
            tracemalloc.start(12)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        if self.snapshots:
            tracemalloc.stop()

    def holders(self, top: int = 15) -> list[tuple[str, int]]:
        """The highest snapshot's bytes by the innermost sq_onnx line that allocated them."""
        if self.highest is None:
            return []
        by_site: dict[str, int] = {}
        for stat in self.highest[3].statistics("traceback"):
            ours = [f for f in stat.traceback if "sq_onnx" in f.filename or "/passes/" in f.filename]
            frame = ours[-1] if ours else stat.traceback[-1]
            site = f"{Path(frame.filename).name}:{frame.lineno}"
            by_site[site] = by_site.get(site, 0) + stat.size
        return sorted(by_site.items(), key=lambda kv: -kv[1])[:top]

    def seconds(self) -> dict[str, float]:
        """Seconds spent in each phase, in the order first seen."""
        out: dict[str, float] = {}
        for (t1, _, phase), (t2, _, _) in zip(self.samples, self.samples[1:], strict=False):
            out[phase] = out.get(phase, 0.0) + t2 - t1
        return out

    def peaks(self) -> dict[str, tuple[int, int]]:
        """The highest resident memory, and the highest anonymous part of it, in each kind of phase (batches
        of the same width together)."""
        out: dict[str, tuple[int, int]] = {}
        for (_, rss, phase), anon in zip(self.samples, self.anon, strict=True):
            kind = phase.split(" #")[0] + (f" ({phase.split('(')[1]}" if "(" in phase else "")
            high = out.get(kind, (0, 0))
            out[kind] = (max(high[0], rss), max(high[1], anon))
        return out


def traced_batch_grams(tracer: Tracer):
    """``quantize_model.batch_grams`` that marks the phases of each batch."""
    original = quantize_model.batch_grams

    def batch_grams(inputs, *args, **kwargs):
        tracer.mark(f"segments+grams #{inputs.index} ({inputs.channels} wide)")
        grams = original(inputs, *args, **kwargs)
        tracer.mark(f"gptq #{inputs.index} ({inputs.channels} wide)")
        return grams

    return batch_grams


STAGES = ("gather_samples", "calibrate_stage", "smooth", "quantize", "verify", "join_linears", "save")


def traced_stages(tracer: Tracer) -> None:
    """Each of the conversion's ``STAGES`` marks its own phase when it starts (GPTQ's batches mark theirs
    inside the quantize stage)."""
    for name in STAGES:
        original = getattr(stages, name)

        def staged(*args, _original=original, _name=name, **kwargs):
            tracer.mark(_name.removesuffix("_stage"))
            return _original(*args, **kwargs)

        setattr(stages, name, staged)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument(
        "--vocab", type=int, required=True, help="the model's vocabulary size (for random ids)"
    )
    parser.add_argument("--scheme", default="w4", help="w4 (the default) or w8a8")
    parser.add_argument("--gptq-samples", type=int, default=Recipe().gptq_samples)
    parser.add_argument(
        "--no-lm-head-gptq", action="store_true", help="the lm_head by per-block rounding (convert's option)"
    )
    parser.add_argument(
        "--no-gptq",
        action="store_true",
        help="every weight by per-block rounding: the stages around GPTQ (calibration, smoothing, verification) "
        "in minutes",
    )
    parser.add_argument(
        "--tracemalloc",
        action="store_true",
        help="where Python's and numpy's bytes were allocated at the peak",
    )
    args = parser.parse_args()
    recipe = Recipe(
        scheme=args.scheme,
        gptq=not args.no_gptq,
        gptq_samples=args.gptq_samples,
        lm_head_gptq=not args.no_lm_head_gptq,
    )
    weights = sum(f.stat().st_size for f in args.model.parent.glob(args.model.name + "*"))
    count = max(recipe.samples, recipe.gptq_samples) + recipe.verify_samples
    with tempfile.TemporaryDirectory(prefix="sq-onnx-trace-") as tmp:
        ids = np.random.default_rng(0).integers(3, args.vocab, (count, 1, SEQ_LEN), dtype=np.int64)
        np.savez(Path(tmp) / "ids.npz", input_ids=ids)
        with Tracer(snapshots=args.tracemalloc) as tracer:
            quantize_model.batch_grams = traced_batch_grams(tracer)
            traced_stages(tracer)
            result = convert(
                args.model, Path(tmp) / "out" / "model.onnx", recipe, calibration=Path(tmp) / "ids.npz"
            )
    console = Console(width=160)
    per_stage = ", ".join(f"{k} {v:.0f}" for k, v in result.stage_seconds.items() if v >= 1)
    console.print(
        f"total {result.seconds:.0f} s ({per_stage}); peak RSS {result.peak_rss_mb:.0f} MB, weights {weights / MB:.0f} MB"
    )
    table = Table(title="peak resident memory per phase (anonymous: without pages of memory-mapped files)")
    for col in ("phase", "peak MB", "over the weights MB", "peak anonymous MB"):
        table.add_column(col, justify="right")
    for phase, (rss, anon) in tracer.peaks().items():
        table.add_row(phase, f"{rss / MB:.0f}", f"{(rss - weights) / MB:+.0f}", f"{anon / MB:.0f}")
    console.print(table)
    table = Table(title="seconds per phase")
    table.add_column("phase")
    table.add_column("s", justify="right")
    for phase, seconds in tracer.seconds().items():
        table.add_row(phase, f"{seconds:.1f}")
    console.print(table)
    if tracer.highest is not None:
        traced, rss, phase, _ = tracer.highest
        table = Table(
            title=f"allocations at the traced high: {traced / MB:.0f} MB traced, RSS {rss / MB:.0f} MB ({phase})"
        )
        table.add_column("allocated at (innermost sq_onnx line)")
        table.add_column("MB", justify="right")
        for site, size in tracer.holders():
            table.add_row(site, f"{size / MB:.0f}")
        console.print(table)


if __name__ == "__main__":
    main()
