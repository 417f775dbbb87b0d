"""Fuse a norm with the per-token quantization of its output (``--kernels sq_onnx``), as onnxscript rewrite
rules.

``quantize_w8a8_custom`` writes ``QuantizePerToken(X)`` once per input of the quantized linears. When X is
the one output in use of a last-axis norm and that quantization is its only reader, the two become one fused
op of custom_ops/ (RMSNormQuant; SkipRMSNormQuant, which keeps the residual sum; LayerNormQuant) with the
norm's γ, β and epsilon, so X is never written to memory. An RMSNorm spelled out in ONNX ops, as torch.onnx
exports LlamaRMSNorm, becomes RMSNormQuant the same way:

    γ * (x * Reciprocal(Sqrt(ReduceMean(Pow(x, 2), axes=[-1], keepdims=1) + eps)))

(``Div(1, ·)`` for the Reciprocal and ``Mul(x, x)`` for the Pow too, either operand order, and a no-op ``Cast``
back to x's type before γ, as torch.onnx's TorchScript exporter writes it). The rules match
without removing nodes (``remove_nodes=False``) so that their ``check`` sees every candidate and says in
words why it declines; ``FuseNormQuantPass`` collects those reasons, and the cleanup drops what no one reads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchingTracer, MatchStatus

from sq_onnx.passes.graph_edit import MS, SQ
from sq_onnx.passes.linears import _attr_float, _attr_int, constant_array, constant_scalar, is_constant


@dataclass(frozen=True)
class NormKind:
    """A norm op that has a fused quantizing form: which inputs the fused op takes (x, [skip,] γ[, β]) and
    the epsilon ORT assumes when the attribute is absent."""

    domain: str
    op_type: str
    fused: str
    default_eps: float
    inputs: int
    residual_sum: bool = False


NORM_KINDS = (
    NormKind("", "SimplifiedLayerNormalization", "RMSNormQuant", 1e-5, 2),
    NormKind(MS, "SimplifiedLayerNormalization", "RMSNormQuant", 1e-5, 2),
    NormKind("", "RMSNormalization", "RMSNormQuant", 1e-5, 2),
    NormKind(MS, "SkipSimplifiedLayerNormalization", "SkipRMSNormQuant", 1e-12, 4, residual_sum=True),
    NormKind("", "LayerNormalization", "LayerNormQuant", 1e-5, 3),
)


@dataclass(frozen=True)
class Refusal:
    """A norm that feeds a quantized linear but was not fused, and why (X is then written and quantized)."""

    tensor: str
    norm: str
    reason: str


def _fail(reason: str) -> pattern.MatchResult:
    return pattern.MatchResult().fail(reason)


def _only_read_by(
    value: ir.Value, reader: ir.Node, what: str, shape_readers: bool = False
) -> pattern.MatchResult | None:
    """A refusal when ``value`` has readers besides ``reader``, the next step the fusion replaces, else None.
    ``shape_readers``: readers of its shape alone (``Shape``) do not count (``_shapes_from``)."""
    if value.is_graph_output():
        return _fail(f"{what} is a graph output")
    others = [
        user.op_type
        for user, _ in value.uses()
        if user is not reader and not (shape_readers and _reads_shape(user))
    ]
    if others:
        return _fail(f"{what} is also read by {', '.join(sorted(set(others)))}, which is not quantized")
    return None


def _last_axis(axis: int, x: ir.Value) -> bool:
    rank = x.shape.rank() if x.shape is not None else None
    return axis == -1 or (rank is not None and axis == rank - 1)


class NormQuantFusion(pattern.RewriteRuleClassBase):
    """norm(x, [skip,] γ[, β]) -> QuantizePerToken  =>  the fused op, same γ, β and epsilon."""

    def __init__(self, kind: NormKind, with_sum: bool = False):
        suffix = " with its residual sum" if with_sum else ""
        super().__init__(
            name=f"{kind.op_type}({kind.domain or 'ai.onnx'}) -> {kind.fused}{suffix}", remove_nodes=False
        )
        self.kind, self.with_sum = kind, with_sum

    def pattern(self, op, x):
        names = ["y", "mean", "inv_std", "total"] if self.with_sum else ["y"]
        outs = getattr(op, self.kind.op_type)(
            x,
            _domain=self.kind.domain,
            _allow_other_inputs=True,
            _allow_other_attributes=True,
            _outputs=names,
        )
        y = outs[0] if self.with_sum else outs
        xq, xs = op.QuantizePerToken(y, _domain=SQ, _outputs=2)
        return (xq, xs, outs[3]) if self.with_sum else (xq, xs)

    def check(self, context, x, y, **_) -> pattern.MatchResult:
        used = _only_read_by(y, context.root, "the norm's output")
        return used if used is not None else self.check_norm(x, y)

    def check_norm(self, x: ir.Value, y: ir.Value) -> pattern.MatchResult:
        """What the norm itself must be for the fused op: its other outputs unread, the last axis, the inputs
        the fused op takes."""
        norm = y.producer()
        sum_index = 3 if self.kind.residual_sum else None
        if not self.with_sum and sum_index is not None and len(norm.outputs) > 3 and norm.outputs[3].uses():
            return _fail("its residual sum is read (the rule that keeps the sum applies)")
        extra = [
            i
            for i, out in enumerate(norm.outputs)
            if i not in (0, sum_index) and (out.uses() or out.is_graph_output())
        ]
        if extra:
            return _fail("its mean / inverse std-dev outputs are read")
        if not _last_axis(_attr_int(norm, "axis", -1), x):
            return _fail(f"it normalises over axis {_attr_int(norm, 'axis', -1)}, not the last")
        if len(norm.inputs) > self.kind.inputs:
            return _fail(f"it has {len(norm.inputs)} inputs; {self.kind.fused} takes {self.kind.inputs}")
        return pattern.MatchResult()

    def rewrite(self, op, y, **_):
        return self.fused(op, y)

    def fused(self, op, y: ir.Value):
        norm = y.producer()
        eps = _attr_float(norm, "epsilon", self.kind.default_eps)
        outputs = 3 if self.kind.residual_sum else 2
        fused = getattr(op, self.kind.fused)(*norm.inputs, epsilon=eps, _domain=SQ, _outputs=outputs)
        return fused if self.with_sum or not self.kind.residual_sum else fused[:2]


class NormReshapeQuantFusion(NormQuantFusion):
    """norm(x, γ[, β]) -> Reshape to [..., C] -> QuantizePerToken  =>  the fused op, then the Reshape of its codes
    and of its scales (to [..., 1]). GPT-2's Conv1D flattens [B, S, C] to [B*S, C] before its addmm; a reshape that
    keeps the last axis keeps each row whole and in order, so quantizing per row before or after it is the same."""

    def __init__(self, kind: NormKind):
        super().__init__(kind)
        self.name = f"{kind.op_type}({kind.domain or 'ai.onnx'}) -> Reshape -> {kind.fused}"

    def pattern(self, op, x, shape):
        y = getattr(op, self.kind.op_type)(
            x,
            _domain=self.kind.domain,
            _allow_other_inputs=True,
            _allow_other_attributes=True,
            _outputs=["y"],
        )
        flat = op.Reshape(y, shape, _allow_other_attributes=True, _outputs=["flat"])
        return op.QuantizePerToken(flat, _domain=SQ, _outputs=2)

    def check(self, context, x, y, shape, flat, **_) -> pattern.MatchResult:
        for value, reader, what in (
            (y, flat.producer(), "the norm's output"),
            (flat, context.root, "its reshape"),
        ):
            used = _only_read_by(value, reader, what)
            if used is not None:
                return used
        dims = constant_array(shape) if is_constant(shape) else None
        channels = y.shape[-1] if y.shape is not None and y.shape.rank() else None
        if dims is None or dims.ndim != 1 or not isinstance(channels, int) or int(dims[-1]) != channels:
            return _fail(
                "the reshape between the norm and the quantization does not keep the last axis (a constant shape)"
            )
        return self.check_norm(x, y)

    def rewrite(self, op, y, shape, flat, **_):
        xq, xs = self.fused(op, y)
        allowzero = _attr_int(flat.producer(), "allowzero", 0)
        dims = constant_array(shape).astype(np.int64)
        scale_shape = op.Constant(value=ir.tensor(np.concatenate([dims[:-1], [1]]).astype(np.int64)))
        return op.Reshape(xq, shape, allowzero=allowzero), op.Reshape(xs, scale_shape, allowzero=allowzero)


def _reduced_axes(node: ir.Node) -> list[int] | None:
    attr = node.attributes.get("axes")
    if attr is not None:
        return list(attr.value)
    if len(node.inputs) > 1 and is_constant(node.inputs[1]):
        return constant_array(node.inputs[1]).reshape(-1).tolist()
    return None


class DecomposedRMSNormQuantFusion(pattern.RewriteRuleClassBase):
    """γ * (x * 1/sqrt(mean(x², last axis) + eps)) -> QuantizePerToken  =>  RMSNormQuant(x, γ)."""

    def __init__(self):
        super().__init__(name="RMSNorm spelled out in ONNX ops -> RMSNormQuant", remove_nodes=False)

    def pattern(self, op, x, two, eps, one, gamma):
        squared = pattern.OrValue([op.Pow(x, two), op.Mul(x, x)], name="squared")
        mean = op.ReduceMean(
            squared, _allow_other_inputs=True, _allow_other_attributes=True, _outputs=["mean"]
        )
        shifted = op.Add(mean, eps, _outputs=["shifted"])
        root = op.Sqrt(shifted, _outputs=["root"])
        inverse = pattern.OrValue([op.Reciprocal(root), op.Div(one, root)], name="inverse")
        scaled = op.Mul(x, inverse, _outputs=["scaled"])
        # torch.onnx's TorchScript exporter casts the normed value back to x's type before γ (a no-op in float32)
        normed = pattern.OrValue(
            [op.Cast(scaled, _allow_other_attributes=True, _outputs=["cast"]), scaled],
            tag_var="cast_back",
            tag_values=[True, False],
        )
        y = op.Mul(gamma, normed, _outputs=["y"])
        return op.QuantizePerToken(y, _domain=SQ, _outputs=2)

    def check(self, context, x, two, eps, one, gamma, y, cast_back=False, **values) -> pattern.MatchResult:
        if cast_back and (x.dtype is None or _attr_int(values["cast"].producer(), "to", 0) != x.dtype.value):
            return _fail("the normed value is cast to another type than x's before γ")
        if two is not None and constant_scalar(two) != 2.0:
            return _fail("the square is a Pow by something other than the constant 2")
        if one is not None and constant_scalar(one) != 1.0:
            return _fail("the inverse is a Div of something other than the constant 1")
        if constant_scalar(eps) is None:
            return _fail("epsilon is not a constant scalar")
        g = constant_array(gamma) if is_constant(gamma) else None
        if g is None or g.ndim != 1 or not np.issubdtype(g.dtype, np.floating):
            return _fail("γ is not a constant float vector")
        channels = x.shape[-1] if x.shape is not None and x.shape.rank() else None
        if isinstance(channels, int) and channels != g.shape[0]:
            return _fail(f"γ has {g.shape[0]} channels, x {channels}")
        reduce = values["mean"].producer()
        axes = _reduced_axes(reduce)
        if (
            _attr_int(reduce, "keepdims", 1) != 1
            or axes is None
            or len(axes) != 1
            or not _last_axis(axes[0], x)
        ):
            return _fail("the mean is not over the last axis with keepdims=1")
        steps = ("squared", "mean", "shifted", "root", "inverse", "scaled") + (("cast",) if cast_back else ())
        chain = [values[name] for name in steps]
        readers = [v.producer() for v in chain[1:]] + [y.producer(), context.root]
        whats = [f"its {name} step" for name in steps]
        for value, reader, what in zip([*chain, y], readers, [*whats, "the norm's output"], strict=True):
            used = _only_read_by(value, reader, what, shape_readers=value is y)
            if used is not None:
                return used
        return pattern.MatchResult()

    def rewrite(self, op, x, eps, gamma, y, **_):
        _shapes_from(y, x)
        return op.RMSNormQuant(x, gamma, epsilon=constant_scalar(eps), _domain=SQ, _outputs=2)


def _reads_shape(node: ir.Node) -> bool:
    return node.op_type == "Shape" and node.domain == ""


def _shapes_from(y: ir.Value, x: ir.Value) -> None:
    """``Shape`` readers of the norm's output ``y`` read ``x`` instead (a norm keeps its input's shape; γ is a
    vector over the last axis): torch.onnx's TorchScript attention reads the input norm's output shape, and
    would otherwise keep the whole decomposed norm computed for it."""
    for user, index in list(y.uses()):
        if _reads_shape(user):
            user.replace_input_with(index, x)


def fusion_rules() -> pattern.RewriteRuleSet:
    """Every norm kind's rule (the one keeping the residual sum before the plain Skip rule), with the
    commuted spellings of the decomposed RMSNorm's Add and Muls."""
    rules = []
    for kind in NORM_KINDS:
        if kind.residual_sum:
            rules.append(NormQuantFusion.rule(kind, with_sum=True))
        rules.append(NormQuantFusion.rule(kind))
        if not kind.residual_sum:
            rules.append(NormReshapeQuantFusion.rule(kind))
    rules.append(DecomposedRMSNormQuantFusion.rule())
    return pattern.RewriteRuleSet(rules, commute=True)


def _refusal(model: ir.Model, node: ir.Node, rules: pattern.RewriteRuleSet) -> str | None:
    """Why the rules that recognised ``node``'s norm declined it, or None when none recognised it."""
    for rule in rules.rules:
        tracer = MatchingTracer()
        rule.match(model, model.graph, node, tracer=tracer, check_nodes_are_removable=False)
        for info in tracer.best_matches_map.get(rule, []):
            if info.status == MatchStatus.CONDITION_FAILED:
                return info.match_result.reason
    return None


class FuseNormQuantPass(ir.passes.InPlacePass):
    """Apply ``fusion_rules`` to every ``QuantizePerToken``; ``fused`` counts the fusions and ``refused``
    holds, per norm the rules recognised but declined, the reason.

    Precondition (``requires``): the model's opset imports include the sq_onnx domain (it holds the
    quantizations to fuse)."""

    def __init__(self):
        super().__init__()
        self.fused = 0
        self.refused: list[Refusal] = []

    def requires(self, model: ir.Model) -> None:
        if SQ not in model.opset_imports:
            raise ir.passes.PreconditionError("no sq_onnx ops in the model: nothing to fuse")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        rules = fusion_rules()
        self.fused = rules.apply_to_model(model)
        self.refused = []
        for node in model.graph:
            if node.op_type == "QuantizePerToken" and node.domain == SQ:
                reason = _refusal(model, node, rules)
                x = node.inputs[0]
                if reason is not None and x is not None:
                    producer = x.producer()
                    self.refused.append(Refusal(x.name or "", producer.name or producer.op_type, reason))
        return ir.passes.PassResult(model, modified=bool(self.fused))


def fusion_record(fused: int, refused: list[Refusal]) -> dict[str, Any]:
    """The JSON-able summary that ``convert --json``, the report and ``inspect`` show."""
    return {"fused": fused, "not_fused": [asdict(r) for r in refused]}
