"""SmoothQuant's exact rewrite: divide a group's tensor by s (in γ/β), multiply its weights' rows by s.

Precondition: groups come from ``passes.analyze`` on this graph, and ``act_absmax`` holds the calibrated
per-channel abs-max of each group's tensor (keyed by tensor name). The float function is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from sq_onnx.passes.analyze import SmoothGroup
from sq_onnx.passes.graph_edit import add_initializer, require_in_graph, set_weight_lazy
from sq_onnx.passes.linears import Linear, constant_array, release_weight
from sq_onnx.quant.smoothing import smoothing_scales


def weight_row_absmax(group: SmoothGroup) -> np.ndarray:
    """max_i |W_i[j, :]| over every consumer: one shared scale must suit all of them."""
    rows = []
    for c in group.consumers:
        rows.append(np.abs(c.weight_kn().astype(np.float32)).max(axis=1))
        c.release()
    return np.max(np.stack(rows), axis=0)


@dataclass
class SmoothedGroup:
    name: str
    kind: str
    alpha: float
    consumers: list[str]
    scale_min: float
    scale_max: float
    act_absmax_before: float
    act_absmax_after: float


def producer_scales(group: SmoothGroup, scales: np.ndarray) -> np.ndarray:
    """s per producer column: the tensor's own s, or, where several channels read one column (query heads
    sharing a KV head), that column's s (tied: ``tied_scales``); 1 for the columns the tensor does not read
    (the other parts of a fused projection)."""
    if group.column_map is None:
        return scales
    out = np.ones(_producer_width(group), scales.dtype)
    out[group.column_map] = scales
    return out


def _producer_width(group: SmoothGroup) -> int:
    """Columns of the producing linear (a fused projection has more than the tensor reads), or as many as the
    map names."""
    return group.fold_columns[0].shape[1] if group.fold_columns else int(group.column_map.max()) + 1


def tied_scales(group: SmoothGroup, act: np.ndarray, w: np.ndarray, alpha: float) -> np.ndarray:
    """Smoothing scales, one per producer column when channels share one: from the largest activation and
    weight row among the channels that share it, so every channel gets the same s."""
    if group.column_map is None:
        return smoothing_scales(act, w, alpha)
    n = _producer_width(group)
    act_cols, w_cols = np.zeros(n, np.float64), np.zeros(n, np.float64)
    np.maximum.at(act_cols, group.column_map, act)
    np.maximum.at(w_cols, group.column_map, w)
    return smoothing_scales(act_cols, w_cols, alpha)[group.column_map]


def apply_smoothing(graph: ir.Graph, group: SmoothGroup, scales: np.ndarray) -> None:
    """Fold 1/s into the producer's constants and s into every consumer's weight rows (new initializers)."""
    s = producer_scales(group, scales).astype(np.float64)
    for node, index in group.fold_into:
        old = constant_array(node.inputs[index])
        assert old is not None
        new = (old.astype(np.float64) / s.reshape((1,) * (old.ndim - 1) + (-1,))).astype(old.dtype)
        base = f"{node.inputs[index].name or node.name}.smoothed"
        node.replace_input_with(index, add_initializer(graph, base, new))
    for linear in group.fold_columns:
        set_weight_lazy(graph, linear, _scaled(linear, s, axis=1), linear.source.dtype, "smoothed_out")
    for linear in group.consumers:
        set_weight_lazy(graph, linear, _scaled(linear, scales, axis=0), linear.source.dtype, "smoothed")


def _scaled(linear: Linear, scales: np.ndarray, axis: int):
    """A function computing the [K, N] weight the linear has now with its rows multiplied (axis 0:
    s_j * W[j, :]) or its columns divided (axis 1: W[:, j] / s_j), correctly rounded in its dtype; called
    only when the new weight is read."""
    original, source = linear.weight_as_now(), linear.source
    shape = (-1, 1) if axis == 0 else (1, -1)

    def make() -> np.ndarray:
        # Row-major results: the weight read may be a transposed view (a tied lm_head reads the embedding as
        # [K, N]), and numpy would keep its column order, which the initializer then copies once more
        # (1 GB each at Llama-3.2-1B's lm_head, both alive at once).
        w = original()
        if w.dtype == np.float32 and axis == 0:  # one float32 product is correctly rounded
            out = np.multiply(w, scales.astype(np.float32).reshape(shape), order="C")
        elif axis == 0:
            out = (w.astype(np.float64) * scales.astype(np.float64).reshape(shape)).astype(w.dtype, order="C")
        else:
            out = (w.astype(np.float64) / scales.astype(np.float64).reshape(shape)).astype(w.dtype, order="C")
        del w
        release_weight(source)
        return out

    return make


def smooth_groups(
    graph: ir.Graph,
    groups: list[SmoothGroup],
    act_absmax: dict[str, np.ndarray],
    alpha: float | dict[str, float],
) -> tuple[list[SmoothedGroup], dict[str, np.ndarray]]:
    """Smooth every group with calibration statistics; ``alpha`` is one value or one per group tensor.
    Returns one record per group and the scales used (group tensor -> s)."""
    done, scales = [], {}
    for group in groups:
        act = act_absmax[group.name]
        a = alpha[group.name] if isinstance(alpha, dict) else alpha
        s = tied_scales(group, act, weight_row_absmax(group), a)
        apply_smoothing(graph, group, s)
        scales[group.name] = s
        done.append(
            SmoothedGroup(
                name=group.name,
                kind=group.kind,
                alpha=float(a),
                consumers=[c.name for c in group.consumers],
                scale_min=float(s.min()),
                scale_max=float(s.max()),
                act_absmax_before=float(act.max()),
                act_absmax_after=float((act / s).max()),
            )
        )
    return done, scales


class SmoothPass(ir.passes.InPlacePass):
    """Smooth the given norm -> linears groups (``passes.analyze`` found them on this graph).

    Precondition (``requires``): every group's producer and consumers are nodes of this graph; ``act_absmax``
    holds, for every group, a finite, non-negative per-channel abs-max of the group's tensor with one value
    per channel, and ``alpha`` (one value, or one per group tensor) covers every group. After the call,
    ``smoothed`` holds one record per group and ``scales`` the s of each group tensor.
    """

    def __init__(
        self, groups: list[SmoothGroup], act_absmax: dict[str, np.ndarray], alpha: float | dict[str, float]
    ):
        super().__init__()
        self.groups = groups
        self.act_absmax = act_absmax
        self.alpha = alpha
        self.smoothed: list[SmoothedGroup] = []
        self.scales: dict[str, np.ndarray] = {}

    def requires(self, model: ir.Model) -> None:
        require_in_graph(model, [c for group in self.groups for c in group.consumers])
        nodes = {id(n) for n in model.graph}
        for group in self.groups:
            if id(group.producer) not in nodes:
                raise ir.passes.PreconditionError(f"group {group.name!r} is not of this graph")
            stats = self.act_absmax.get(group.name)
            if stats is None or np.shape(stats) != (group.channels,):
                raise ir.passes.PreconditionError(
                    f"no per-channel statistics of {group.channels} values for group {group.name!r}"
                )
            if not (np.all(np.isfinite(stats)) and np.all(np.asarray(stats) >= 0)):
                raise ir.passes.PreconditionError(f"statistics of {group.name!r} are negative or not finite")
            if isinstance(self.alpha, dict) and group.name not in self.alpha:
                raise ir.passes.PreconditionError(f"no alpha for group {group.name!r}")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.smoothed, self.scales = smooth_groups(model.graph, self.groups, self.act_absmax, self.alpha)
        return ir.passes.PassResult(model, modified=bool(self.smoothed))
