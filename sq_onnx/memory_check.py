"""Refuse, before any work, a conversion that cannot fit in this machine's memory, and say what to change.

The estimate is a lower bound of the peak (tools/RESULTS.md, "Peak memory against model size"): ONNX Runtime's
copy of the weights (twice that for a single-file model, whose protobuf is in memory too) plus the
activations GPTQ caches for its Hessians (samples x tokens x the narrowest linear input, the residual stream
that every cut holds, once per stream; the asymmetric target runs a float stream beside the quantized one), up
to the segment runner's memory budget: past it the cache goes to files in TMPDIR, whose free space is checked
too. A conversion refused here would have been killed for memory (or run out of disk) hours later.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from sq_onnx.calibration.segment_runner import CACHE_BYTES
from sq_onnx.errors import SqOnnxError
from sq_onnx.recipe import Recipe

_MEMINFO = Path("/proc/meminfo")
GB = 1024**3


class NotEnoughMemoryError(SqOnnxError):
    """The conversion needs more memory than the machine has available."""


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where unknown: no check)."""
    try:
        for line in _MEMINFO.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


@dataclass(frozen=True)
class MemoryNeed:
    """The parts of the lower bound, in bytes."""

    weights: int
    activations: int
    spilled: int = 0  # the cache's bytes past the memory budget, written to TMPDIR

    @property
    def total(self) -> int:
        return self.weights + self.activations


def memory_need(weight_bytes: int, external_data: bool, recipe: Recipe, cached_width: int) -> MemoryNeed:
    """Lower bound of a conversion's peak for a model of ``weight_bytes`` whose cached activations are at
    least ``cached_width`` channels wide per token."""
    weights = weight_bytes * (1 if external_data else 2)
    if recipe.uses_gptq:
        streams = 2 if recipe.gptq_asymmetric else 1
        cache = recipe.gptq_samples * recipe.seq_len * cached_width * 4 * streams
        return MemoryNeed(weights, min(cache, CACHE_BYTES), max(0, cache - CACHE_BYTES))
    return MemoryNeed(weights, recipe.samples * recipe.seq_len * cached_width * 4)


def check_memory(need: MemoryNeed, in_use: int, recipe: Recipe, external_data: bool) -> None:
    """Raise ``NotEnoughMemoryError`` when ``need`` exceeds the available memory plus what this process
    already holds (``in_use``: the loaded model is part of the need), or its spilled cache the free space
    of TMPDIR."""
    if need.spilled:
        folder = tempfile.gettempdir()
        disk = shutil.disk_usage(folder).free if Path(folder).is_dir() else 0
        if need.spilled > disk:
            raise NotEnoughMemoryError(
                f"GPTQ's activation cache needs {need.spilled / GB:.1f} GB of disk in {folder} beyond "
                f"{CACHE_BYTES / GB:.1f} GB in memory, and {disk / GB:.1f} GB is free there: point TMPDIR at a "
                f"larger disk or lower --gptq-samples (now {recipe.gptq_samples})."
            )
    free = available_bytes()
    if free is None or need.total <= free + in_use:
        return
    advice = []
    if recipe.uses_gptq and 4 * need.activations > need.total:  # a large part of the need
        advice.append(
            f"lower --gptq-samples (now {recipe.gptq_samples}; GPTQ's cached activations take "
            f"{need.activations / GB:.1f} GB)"
            + (" or pass --no-gptq-asymmetric" if recipe.gptq_asymmetric else "")
        )
    if not external_data:
        advice.append(
            "export the model with its weights in an external-data file (ORT then reads them in place)"
        )
    advice.append("run on a machine with more memory")
    raise NotEnoughMemoryError(
        f"this conversion needs at least {need.total / GB:.1f} GB of memory (weights {need.weights / GB:.1f} GB, "
        f"activations {need.activations / GB:.1f} GB) and {(free + in_use) / GB:.1f} GB is available: "
        + "; ".join(advice)
        + "."
    )
