"""``--accuracy-level auto``: keep MatMulNBits' int8-activation kernels (level 4, about twice as fast on CPU)
only where the held-out samples show they cost at most a set perplexity increase over level 0.

Level 4 quantizes each block of activations to int8 inside the kernel; activation outliers are what break it
(onnxruntime issue 29849), and smoothing is what removes them, so the choice is made per model, measured.
Two estimates of the perplexity increase must both stay within the tolerance: the float model's expected one
(exp of the increase in KL divergence from the float model's next-token distribution, steady even on text the
model cannot predict) and the one on the samples' own next tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import onnx_ir as ir

from sq_onnx.lm.fast_losses import kl_rows, log_normalisers, next_token_nll
from sq_onnx.passes.graph_edit import MS

LEVEL_ATTR = "accuracy_level"


@dataclass(frozen=True)
class LevelChoice:
    """The level written, why, and what it was chosen on (nats per token; increases as fractions)."""

    level: int
    reason: str
    kl_level0: float | None = None
    kl_level4: float | None = None
    expected_increase: float | None = None  # exp(KL4 - KL0) - 1: under the float model's predictions
    nll_level0: float | None = None
    nll_level4: float | None = None
    sample_increase: float | None = None  # exp(NLL4 - NLL0) - 1: on the samples' next tokens
    # standard errors of the two increases over the samples (per-sample differences; None below 2 samples):
    # how far another draw of held-out text could move them, so a choice on the tolerance's edge reads as one
    expected_error: float | None = None
    sample_error: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _rows(logits: np.ndarray) -> np.ndarray:
    return logits.reshape(-1, logits.shape[-1])


class LossSums:
    """Mean KL from the float model and mean next-token NLL, summed one sample at a time so the choice
    holds one sample's logits per level (not every sample's)."""

    def __init__(self) -> None:
        self.kl_sum, self.kl_count = 0.0, 0
        self.nll_sum, self.nll_count, self.scorable = 0.0, 0, True
        self.sample_kl: list[float] = []  # each sample's mean, for the estimates' standard errors
        self.sample_nll: list[float] = []

    def add(self, reference: np.ndarray, output: np.ndarray, feed: dict[str, np.ndarray]) -> None:
        lse = self.add_kl(reference, output)
        self.add_nll(output, feed, lse)

    def add_kl(self, reference: np.ndarray, output: np.ndarray) -> np.ndarray:
        """Adds the sample's KL; returns log Σ exp of each output row (what its NLL needs again)."""
        kl, lse = kl_rows(_rows(reference), _rows(output))
        self.kl_sum, self.kl_count = self.kl_sum + float(kl.sum()), self.kl_count + kl.size
        self.sample_kl.append(float(kl.mean()))
        return lse

    def add_nll(self, output: np.ndarray, feed: dict[str, np.ndarray], lse: np.ndarray | None = None) -> None:
        ids = feed.get("input_ids")
        if ids is None or output.ndim != 3 or output.shape[:2] != ids.shape:
            self.scorable = False
            return
        lse = lse if lse is not None else log_normalisers(_rows(output))
        seq = ids.shape[1]
        for b in range(ids.shape[0]):
            nll = next_token_nll(output[b], lse[b * seq : (b + 1) * seq], ids[b])
            self.nll_sum, self.nll_count = self.nll_sum + float(nll.sum()), self.nll_count + nll.size
            self.sample_nll.append(float(nll.mean()))

    @property
    def kl(self) -> float:
        return self.kl_sum / self.kl_count

    @property
    def nll(self) -> float | None:
        """None when the feeds carry no ``input_ids`` to score."""
        return self.nll_sum / self.nll_count if self.scorable and self.nll_count else None


def mean_kl(reference: list[np.ndarray], outputs: list[np.ndarray]) -> float:
    """Mean KL(p_reference || p_output) over every position of every sample."""
    sums = LossSums()
    for ref, out in zip(reference, outputs, strict=True):
        sums.add_kl(ref, out)
    return sums.kl


def mean_nll(outputs: list[np.ndarray], feeds: list[dict[str, np.ndarray]]) -> float | None:
    """Mean negative log-likelihood of each next token ([batch, seq, vocab] logits); None when the feeds
    carry no ``input_ids`` to score."""
    sums = LossSums()
    for out, feed in zip(outputs, feeds, strict=True):
        sums.add_nll(out, feed)
    return sums.nll


def set_level(nodes: list[ir.Node], level: int) -> None:
    for node in nodes:
        node.attributes[LEVEL_ATTR] = ir.AttrInt64(LEVEL_ATTR, level)


def linear_nodes_in_file(graph: ir.Graph) -> list[ir.Node]:
    """In a written model, the MatMulNBits whose level ``--accuracy-level`` sets: all but the lm_head (the one
    whose output is the logits), which keeps ``--lm-head-accuracy-level``."""
    return [
        n
        for n in graph
        if n.domain == MS and n.op_type == "MatMulNBits" and not n.outputs[0].is_graph_output()
    ]


def w4_nodes(graph: ir.Graph, names: set[str]) -> list[ir.Node]:
    """The MatMulNBits nodes written for the named linears."""
    return [n for n in graph if n.domain == MS and n.op_type == "MatMulNBits" and n.name in names]


def increase_error(level0: list[float], level4: list[float]) -> float | None:
    """Standard error of exp(mean(level4 - level0)) - 1 over paired per-sample means (delta method); None
    below 2 samples."""
    if len(level0) < 2 or len(level0) != len(level4):
        return None
    diff = np.subtract(level4, level0)
    return float(math.exp(diff.mean()) * diff.std(ddof=1) / math.sqrt(diff.size))


def judge(losses0: LossSums, losses4: LossSums, tolerance: float) -> LevelChoice:
    """``choose`` on two levels' summed losses, with the standard errors of both estimates."""
    return choose(
        losses0.kl,
        losses4.kl,
        tolerance,
        losses0.nll,
        losses4.nll,
        expected_error=increase_error(losses0.sample_kl, losses4.sample_kl),
        sample_error=increase_error(losses0.sample_nll, losses4.sample_nll),
    )


def _with_error(increase: float, error: float | None) -> str:
    return f"{increase:+.2%}" if error is None else f"{increase:+.2%} (± {error:.2%})"


def choose(
    kl0: float,
    kl4: float,
    tolerance: float,
    nll0: float | None = None,
    nll4: float | None = None,
    expected_error: float | None = None,
    sample_error: float | None = None,
) -> LevelChoice:
    """Level 4 when both estimates of its perplexity increase over level 0 are at most ``tolerance``. The
    standard errors are reported, not used: the choice stays on the point estimates."""
    expected = math.exp(kl4 - kl0) - 1.0
    sample = None if nll0 is None or nll4 is None else math.exp(nll4 - nll0) - 1.0
    worst = max(expected, sample if sample is not None else -math.inf)
    within = worst <= tolerance
    on_samples = "" if sample is None else f", {_with_error(sample, sample_error)} on the samples' own tokens"
    reason = (
        f"level 4 raises perplexity over level 0 by {_with_error(expected, expected_error)} as the float model "
        f"predicts{on_samples} (held-out samples): {'within' if within else 'beyond'} the tolerance of "
        f"{tolerance:.2%}"
    )
    return LevelChoice(
        4 if within else 0,
        reason,
        kl0,
        kl4,
        expected,
        nll0,
        nll4,
        sample,
        expected_error,
        sample_error if sample is not None else None,
    )
