"""Run a model segment by segment, one segment per batch of linears, as an iterator: each step yields the
batch's input as the model computes it *now*, so a caller that quantizes the batch before asking for the
next step gets every later input from the model with the earlier batches already quantized.
Method-agnostic: GPTQ's sequential Hessians (``sq_onnx.calibration.gptq_method``) are one user.

Running the whole model once per batch costs one forward pass per batch (a prototype was 4-5x slower than
the whole conversion). Instead the graph is cut into segments, one per batch: run r executes batch r-1's
linears (already quantized) and every node up to batch r's input, as a small ORT session of its own that
reads the values crossing into it from a cache the earlier runs filled. All runs together cost about one
forward pass; the cache holds only the values that cross a cut (the residual stream, attention masks,
rotary tables, an MLP's intermediate activation): per sample, a few [tokens, width] tensors. Past a memory
budget the widest of them go to files in a temporary folder (``SpillFolder``), read back and deleted by the
next run: exact, and cheaper than computing them again.

The same segments run on a float copy of the model give, row for row, the input the float model would
give each batch, which the asymmetric (float) target needs: X_qᵀX_f is summed like XᵀX, and no activation
is kept beyond the cut values.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from sq_onnx.errors import CalibrationError
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
        keep = frontier - {target}
        if target not in graph_inputs:
            frontier.add(target)
            keep = keep | {target}
        outputs = tuple(sorted(frontier - cached))
        runs.append(Run(target=target, outputs=outputs, keep=tuple(sorted(keep))))
        cached = keep
    return runs


def _depends_on_inputs(graph: ir.Graph, order: list[ir.Node]) -> set[str]:
    """Names of values computed from a graph input (the rest are constants: recomputed, never cached)."""
    live = {v.name for v in graph.inputs}
    for node in order:
        if any(v is not None and v.name in live for v in node.inputs):
            live.update(v.name for v in node.outputs)
    return live


def segment_model(
    model: ir.Model, cached: list[str], outputs: list[str], dtypes: dict[str, np.dtype] | None = None
) -> ir.Model:
    """The part of ``model`` that computes ``outputs`` from the graph inputs and the ``cached`` values,
    as a model of its own (initializers shared, not copied); inputs it does not read are dropped. A cached
    value the exporter wrote no type for (torch.onnx's TorchScript exporter leaves many) takes its dtype from
    ``dtypes`` (the cached arrays'): ONNX Runtime refuses graph inputs without one."""
    graph = model.graph
    inputs = [v.name for v in graph.inputs] + [c for c in cached if c not in outputs]
    sub = ir.convenience.extract(graph, inputs, outputs)
    for value in sub.inputs:
        if value.type is None and value.name in (dtypes or {}):
            value.type = ir.TensorType(ir.DataType.from_numpy(dtypes[value.name]))
    used = [v for v in sub.inputs if v.uses() or v in sub.outputs]
    sub.inputs.clear()
    sub.inputs.extend(used)
    return ir.Model(sub, ir_version=model.ir_version, functions=list(model.functions.values()))


Pair = tuple[np.ndarray, "np.ndarray | None"]
# Bytes of one batch's input that one stream computes before the other takes its turn: ORT's threads spin a
# while after each run, so two sessions taking turns sample by sample slow each other down (+30% on 2 cores).
CHUNK_BYTES = 1 << 26
# Most bytes of cached activations (all samples, both streams) held in memory; past it the widest values a run
# adds go to a ``SpillFolder``. (Recomputing an MLP's intermediate from gate/up's input instead cost about
# half a layer's forward pass again: 23% more GPTQ time on Qwen2.5-0.5B's shape.)
CACHE_BYTES = 1 << 30


@dataclass(frozen=True)
class Spilled:
    """One array in a file of a ``SpillFolder``."""

    path: Path
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        return np.fromfile(self.path, self.dtype).reshape(self.shape)

    def delete(self) -> None:
        self.path.unlink(missing_ok=True)


class SpillFolder:
    """Arrays written to files of a temporary folder (made on first use, under TMPDIR), for the cache values
    past the memory budget. The kernel's page cache may hold them for a while, but it can write them out and
    reclaim that memory, which it cannot do with this process's own."""

    def __init__(self, what: str = "GPTQ's activation cache", lower: str = "lower --gptq-samples") -> None:
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._count = 0
        self._what, self._lower = what, lower  # for the error: what was written, and what to lower

    def put(self, array: np.ndarray) -> Spilled:
        try:
            if self._dir is None:
                self._dir = tempfile.TemporaryDirectory(prefix="sq-onnx-cache-")
            path = Path(self._dir.name) / f"{self._count}.bin"
            self._count += 1
            np.ascontiguousarray(array).tofile(path)
        except OSError as e:
            where = self._dir.name if self._dir is not None else tempfile.gettempdir()
            raise CalibrationError(
                f"could not write {self._what} to {where} ({e.strerror}): free space there, point "
                f"TMPDIR at a larger disk, or {self._lower}."
            ) from e
        return Spilled(path, array.dtype, tuple(array.shape))

    def close(self) -> None:
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None


Entry = np.ndarray | Spilled


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
        self.runs = plan_runs(model.graph, batches)
        self.channels = [linears[0].shape[0] for linears in batches]
        self.feeds = feeds
        self.spill = SpillFolder()
        budget = CACHE_BYTES // (2 if float_copy else 1)
        self._streams = [_Stream(model, self.spill, budget)]
        if float_copy:
            self._streams.append(_Stream(copy_model(model), self.spill, budget))
        self._float = float_copy

    def __len__(self) -> int:
        return len(self.runs)

    def __iter__(self) -> Iterator[SegmentInputs]:
        try:
            for r, run in enumerate(self.runs):
                pairs = self._pairs(run, self.channels[r])
                yield SegmentInputs(
                    r, run.target, self.channels[r], len(self.feeds), pairs, with_float=self._float
                )
                for _ in pairs:  # the caller read fewer samples: finish the run so the caches stay whole
                    pass
        finally:
            self.spill.close()

    def _pairs(self, run: Run, channels: int) -> Iterator[Pair]:
        with ExitStack() as stack:
            sessions = [stack.enter_context(stream.begin(run, len(self.feeds))) for stream in self._streams]
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
    (per value, one entry per sample: the array, or where it was spilled). New values stay in memory up to
    ``budget`` bytes over all samples; past it the widest go to ``spill``."""

    def __init__(self, model: ir.Model, spill: SpillFolder, budget: int) -> None:
        self.model = model
        self.cache: dict[str, list[Entry | None]] = {}
        self._next: dict[str, list[Entry]] = {}
        self._inputs: list[str] | None = None  # the current segment session's input names
        self._spill, self._budget = spill, budget
        # the run's new values that go to files, chosen on its first sample
        self._to_spill: set[str] | None = None
        self._count = 0

    def begin(self, run: Run, count: int) -> AbstractContextManager[Any]:
        """The session of ``run``'s segment (read from the cache as it is now), or none when it computes nothing."""
        self._next, self._inputs, self._to_spill, self._count = {k: [] for k in run.keep}, None, None, count
        if not run.outputs:
            return nullcontext()
        dtypes = {
            name: entries[0].dtype
            for name, entries in self.cache.items()
            if entries and entries[0] is not None
        }
        return in_memory_session(segment_model(self.model, list(self.cache), list(run.outputs), dtypes))

    def sample(self, run: Run, sess: Any, i: int, feed: dict[str, np.ndarray]) -> np.ndarray:
        """Run the segment on sample ``i``; returns the run's target and files what the cache keeps. The
        sample's old entries are released as soon as they are read, so the cache is never held twice; a value
        kept unchanged keeps its place (memory or file)."""
        new: dict[str, np.ndarray] = {}
        if sess is not None:
            if self._inputs is None:
                self._inputs = [v.name for v in sess.get_inputs()]
            inputs = {n: self._array(n, i) if n in self.cache else feed[n] for n in self._inputs}
            new = dict(zip(run.outputs, sess.run(list(run.outputs), inputs), strict=True))
        target = new[run.target] if run.target in new else self._old(run.target, i, feed)
        if self._to_spill is None:
            self._to_spill = self._choose_spilled(new, run.keep, i)
        carried: set[int] = set()
        for name in run.keep:
            if name in new:
                value = new[name]
                self._next[name].append(self._spill.put(value) if name in self._to_spill else value)
            else:
                entry = self.cache[name][i] if name in self.cache else feed[name]
                assert entry is not None, f"{name} of sample {i} was released before it was read"
                self._next[name].append(entry)
                carried.add(id(entry))
        for entries in self.cache.values():
            entry = entries[i]
            if isinstance(entry, Spilled) and id(entry) not in carried:
                entry.delete()
            entries[i] = None
        return target

    def _choose_spilled(self, new: dict[str, np.ndarray], keep: tuple[str, ...], i: int) -> set[str]:
        """The new values to write to files: the widest, until the cache's values in memory (carried and new,
        every sample as large as this one) fit the budget."""
        held = sum(
            e.nbytes for n in keep if n in self.cache and isinstance(e := self.cache[n][i], np.ndarray)
        )
        fresh = sorted((n for n in keep if n in new), key=lambda n: new[n].nbytes, reverse=True)
        total = self._count * (held + sum(new[n].nbytes for n in fresh))
        spilled: set[str] = set()
        for name in fresh:
            if total <= self._budget:
                break
            spilled.add(name)
            total -= self._count * new[name].nbytes
        return spilled

    def _array(self, name: str, i: int) -> np.ndarray:
        entry = self.cache[name][i]
        assert entry is not None, f"{name} of sample {i} was released before it was read"
        return entry.load() if isinstance(entry, Spilled) else entry

    def _old(self, name: str, i: int, feed: dict[str, np.ndarray]) -> np.ndarray:
        return self._array(name, i) if name in self.cache else feed[name]

    def end(self) -> None:
        self.cache, self._next = self._next, {}
