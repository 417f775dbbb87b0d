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
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.linears import Linear
from sq_onnx.runtime.model_io import copy_model
from sq_onnx.runtime.ort_session import in_memory_session


@dataclass(frozen=True)
class Run:
    """What run r does: compute ``outputs`` (new cache entries, batch r's input among them unless it is a
    graph input) from the graph inputs and the cache, then keep only ``keep`` in the cache. A wide target
    (an MLP's intermediate activation) is computed for the batch's statistics but not kept: the next run
    recomputes it from the narrower values it came from, which ``keep`` holds instead."""

    target: str
    outputs: tuple[str, ...]
    keep: tuple[str, ...]


def plan_runs(graph: ir.Graph, batches: list[list[Linear]], widest_cached: int | None = None) -> list[Run]:
    """One run per batch, in order. ``batches`` must be in topological order (each batch's linears read
    one tensor). A node belongs to segment b if it is a linear of batch b, else to the segment before the
    first batch it leads to (next(n) - 1); nodes that lead to no batch are never run. A target wider than
    ``widest_cached`` channels (None: no limit) that ``_recompute`` allows is recomputed, not cached."""
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
    values = {v.name: v for node in order for v in node.outputs} | {v.name: v for v in graph.inputs}
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
        keep = frontier - {target}
        if target not in graph_inputs:
            frontier.add(target)
            sources = _sources(values[target], cached | graph_inputs, live)
            wide = widest_cached is not None and (_width(values[target]) or 0) > widest_cached
            recompute = wide and _recompute(values, target, keep, sources)
            keep = keep | sources if recompute else keep | {target}
        outputs = tuple(sorted(frontier - cached))
        runs.append(Run(target=target, outputs=outputs, keep=tuple(sorted(keep))))
        cached = keep
    return runs


def _width(value: ir.Value) -> int | None:
    """The channel count of an activation (its last dimension), None when unknown."""
    shape = value.shape
    return shape[-1] if shape is not None and len(shape) and isinstance(shape[-1], int) else None


def _sources(target: ir.Value, cached: set[str], live: set[str]) -> set[str]:
    """The cached (or graph input) values that ``target`` is computed from."""
    found: set[str] = set()
    stack, seen = [target], set()
    while stack:
        value = stack.pop()
        if value.name in seen or value.name not in live:
            continue  # constants are recomputed from initializers, never cached
        seen.add(value.name)
        if value.name in cached:
            found.add(value.name)
            continue
        producer = value.producer()
        if producer is not None:
            stack.extend(v for v in producer.inputs if v is not None)
    return found


def _recompute(values: dict[str, ir.Value], target: str, keep: set[str], sources: set[str]) -> bool:
    """Whether to drop ``target`` from the cache and keep ``sources`` instead, for the next run to recompute
    it: only for an expansion (the target at least twice as wide as every other cached value, like an MLP's
    intermediate activation) whose sources not already kept are at most half its width together."""
    width = _width(values[target])
    others = [w for v in keep if (w := _width(values[v])) is not None]  # masks' widths are symbolic
    extra = [_width(values[v]) for v in sources - keep]
    if width is None or None in extra or not others:
        return False
    return width >= 2 * max(others) and 2 * sum(extra) <= width  # type: ignore[arg-type]


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


Pair = tuple[np.ndarray, "np.ndarray | None"]
# Bytes of one batch's input that one stream computes before the other takes its turn: ORT's threads spin a
# while after each run, so two sessions taking turns sample by sample slow each other down (+30% on 2 cores).
CHUNK_BYTES = 1 << 26
# Most bytes of cached activations (all samples, both streams) that one wide batch input may take before it
# is recomputed by the next segment instead (recomputing an MLP's gate/up costs about half a layer's forward
# pass again: 25% of GPTQ's time on SmolLM2's shape, where caching it takes 0.8 GB).
CACHE_BYTES = 1 << 30


@dataclass
class SegmentInputs:
    """One step: the input of batch ``index`` (tensor ``target``, ``channels`` wide) for each of ``count``
    samples, as ``pairs``: (from the model as it stands, from the float copy taken at the start or None),
    produced one sample at a time while the caller reads them, so no step holds every sample's input at
    once. Read ``pairs`` once; the runner finishes the step itself if the caller stops early."""

    index: int
    target: str
    channels: int
    count: int
    pairs: Iterator[Pair]
    with_float: bool = False

    @classmethod
    def of(
        cls,
        index: int,
        target: str,
        channels: int,
        quantized: list[np.ndarray],
        floats: list[np.ndarray] | None,
    ) -> SegmentInputs:
        """A step over inputs already in memory (tests, callers with their own activations)."""
        others: list[np.ndarray | None] = list(floats) if floats is not None else [None] * len(quantized)
        pairs = iter(zip(quantized, others, strict=True))
        return cls(index, target, channels, len(quantized), pairs, with_float=floats is not None)


class SegmentRunner:
    """``for inputs in SegmentRunner(model, batches, feeds): ...`` runs segment r when step r is asked
    for, on ``model`` as it is then (the caller edits it in place between steps). With ``float_copy``, a
    copy of ``model`` taken now runs the same segments beside it, sample by sample in step with it."""

    def __init__(
        self,
        model: ir.Model,
        batches: list[list[Linear]],
        feeds: list[dict[str, np.ndarray]],
        float_copy: bool = False,
    ) -> None:
        model.graph.sort()  # plan_runs walks the nodes in topological order
        self.tokens = sum(_tokens(feed) for feed in feeds)
        streams = 2 if float_copy else 1
        self.runs = plan_runs(model.graph, batches, CACHE_BYTES // max(1, 4 * self.tokens * streams))
        self.channels = [linears[0].shape[0] for linears in batches]
        self.feeds = feeds
        self._streams = [_Stream(model)] + ([_Stream(copy_model(model))] if float_copy else [])
        self._float = float_copy

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[SegmentInputs]:
        for r, run in enumerate(self.runs):
            pairs = self._pairs(run, self.channels[r])
            yield SegmentInputs(
                r, run.target, self.channels[r], len(self.feeds), pairs, with_float=self._float
            )
            for _ in pairs:  # the caller read fewer samples: finish the run so the caches stay whole
                pass

    def _pairs(self, run: Run, channels: int) -> Iterator[Pair]:
        with ExitStack() as stack:
            sessions = [stack.enter_context(stream.begin(run)) for stream in self._streams]
            per_sample = 4 * max(1, self.tokens // max(1, len(self.feeds))) * channels
            step = max(1, CHUNK_BYTES // per_sample)
            for lo in range(0, len(self.feeds), step):
                chunk = range(lo, min(lo + step, len(self.feeds)))
                xs = [
                    [stream.sample(run, sess, i, self.feeds[i]) for i in chunk]
                    for stream, sess in zip(self._streams, sessions, strict=True)
                ]
                others = xs[1] if self._float else [None] * len(chunk)
                yield from zip(xs[0], others, strict=True)
            for stream in self._streams:
                stream.end()


def _tokens(feed: dict[str, np.ndarray]) -> int:
    """Tokens in one feed (its input_ids, else its largest input's leading dimensions)."""
    ids = feed.get("input_ids")
    if ids is not None:
        return int(ids.size)
    largest = max(feed.values(), key=lambda a: a.size, default=None)
    return int(np.prod(largest.shape[:-1])) if largest is not None and largest.ndim > 1 else 1


class _Stream:
    """One model run segment by segment over the feeds, with its cache of the values crossing the cuts
    (per value, one array per sample)."""

    def __init__(self, model: ir.Model) -> None:
        self.model = model
        self.cache: dict[str, list[np.ndarray | None]] = {}
        self._next: dict[str, list[np.ndarray | None]] = {}
        self._inputs: list[str] | None = None  # the current segment session's input names

    def begin(self, run: Run) -> AbstractContextManager[Any]:
        """The session of ``run``'s segment (read from the cache as it is now), or none when it computes nothing."""
        self._next, self._inputs = {k: [] for k in run.keep}, None
        if not run.outputs:
            return nullcontext()
        return in_memory_session(segment_model(self.model, list(self.cache), list(run.outputs)))

    def sample(self, run: Run, sess: Any, i: int, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Run the segment on sample ``i``; returns the run's target and files what the cache keeps. The
        sample's old entries are released as soon as they are read, so the cache is never held twice."""
        new: dict[str, np.ndarray] = {}
        if sess is not None:
            if self._inputs is None:
                self._inputs = [v.name for v in sess.get_inputs()]
            inputs = {n: self.cache[n][i] if n in self.cache else feed[n] for n in self._inputs}
            new = dict(zip(run.outputs, sess.run(list(run.outputs), inputs), strict=True))
        target = new[run.target] if run.target in new else self._old(run.target, i, feed)
        for name in run.keep:
            self._next[name].append(new[name] if name in new else self._old(name, i, feed))
        for entries in self.cache.values():
            entries[i] = None
        return target

    def _old(self, name: str, i: int, feed: dict[str, np.ndarray]) -> np.ndarray:
        if name in self.cache:
            value = self.cache[name][i]
            assert value is not None, f"{name} of sample {i} was released before it was read"
            return value
        return feed[name]

    def end(self) -> None:
        self.cache, self._next = self._next, {}
