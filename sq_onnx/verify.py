"""Compare a converted model with its source on held-out samples: never convert silently.

The statistics are accumulated one sample at a time (``AgreementSums``), so verification holds one sample's
outputs besides the float model's reference: an LLM's logits are 50 MB per 256-token sample at a 49K vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from sq_onnx.runtime.ort_session import in_memory_session
from sq_onnx.runtime.progress import track


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
    model: ir.Model, feeds: list[dict[str, np.ndarray]], label: str, show_progress: bool
) -> Iterator[np.ndarray]:
    """Run ``model`` on each feed in turn and yield its first output (the logits of an LLM)."""
    with in_memory_session(model) as sess:
        name = sess.get_outputs()[0].name
        for feed in track(feeds, f"verifying ({label})", total=len(feeds), enabled=show_progress):
            yield np.asarray(sess.run([name], feed)[0], dtype=np.float32)


def first_outputs(
    model: ir.Model, feeds: list[dict[str, np.ndarray]], label: str, show_progress: bool
) -> list[np.ndarray]:
    """Every feed's first output, kept (for callers that need them all at once)."""
    return list(each_first_output(model, feeds, label, show_progress))


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, x.shape[-1]).astype(np.float64) if x.ndim else x.reshape(1, 1).astype(np.float64)


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
        self.samples += 1
        self.ref_square += float(np.square(ref).sum())
        self.diff_square += float(np.square(ref - out).sum())
        self.out_square += float(np.square(out).sum())
        norms = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
        safe = np.where(norms > 0, norms, 1.0)
        self.cosines += float(np.where(norms > 0, (ref * out).sum(axis=1) / safe, 1.0).sum())
        self.rows += ref.shape[0]
        self.has_top1 = self.has_top1 and ref.shape[1] > 1
        self.top1 += int((ref.argmax(axis=1) == out.argmax(axis=1)).sum())
        if ref.size:
            self.max_abs = max(self.max_abs, float(np.abs(ref - out).max()))

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
