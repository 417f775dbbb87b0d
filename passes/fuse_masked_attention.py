"""An exported decoder's attention -> ``sq_onnx::MaskedAttention`` (``--kernels sq_onnx`` with W4), as an
onnxscript rewrite rule.

torch.onnx writes eager attention as

    MatMul(Q, Transpose(K, perm=[0, 1, 3, 2])) -> Mul(·, scale) -> Add(·, mask) -> Softmax(axis=-1) -> MatMul(·, V)

(Div by the inverse scale, or no scale where the model scaled Q itself, as OPT does; no Add without a mask)

and ONNX Runtime runs it as written: the whole [S, T] score matrix through four ops, though a causal mask
removes half of it. ``MaskedAttention`` (custom_ops/src/cpu_attention.h) computes the same numbers (to float
rounding) in one pass and leaves out the keys the mask removes after each query's last visible one: about half
a prefill's attention. When K and V reach the MatMuls through transformers' ``repeat_kv`` (Unsqueeze on axis 2,
Expand, Reshape back to 4-D), the op reads the cache itself (it maps query head h to kv head h / (H / Hk)),
so the expanded copies are no longer made. Left as they are: other dtypes than float32, ranks other than 4, a
scale that is not a constant scalar, softmax over another axis, an intermediate that something else reads.
"""

from __future__ import annotations

import onnx_ir as ir
from onnxscript.rewriter import pattern

from sq_onnx.passes.fuse_norm_quant import _fail
from sq_onnx.passes.graph_edit import SQ, ensure_opset
from sq_onnx.passes.linears import _attr_int, _rank, constant_array, constant_scalar

OP = "MaskedAttention"


def unexpanded(value: ir.Value) -> ir.Value:
    """The [B, Hk, T, D] cache behind transformers' repeat_kv (Reshape(Expand(Unsqueeze(x, [2])))), else
    ``value`` itself."""
    reshape = value.producer()
    if reshape is None or reshape.op_type != "Reshape" or reshape.domain != "":
        return value
    expand = reshape.inputs[0].producer() if reshape.inputs[0] is not None else None
    if expand is None or expand.op_type != "Expand" or expand.domain != "":
        return value
    unsqueeze = expand.inputs[0].producer() if expand.inputs[0] is not None else None
    if unsqueeze is None or unsqueeze.op_type != "Unsqueeze" or unsqueeze.domain != "":
        return value
    source = unsqueeze.inputs[0]
    axes = constant_array(unsqueeze.inputs[1]) if len(unsqueeze.inputs) > 1 else None
    if source is None or _rank(source) != 4 or axes is None or axes.reshape(-1).tolist() not in ([2], [-3]):
        return value
    if _rank(expand.outputs[0]) != 5 or _rank(value) != 4:
        return value
    return source


class MaskedAttentionFusion(pattern.RewriteRuleClassBase):
    """Softmax(scale * Q K^T [+ mask]) V -> MaskedAttention(Q, K, V[, mask], scale)."""

    def __init__(self, scale_op: str | None, masked: bool):
        name = f"{scale_op or 'unscaled'}{' + mask' if masked else ''} attention -> {OP}"
        super().__init__(name=name, remove_nodes=False)
        self.scale_op, self.masked = scale_op, masked

    def pattern(self, op, q, k, c, mask, v):
        scores = op.MatMul(q, op.Transpose(k, _outputs=["k_t"]), _outputs=["scores"])
        scaled = getattr(op, self.scale_op)(scores, c, _outputs=["scaled"]) if self.scale_op else scores
        logits = op.Add(scaled, mask, _outputs=["logits"]) if self.masked else scaled
        probs = op.Softmax(logits, _outputs=["probs"])
        return op.MatMul(probs, v)

    def check(self, context, q, k, v, k_t, scores, probs, c=None, scaled=None, mask=None, logits=None, **_):
        transpose = k_t.producer()
        perm = transpose.attributes.get("perm")
        if perm is None or list(perm.value) != [0, 1, 3, 2]:
            return _fail("K is not transposed on its last two axes")
        if any(_rank(x) != 4 for x in (q, k, v)):
            return _fail("Q, K and V are not all known to be 4-D")
        if any(x.dtype != ir.DataType.FLOAT for x in (q, k, v)):
            return _fail("not float32")
        if mask is not None and (_rank(mask) is None or _rank(mask) > 4 or mask.dtype != ir.DataType.FLOAT):
            return _fail("the mask is not a float32 tensor of rank <= 4")
        scale = constant_scalar(c) if self.scale_op else 1.0
        if scale is None or scale == 0.0:
            return _fail("the scale is not a non-zero constant scalar")
        axis = _attr_int(probs.producer(), "axis", -1)
        if axis not in (-1, 3):
            return _fail(f"softmax over axis {axis}, not the last")
        chain = [x for x in (k_t, scores, scaled, logits, probs) if x is not None]
        for value in chain:
            if value.is_graph_output() or len(value.uses()) != 1:
                return _fail(f"{value.name or 'an intermediate'} is also read elsewhere")
        return pattern.MatchResult()

    def rewrite(self, op, q, k, v, c=None, mask=None, **_):
        scale = constant_scalar(c) if self.scale_op else 1.0
        assert scale is not None
        scale = 1.0 / scale if self.scale_op == "Div" else scale
        inputs = [q, unexpanded(k), unexpanded(v)] + ([mask] if mask is not None else [])
        return op.MaskedAttention(*inputs, scale=scale, _domain=SQ)


def fusion_rules() -> pattern.RewriteRuleSet:
    rules = [
        MaskedAttentionFusion.rule(scale_op, masked)
        for scale_op in ("Mul", "Div", None)
        for masked in (True, False)
    ]
    return pattern.RewriteRuleSet(rules, commute=True)


class FuseMaskedAttentionPass(ir.passes.InPlacePass):
    """Apply ``fusion_rules`` everywhere; ``fused`` counts the attentions that became MaskedAttention."""

    def __init__(self) -> None:
        super().__init__()
        self.fused = 0

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.fused = fusion_rules().apply_to_model(model)
        if self.fused:
            ensure_opset(model, SQ, 1)
            ir.passes.common.RemoveUnusedNodesPass()(model)
        return ir.passes.PassResult(model, modified=bool(self.fused))
