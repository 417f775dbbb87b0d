"""Group detection for every norm kind and exporter form; skips carry reasons."""

from __future__ import annotations

import onnx_ir as ir
import pytest

from sq_onnx.passes.analyze import analyze
from sq_onnx.passes.linears import find_linears, is_lm_head

import ir_graphs

EXPECTED_KIND = {
    "DecomposedRMSNorm": "RMSNorm (decomposed)",
    "DecomposedLayerNorm": "LayerNorm (decomposed)",
}


@pytest.mark.parametrize("kind", ir_graphs.NORM_KINDS)
@pytest.mark.parametrize("form", ["matmul", "gemm", "transposed"])
def test_every_norm_kind_forms_one_group(kind, form):
    model = ir_graphs.build_norm_graph(
        kind, consumers=3, gemm=form == "gemm", transposed_weight=form == "transposed"
    )
    result = analyze(model.graph)
    assert len(result.groups) == 1, result.skipped
    group = result.groups[0]
    assert group.kind == EXPECTED_KIND.get(kind, kind)
    assert len(group.consumers) == 3
    assert group.channels == ir_graphs.C


@pytest.mark.parametrize("kind", ["LayerNormalization", "SkipSimplifiedLayerNormalization"])
def test_non_foldable_consumer_skips_whole_group_with_reason(kind):
    model = ir_graphs.build_norm_graph(kind, extra_consumer="Relu")
    result = analyze(model.graph)
    assert result.groups == []
    reasons = [s.reason for s in result.skipped]
    assert any("also feeds Relu" in r for r in reasons)


def test_skip_norm_residual_output_is_never_a_group():
    model = ir_graphs.build_norm_graph("SkipLayerNormalization")
    group = analyze(model.graph).groups[0]
    assert group.tensor.index() == 0
    assert [idx for _, idx in group.fold_into] == [2, 3]


def test_torch_export_llama_groups(llama_dir):
    graph = ir.load(llama_dir / "model.onnx").graph
    result = analyze(graph)
    sizes = sorted(len(g.consumers) for g in result.groups)
    # 2 layers x (q,k,v) and (gate,up), plus final norm -> lm_head
    assert sizes == [1, 2, 2, 3, 3]
    assert {g.kind for g in result.groups} == {"RMSNorm (decomposed)"}
    # o_proj and down_proj have no foldable producer: reported, not dropped
    assert len(result.skipped) == 4 and all(s.reason for s in result.skipped)
    heads = [lin for lin in result.linears if is_lm_head(lin, graph)]
    assert len(heads) == 1 and heads[0].shape == (64, 256)


def test_fused_llama_groups(llama_fused):
    graph = ir.load(llama_fused / "model.onnx").graph
    result = analyze(graph)
    kinds = {g.kind for g in result.groups}
    assert "SkipSimplifiedLayerNormalization" in kinds
    assert sorted(len(g.consumers) for g in result.groups) == [1, 2, 2, 3, 3]
    assert len(find_linears(graph)) == 15  # FusedMatMul lm_head included


def test_opt_groups_layernorm_with_bias(opt_dir):
    result = analyze(ir.load(opt_dir / "model.onnx").graph)
    assert {g.kind for g in result.groups} == {"LayerNormalization"}
    assert all(len(g.fold_into) == 2 for g in result.groups)  # γ and β
    assert sorted(len(g.consumers) for g in result.groups) == [1, 1, 1, 3, 3]
