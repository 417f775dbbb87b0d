"""Compare a converted model with its source on held-out samples: never convert silently.

The statistics are accumulated one sample at a time (``AgreementSums``), so verification holds one sample's
outputs besides the float model's reference: an LLM's logits are 50 MB per 256-token sample at a 49K vocabulary
(the reference is kept at half that, ``HeldOutput``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from sq_onnx.calibration.segment_runner import Spilled, SpillFolder
from sq_onnx.runtime.ort_session import in_memory_session
from sq_onnx.runtime.progress import track

# Relative error of the converted model's outputs at which convert warns: more error than half the signal. On
# SmolLM2 the defaults give 0.05-0.15; the QLinearMatMul form that broke it (tools/RESULTS.md) gave 0.99.
DEGRADED_ERROR = 0.5


def degradation_warning(verify: dict | None) -> str | None:
    """One sentence when verification shows the conversion lost the float model's function, else None."""
    if not verify or verify["relative_error"] < DEGRADED_ERROR:
        return None
    top1 = verify.get("top1_agreement")
    agree = "" if top1 is None else f", top-1 agreement {100 * top1:.0f}%"
    return (
        f"the converted model is far from the float one on {verify['samples']} held-out sample(s) (relative "
        f"error {verify['relative_error']:.2f}{agree}): check the recipe, or keep the layers that lose most "
        "in float with --exclude (--report lists them)."
    )


@dataclass(frozen=True)
class Agreement:
    """How close ``test`` outputs are to ``reference`` outputs (the first model output)."""

    samples: int
    relative_error: float
    cosine: float
    top1_agreement: float | None
    max_abs_error: float

    def to_dict(self) -> dict:
        return asdict(self)


def each_first_output(
    model: ir.Model,
    feeds: list[dict[str, np.ndarray]],
    label: str,
    show_progress: bool,
    keep: dict[str, list[np.ndarray]] | None = None,
) -> Iterator[np.ndarray]:
    """Run ``model`` on each feed in turn and yield its first output (the logits of an LLM). ``keep``: other
    outputs of the model to fetch too, each sample's appended to the list under its name."""
    extra = list(keep or {})
    with in_memory_session(model) as sess:
        name = sess.get_outputs()[0].name
        for feed in track(feeds, f"verifying ({label})", total=len(feeds), enabled=show_progress):
            results = sess.run([name, *extra], feed)
            for key, value in zip(extra, results[1:], strict=True):
                keep[key].append(value)  # type: ignore[index]
            yield np.asarray(results[0], dtype=np.float32)


def first_outputs(
    model: ir.Model, feeds: list[dict[str, np.ndarray]], label: str, show_progress: bool
) -> list[np.ndarray]:
    """Every feed's first output, kept (for callers that need them all at once)."""
    return list(each_first_output(model, feeds, label, show_progress))


# Most bytes of the float model's held reference outputs kept in memory; the rest go to files (TMPDIR) and are
# read back one sample at a time. 16 samples of 256 tokens at Llama 3's 128K vocabulary hold 1.05 GB, which
# with ORT's transient float copy of an 8-bit lm_head at accuracy level 0 (1 GB) made verification the peak of a
# 1B-class W4 conversion (tools/RESULTS.md).
REFERENCE_BYTES = 1 << 28


HALVING_BYTES = 8 * 1024**2  # float32 rows halved at a time


@dataclass(frozen=True)
class HeldOutput:
    """A reference output kept at half the memory: float16 offsets below each row's maximum, the maximum in
    float32. The largest values (the likeliest tokens, which KL, top-1 and the error are made of) keep
    nearly float32's precision; an offset of -16 to -32 is rounded by at most 0.008 (a token e^16 times less
    likely than the top one). Verification holds the float model's logits for every sample: 2 GB at 16
    samples of 256 tokens and Llama 3's 128K vocabulary in float32."""

    offsets: np.ndarray | Spilled  # float16, the output's shape (or in a file of a SpillFolder)
    row_max: np.ndarray  # float32, the output's shape with the last axis 1

    @classmethod
    def whole(cls, output: np.ndarray) -> HeldOutput:
        """Kept as it is, in float32 (the smoothing check tests exactness to 1e-4)."""
        return cls(np.asarray(output, dtype=np.float32), np.zeros((), np.float32))

    @classmethod
    def of(cls, output: np.ndarray) -> HeldOutput:
        output = np.asarray(output, dtype=np.float32)
        whole = cls.whole(output)
        if output.ndim == 0 or output.size == 0 or not np.isfinite(output).all():
            return whole
        row_max = output.max(axis=-1, keepdims=True)
        rows, maxima = output.reshape(-1, output.shape[-1]), row_max.reshape(-1, 1)
        offsets = np.empty(rows.shape, np.float16)
        step = max(1, HALVING_BYTES // max(1, rows.shape[1] * 4))
        for start in range(
            0, len(rows), step
        ):  # no float32 copy of the whole output (131 MB a sample at 128K)
            part = rows[start : start + step] - maxima[start : start + step]
            if part.min() < -float(np.finfo(np.float16).max):  # beyond float16 (a -1e9 mask value): as it is
                return whole
            offsets[start : start + step] = part
        return cls(offsets.reshape(output.shape), row_max)

    def restore(self) -> np.ndarray:
        offsets = self.offsets.load() if isinstance(self.offsets, Spilled) else self.offsets
        if offsets.dtype != np.float16:  # kept as it was (a scalar, empty, non-finite or beyond float16)
            return offsets
        return offsets.astype(np.float32) + self.row_max

    def nbytes(self) -> int:
        return 0 if isinstance(self.offsets, Spilled) else int(self.offsets.nbytes)

    def to_file(self, folder: SpillFolder) -> HeldOutput:
        """The same output with its offsets in a file of ``folder`` (the row maxima stay: 1/V of the size)."""
        return HeldOutput(folder.put(self.offsets), self.row_max)


class HeldOutputs:
    """Outputs kept as ``HeldOutput`` as they arrive, one float32 output at a time, then half of it; with
    ``spill``, those past REFERENCE_BYTES in its files."""

    def __init__(self, spill: SpillFolder | None = None) -> None:
        self.outputs: list[HeldOutput] = []
        self._spill, self._in_memory = spill, 0

    def add(self, output: np.ndarray) -> None:
        one = HeldOutput.of(output)
        if self._spill is not None and self._in_memory + one.nbytes() > REFERENCE_BYTES:
            one = one.to_file(self._spill)
        self._in_memory += one.nbytes()
        self.outputs.append(one)


def held_outputs(
    model: ir.Model,
    feeds: list[dict[str, np.ndarray]],
    label: str,
    show_progress: bool,
    spill: SpillFolder | None = None,
) -> list[HeldOutput]:
    """``first_outputs`` kept as ``HeldOutputs``."""
    held = HeldOutputs(spill)
    for out in each_first_output(model, feeds, label, show_progress):
        held.add(out)
    return held.outputs


def _rows(x: np.ndarray) -> np.ndarray:
    """[rows, last axis] in float32 (a view where it can be). The sums below are numpy's pairwise sums along
    rows (relative error about 1e-7 at 128K columns), added up in float64: float64 copies of both outputs
    took 2.5 s per sample at a 128K vocabulary, a third of verification's time at a 1B shape."""
    x = np.asarray(x, dtype=np.float32)
    return x.reshape(-1, x.shape[-1]) if x.ndim else x.reshape(1, 1)


class AgreementSums:
    """``compare``'s statistics summed sample by sample: relative L2 error over everything, mean row cosine,
    top-1 agreement along the last axis, max abs error."""

    def __init__(self) -> None:
        self.samples = 0
        self.ref_square = self.diff_square = self.out_square = self.cosines = self.max_abs = 0.0
        self.rows = self.top1 = 0
        self.has_top1 = True

    def add(self, reference: np.ndarray, test: np.ndarray) -> None:
        ref, out = _rows(reference), _rows(test)
        diff = ref - out
        ref_rows = np.square(ref).sum(axis=1, dtype=np.float32).astype(np.float64)
        out_rows = np.square(out).sum(axis=1, dtype=np.float32).astype(np.float64)
        dot_rows = (ref * out).sum(axis=1, dtype=np.float32).astype(np.float64)
        self.samples += 1
        self.ref_square += float(ref_rows.sum())
        self.diff_square += float(np.square(diff).sum(axis=1, dtype=np.float32).astype(np.float64).sum())
        self.out_square += float(out_rows.sum())
        norms = np.sqrt(ref_rows) * np.sqrt(out_rows)
        safe = np.where(norms > 0, norms, 1.0)
        self.cosines += float(np.where(norms > 0, dot_rows / safe, 1.0).sum())
        self.rows += ref.shape[0]
        self.has_top1 = self.has_top1 and ref.shape[1] > 1
        self.top1 += int((ref.argmax(axis=1) == out.argmax(axis=1)).sum())
        if ref.size:
            self.max_abs = max(self.max_abs, float(np.abs(diff).max()))

    def result(self) -> Agreement:
        if self.ref_square > 0:
            rel = float(np.sqrt(self.diff_square) / np.sqrt(self.ref_square))
        else:
            rel = float(np.sqrt(self.out_square))
        rows = max(self.rows, 1)
        return Agreement(
            samples=self.samples,
            relative_error=rel,
            cosine=self.cosines / rows,
            top1_agreement=self.top1 / rows if self.has_top1 and self.rows else None,
            max_abs_error=self.max_abs,
        )


def compare(reference: list[np.ndarray], test: list[np.ndarray]) -> Agreement:
    """Relative L2 error, mean row cosine, top-1 agreement along the last axis, max abs error."""
    sums = AgreementSums()
    for ref, out in zip(reference, test, strict=True):
        sums.add(ref, out)
    return sums.result()
