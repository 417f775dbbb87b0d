"""GPTQ's sequential Hessians: each batch of linears gets XᵀX of its input as the model computes it with
every earlier batch already quantized, so a layer's weights are fitted to the inputs it will really see.

Running the whole model once per batch costs one forward pass per batch (a prototype was 4-5x slower than
the whole conversion). Instead the graph is cut into segments, one per batch: run r executes batch r-1's
linears (already quantized) and every node up to batch r's input, as a small ORT session of its own that
reads the values crossing into it from a cache the earlier runs filled. All runs together cost about one
forward pass; the cache holds only the values that cross a cut (the residual stream, attention masks,
rotary tables): per sample, a few [tokens, width] tensors.

The same segments run on a float copy of the model give, row for row, the input the float model would
give each batch, which the asymmetric (float) target needs: X_qᵀX_f is summed like XᵀX, and no activation
is kept beyond the cut values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sq_onnx.model_io import copy_model
from sq_onnx.ort_session import in_memory_session
from sq_onnx.passes.linears import Linear
from sq_onnx.quant.gptq import dampened_hessian

# Ridge of the float target's correction, as a fraction of mean(diag H) (chosen when GPTQ's dampening was 0.01). The
# correction is fitted on the calibration rows, and less of it generalises better. On SmolLM2 (KL to fp32
# on the whole held-out text, default recipe) 0.01: 0.0591, 0.1: 0.0539, 0.3: 0.0553 (docs/EXPERIMENTS.md).
TARGET_DAMP = 0.1
# Rows of activations multiplied at once when summing XᵀX over the cached samples.
GRAM_ROWS = 1 << 14


@dataclass(frozen=True)
class Run:
    """What run r does: compute ``outputs`` (new cache entries, batch r's input among them unless it is a
    graph input) from the graph inputs and the cache, then keep only ``keep`` in the cache."""

    target: str
    outputs: tuple[str, ...]
    keep: tuple[str, ...]


def plan_runs(graph: ir.Graph, batches: list[list[Linear]]) -> list[Run]:
    """One run per batch, in order. ``batches`` must be in topological order (each batch's linears read
    one tensor). A node belongs to segment b if it is a linear of batch b, else to the segment before the
    first batch it leads to (next(n) - 1); nodes that lead to no batch are never run."""
    batch_of = {lin.node: b for b, linears in enumerate(batches) for lin in linears}
    order = list(graph)  # onnx_ir graphs are kept topologically sorted by the passes that edit them
    nxt: dict[ir.Node, float] = {}
    for node in reversed(order):
        first = float(batch_of.get(node, math.inf))
        for out in node.outputs:
            for user, _ in out.uses():
                first = min(first, nxt.get(user, math.inf))
        nxt[node] = first
    segment = {n: (batch_of[n] if n in batch_of else nxt[n] - 1) for n in order if nxt[n] < math.inf}
    live = _depends_on_inputs(graph, order)
    last_use: dict[str, float] = {}  # value -> the last segment that reads it
    made_in: dict[str, float] = {}
    for node, seg in segment.items():
        for value in node.inputs:
            if value is not None and value.name in live:
                last_use[value.name] = max(last_use.get(value.name, -1), seg)
        for value in node.outputs:
            made_in[value.name] = seg
    graph_inputs = {v.name for v in graph.inputs}
    runs: list[Run] = []
    cached: set[str] = set()
    for r, linears in enumerate(batches):
        target = linears[0].input.name
        # the cache after run r (which executes segment r - 1): live values made in segments up to r - 1
        # and read in segment r or later
        frontier = {v for v, seg in made_in.items() if seg <= r - 1 and last_use.get(v, -1) >= r}
        if target not in graph_inputs:
            frontier.add(target)
        outputs = tuple(sorted(frontier - cached))
        runs.append(Run(target=target, outputs=outputs, keep=tuple(sorted(frontier))))
        cached = frontier
    return runs


def _depends_on_inputs(graph: ir.Graph, order: list[ir.Node]) -> set[str]:
    """Names of values computed from a graph input (the rest are constants: recomputed, never cached)."""
    live = {v.name for v in graph.inputs}
    for node in order:
        if any(v is not None and v.name in live for v in node.inputs):
            live.update(v.name for v in node.outputs)
    return live


def segment_model(model: ir.Model, cached: list[str], outputs: list[str]) -> ir.Model:
    """The part of ``model`` that computes ``outputs`` from the graph inputs and the ``cached`` values,
    as a model of its own (initializers shared, not copied); inputs it does not read are dropped."""
    graph = model.graph
    inputs = [v.name for v in graph.inputs] + [c for c in cached if c not in outputs]
    sub = ir.convenience.extract(graph, inputs, outputs)
    used = [v for v in sub.inputs if v.uses() or v in sub.outputs]
    sub.inputs.clear()
    sub.inputs.extend(used)
    return ir.Model(sub, ir_version=model.ir_version, functions=list(model.functions.values()))


def gram(
    arrays: list[np.ndarray], channels: int, others: list[np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Σ XᵀX over ``arrays`` (each flattened to [rows, channels]) and, with ``others`` (same shapes, row for
    row), Σ XᵀY, in one pass over float32 blocks of GRAM_ROWS rows (each X block joined once)."""
    total = np.zeros((channels, channels), np.float64)
    cross = None if others is None else np.zeros((channels, channels), np.float64)
    per_block = max(1, GRAM_ROWS * channels // max(1, arrays[0].size)) if arrays else 1

    def rows(source: list[np.ndarray], start: int) -> np.ndarray:
        part = source[start : start + per_block]
        return np.concatenate([np.asarray(a, np.float32).reshape(-1, channels) for a in part])

    for start in range(0, len(arrays), per_block):
        x = rows(arrays, start)
        total += x.T @ x  # numpy runs syrk for x.T @ x
        if cross is not None and others is not None:
            cross += x.T @ rows(others, start)
    return total.astype(np.float32), (None if cross is None else cross.astype(np.float32))


class SequentialHessians:
    """``hessians(name)`` for ``quantize_graph``: asked in batch order, each call runs the next segment of
    ``model`` (the graph being quantized in place, so earlier batches are already quantized) over the
    feeds and returns XᵀX of that batch's input.

    With ``float_target`` a float copy of ``model`` (taken now, before anything is quantized) runs the
    same segments beside it, and ``float_target`` maps the last batch's weights to the ones that best
    reproduce the float model's output from the quantized model's input, so each layer also undoes the
    error the earlier ones left in its input (GPTAQ's asymmetric calibration, Li et al., 2025)."""

    def __init__(
        self,
        model: ir.Model,
        batches: list[list[Linear]],
        feeds: list[dict[str, np.ndarray]],
        float_target: bool = False,
        target_ridge: float = TARGET_DAMP,
        holdout: int = 0,
    ) -> None:
        self._feeds = feeds
        self.holdout = holdout if 0 < holdout < len(feeds) else 0
        model.graph.sort()  # plan_runs walks the nodes in topological order
        self._runs = plan_runs(model.graph, batches)
        self._channels = [linears[0].shape[0] for linears in batches]
        self.target_ridge = target_ridge
        self._streams = [_Stream(model)] + ([_Stream(copy_model(model))] if float_target else [])
        self.cross: np.ndarray | None = None  # X_qᵀX_f of the last batch's input
        self._hessian: np.ndarray | None = None
        self._held: tuple[np.ndarray, np.ndarray | None] | None = None  # the held-out samples' XᵀX, X_qᵀX_f
        self.next_run = 0

    def __call__(self, name: str) -> np.ndarray:
        r = self.next_run
        if r >= len(self._runs) or self._runs[r].target != name:
            expected = self._runs[r].target if r < len(self._runs) else "nothing"
            raise RuntimeError(f"sequential Hessians asked for {name!r}, expected {expected!r}")
        run = self._runs[r]
        sources = [stream.advance(run, self._feeds) for stream in self._streams]
        self.next_run += 1
        fit = len(self._feeds) - self.holdout
        self._hessian, self.cross = gram(sources[0][:fit], self._channels[r], *(s[:fit] for s in sources[1:]))
        if self.holdout:
            self._held = gram(sources[0][fit:], self._channels[r], *(s[fit:] for s in sources[1:]))
        return self._hessian

    def held_out_loss(self, w: np.ndarray, w_hat: np.ndarray) -> float:
        """The last batch's output error on the held-out samples, up to a constant: ‖X_q Ŵ − X_f W‖² with
        the float target, ‖X Ŵ − X W‖² without (X_f = X). Compares candidate Ŵ for the same W."""
        if self._held is None:
            raise RuntimeError("no samples were held out")
        h, cross = self._held
        c = h if cross is None else cross
        d = w_hat.astype(np.float64)
        return float(np.sum(d * (h.astype(np.float64) @ d)) - 2.0 * np.sum(d * (c.astype(np.float64) @ w)))

    def float_target(self, w: np.ndarray) -> np.ndarray:
        """``float_target_weight`` of the last batch's joined [K, N] weight (``w`` itself without a float
        copy)."""
        if self.cross is None or self._hessian is None:
            return w
        return float_target_weight(w, self._hessian, self.cross, self.target_ridge)


class _Stream:
    """One model run segment by segment over the feeds, with its cache of the values crossing the cuts."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.cache: dict[str, list[np.ndarray]] = {}

    def advance(self, run: Run, feeds: list[dict[str, np.ndarray]]) -> list[np.ndarray]:
        """Execute ``run``; returns the run's target per feed."""
        if run.outputs:
            sub = segment_model(self.model, list(self.cache), list(run.outputs))
            names = [v.name for v in sub.graph.inputs]
            results: dict[str, list[np.ndarray]] = {o: [] for o in run.outputs}
            with in_memory_session(sub) as sess:
                for i, feed in enumerate(feeds):
                    inputs = {n: self.cache[n][i] if n in self.cache else feed[n] for n in names}
                    for o, arr in zip(run.outputs, sess.run(list(run.outputs), inputs), strict=True):
                        results[o].append(arr)
            self.cache.update(results)
        self.cache = {k: self.cache[k] for k in run.keep}
        return self.cache[run.target] if run.target in self.cache else [f[run.target] for f in feeds]


def float_target_weight(
    w: np.ndarray, hessian: np.ndarray, cross: np.ndarray, damp: float = TARGET_DAMP
) -> np.ndarray:
    """argmin_Ŵ ‖X_q Ŵ − X_f W‖² = W + H⁻¹X_qᵀ(X_f − X_q)W (H = X_qᵀX_q): quantizing this target with
    GPTQ on H minimises the distance to the float model's output, not to this layer's own output on the
    already degraded input. The correction is a ridge regression of the upstream error on the layer's input,
    with ``damp`` x mean(diag H) on the diagonal; W itself is never shrunk, so a layer whose input is still
    exact keeps W. ``w`` [K, N]."""
    h, _ = dampened_hessian(hessian, damp)
    delta = cross.astype(np.float64) - hessian.astype(np.float64)  # X_qᵀ(X_f − X_q)
    w64 = w.astype(np.float64)
    return (w64 + np.linalg.solve(h, delta @ w64)).astype(np.float32)
