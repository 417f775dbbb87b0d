"""Compare a converted model with its source on held-out samples: never convert silently."""

from __future__ import annotations

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


def first_outputs(
    model: ir.Model, feeds: list[dict[str, np.ndarray]], label: str, show_progress: bool
) -> list[np.ndarray]:
    """Run ``model`` on every feed and keep its first output (the logits of an LLM)."""
    with in_memory_session(model) as sess:
        name = sess.get_outputs()[0].name
        return [
            np.asarray(sess.run([name], feed)[0], dtype=np.float32)
            for feed in track(feeds, f"verifying ({label})", total=len(feeds), enabled=show_progress)
        ]


def compare(reference: list[np.ndarray], test: list[np.ndarray]) -> Agreement:
    """Relative L2 error, mean row cosine, top-1 agreement along the last axis, max abs error."""
    ref = np.concatenate([r.reshape(-1, r.shape[-1]) if r.ndim else r.reshape(1, 1) for r in reference])
    out = np.concatenate([t.reshape(-1, t.shape[-1]) if t.ndim else t.reshape(1, 1) for t in test])
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    denom = np.linalg.norm(ref64)
    rel = float(np.linalg.norm(ref64 - out64) / denom) if denom > 0 else float(np.linalg.norm(out64))
    norms = np.linalg.norm(ref64, axis=1) * np.linalg.norm(out64, axis=1)
    cos_rows = np.where(norms > 0, (ref64 * out64).sum(axis=1) / np.where(norms > 0, norms, 1), 1.0)
    top1 = float(np.mean(ref.argmax(axis=1) == out.argmax(axis=1))) if ref.shape[1] > 1 else None
    return Agreement(
        samples=len(reference),
        relative_error=rel,
        cosine=float(cos_rows.mean()),
        top1_agreement=top1,
        max_abs_error=float(np.abs(ref64 - out64).max()) if ref.size else 0.0,
    )
