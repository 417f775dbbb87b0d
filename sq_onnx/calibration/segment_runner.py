"""Run a model segment by segment, one segment per batch of linears, as an iterator: each step yields the
batch's input as the model computes it *now*, so a caller that quantizes the batch before asking for the
next step gets every later input from the model with the earlier batches already quantized.
Method-agnostic: GPTQ's sequential Hessians (``sq_onnx.calibration.gptq_method``) are one user.

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
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.linears import Linear
from sq_onnx.runtime.model_io import copy_model
from sq_onnx.runtime.ort_session import in_memory_session


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


@dataclass(frozen=True)
class SegmentInputs:
    """One step: the input of batch ``index`` (tensor ``target``, ``channels`` wide) per sample, from the
    model as it stands, and from the float copy taken at the start (None without one)."""

    index: int
    target: str
    channels: int
    quantized: list[np.ndarray]
    float: list[np.ndarray] | None


class SegmentRunner:
    """``for inputs in SegmentRunner(model, batches, feeds): ...`` runs segment r when step r is asked
    for, on ``model`` as it is then (the caller edits it in place between steps). With ``float_copy``, a
    copy of ``model`` taken now runs the same segments beside it."""

    def __init__(
        self,
        model: ir.Model,
        batches: list[list[Linear]],
        feeds: list[dict[str, np.ndarray]],
        float_copy: bool = False,
    ) -> None:
        model.graph.sort()  # plan_runs walks the nodes in topological order
        self.runs = plan_runs(model.graph, batches)
        self.channels = [linears[0].shape[0] for linears in batches]
        self.feeds = feeds
        self._streams = [_Stream(model)] + ([_Stream(copy_model(model))] if float_copy else [])

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[SegmentInputs]:
        for r, run in enumerate(self.runs):
            sources = [stream.advance(run, self.feeds) for stream in self._streams]
            yield SegmentInputs(
                r, run.target, self.channels[r], sources[0], sources[1] if len(sources) > 1 else None
            )


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
