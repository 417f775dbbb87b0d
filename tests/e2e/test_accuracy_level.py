"""--accuracy-level auto on a model whose activation outliers break MatMulNBits' int8 kernels (level 4):
without smoothing it keeps level 0, with smoothing it can take level 4, and the file says what was chosen."""

from __future__ import annotations

import json

import onnx_ir as ir
import pytest
import torch

from sq_onnx import Recipe, convert, stages
from sq_onnx.cli import main

import tiny_models

GAIN = 100.0  # real models' outlier channels: large γ, small weight rows (the float function is unchanged)
HEAD_GAIN = (
    1000.0  # the lm_head's outliers: at GAIN its level-4 cost sat near the tolerance on this tiny model
)
TOLERANCE = 0.001  # a tiny random model's logits are nearly flat: its perplexity moves little either way


@pytest.fixture(scope="module")
def outlier_llama(tmp_path_factory):
    """The tiny Llama with its outlier channels raised GAIN-fold in the norms' γ and lowered as much in the
    rows of the linears they feed, as trained LLMs have them: level 4's int8 blocks lose their neighbours."""
    model = tiny_models.build_torch_model("llama")
    channels = list(tiny_models.OUTLIER_CHANNELS)
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for norm, linears in (
                (layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj)),
            ):
                norm.weight[channels] *= GAIN
                for linear in linears:
                    linear.weight[:, channels] /= GAIN
        # the final norm and an lm_head of its own (untied from the embedding, which keeps its rows)
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.clone())
        model.config.tie_word_embeddings = False
        model.model.norm.weight[channels] *= HEAD_GAIN
        model.lm_head.weight[:, channels] /= HEAD_GAIN
    folder = tmp_path_factory.mktemp("outlier_llama")
    tiny_models.export_torch(model, folder / "model.onnx")
    tiny_models.write_tokenizer(folder)
    return folder


def _levels(path) -> dict[str, int]:
    model = ir.load(path)
    return {
        n.name: n.attributes["accuracy_level"].value
        for n in model.graph
        if n.op_type == "MatMulNBits" and n.attributes["bits"].value == 4
    }


@pytest.mark.parametrize("smooth", [True, False])
def test_auto_keeps_level_4_only_where_it_is_safe(outlier_llama, tmp_path, calib_ids, smooth):
    out = tmp_path / "w4.onnx"
    recipe = Recipe(samples=4, block_size=32, smooth=smooth, level4_tolerance=TOLERANCE)
    result = convert(outlier_llama / "model.onnx", out, recipe, calibration=calib_ids)
    chosen = result.accuracy_level
    assert chosen is not None and chosen["level"] == (4 if smooth else 0), chosen
    # without smoothing, level 4 moves the outputs several times more than with it (measured +0.89% against
    # -0.00% expected perplexity; 2026-12-05, AVX-512 VNNI)
    assert (chosen["expected_increase"] > 3 * TOLERANCE) != smooth
    levels = _levels(out)
    joined_away = sum(len(names) - 1 for names in result.joined_linears)  # q/k/v and gate/up: one node each
    assert (
        len(levels) == len(result.quantized_matmuls) - 1 - joined_away
    )  # every W4 linear; the lm_head is 8-bit
    assert set(levels.values()) == {chosen["level"]}
    # the lm_head: its level-4 int8 input loses the outliers' neighbours unless the final norm was smoothed
    assert chosen["lm_head"]["level"] == (4 if smooth else 0), chosen["lm_head"]
    (head,) = [
        n for n in ir.load(out).graph if n.op_type == "MatMulNBits" and n.attributes["bits"].value == 8
    ]
    assert head.attributes["accuracy_level"].value == chosen["lm_head"]["level"]
    metadata = ir.load(out).metadata_props
    assert json.loads(metadata["sq_onnx.recipe"])["accuracy_level"] == "auto"
    assert json.loads(metadata["sq_onnx.accuracy_level"]) == chosen  # what was chosen, and why


def test_a_fixed_level_is_written_as_given(outlier_llama, tmp_path, calib_ids):
    out = tmp_path / "w4.onnx"
    result = convert(
        outlier_llama / "model.onnx", out, Recipe(samples=4, accuracy_level="4"), calibration=calib_ids
    )
    assert result.accuracy_level is None and set(_levels(out).values()) == {4}
    old = Recipe.from_dict({"accuracy_level": 0, "lm_head_accuracy_level": 4})  # before "auto": numbers
    assert old.accuracy_level == "0" and old.written_accuracy_level == 0
    assert old.lm_head_accuracy_level == "4" and old.written_lm_head_accuracy_level == 4


def test_cli_says_which_level_and_why(outlier_llama, tmp_path, capsys):
    out = tmp_path / "w4.onnx"
    args = ["convert", str(outlier_llama / "model.onnx"), "-o", str(out), "--samples", "4", "--no-smooth"]
    assert main([*args, "--level4-tolerance", str(TOLERANCE)]) == 0
    text = capsys.readouterr().out
    assert "accuracy level 0 (--accuracy-level auto): level 4 raises perplexity" in text and "beyond" in text
    assert "lm_head accuracy level 0 (--accuracy-level auto)" in text
    with pytest.raises(SystemExit) as refused:
        main(
            [
                "convert",
                str(outlier_llama / "model.onnx"),
                "-o",
                str(tmp_path / "x.onnx"),
                "--accuracy-level",
                "5",
            ]
        )
    assert refused.value.code == 2


def test_the_lm_heads_level_is_judged_on_its_tail(outlier_llama, tmp_path, calib_ids, monkeypatch):
    """The lm_head's level-4 run reuses the final hidden states of the run before it and runs only the lm_head
    and what follows it: the same losses as running the whole model again, and the file's outputs unchanged."""
    recipe = Recipe(samples=4, block_size=32, level4_tolerance=TOLERANCE)
    runs: list[int] = []
    each = stages.each_first_output

    def counted(model, *args, **kwargs):
        runs.append(len(model.graph))
        return each(model, *args, **kwargs)

    monkeypatch.setattr(stages, "each_first_output", counted)
    tail = convert(outlier_llama / "model.onnx", tmp_path / "tail.onnx", recipe, calibration=calib_ids)
    # the smoothing check, level 0, level 4, then the tail alone
    assert len(runs) == 4 and runs[3] < runs[1] / 10, runs
    monkeypatch.setattr(stages, "head_input", lambda *args: None)
    whole = convert(outlier_llama / "model.onnx", tmp_path / "whole.onnx", recipe, calibration=calib_ids)
    assert len(runs) == 8 and runs[7] == runs[5], runs  # the whole model again
    for key in ("kl_level0", "kl_level4", "nll_level0", "nll_level4"):
        assert tail.accuracy_level["lm_head"][key] == pytest.approx(
            whole.accuracy_level["lm_head"][key], rel=1e-5, abs=1e-7
        ), key
    assert tail.accuracy_level["lm_head"]["level"] == whole.accuracy_level["lm_head"]["level"]
    outputs = [v.name for v in ir.load(outlier_llama / "model.onnx").graph.outputs]
    assert [v.name for v in ir.load(tmp_path / "tail.onnx").graph.outputs] == outputs


def test_verification_reuses_calibrations_float_outputs(outlier_llama, tmp_path, calib_ids, monkeypatch):
    """The float model's outputs on the verification samples come from calibration's session (kept at half,
    in files past the budget): verification runs no float model of its own and reads the same numbers."""
    recipe = Recipe(samples=4, block_size=32, level4_tolerance=TOLERANCE)
    floats = []
    held = stages.held_outputs

    def counted(*args, **kwargs):
        floats.append(1)
        return held(*args, **kwargs)

    monkeypatch.setattr(stages, "held_outputs", counted)
    reused = convert(outlier_llama / "model.onnx", tmp_path / "a.onnx", recipe, calibration=calib_ids)
    assert floats == []
    calibrate = stages.calibrate_stage

    def without_reference(conv):
        calibrate(conv)
        conv.reference = None  # as before: verification runs the float model itself

    monkeypatch.setattr(stages, "calibrate_stage", without_reference)
    rerun = convert(outlier_llama / "model.onnx", tmp_path / "b.onnx", recipe, calibration=calib_ids)
    assert floats == [1]
    for key in ("relative_error", "cosine", "top1_agreement"):
        assert reused.verify[key] == pytest.approx(rerun.verify[key], rel=1e-5, abs=1e-7), key
    for key in ("kl_level0", "kl_level4", "nll_level0", "nll_level4"):
        assert reused.accuracy_level[key] == pytest.approx(rerun.accuracy_level[key], rel=1e-5, abs=1e-7), key
