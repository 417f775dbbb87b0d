"""The convert flags are generated from Recipe: one per field, the same defaults, and recipes that
round-trip through files and the --json output."""

from __future__ import annotations

import dataclasses
import json

import pytest

from sq_onnx.cli import build_parser, main
from sq_onnx.errors import RecipeError
from sq_onnx.recipe import Recipe, Scheme
from sq_onnx.recipe_flags import recipe_from_args

from conftest import tiny_models


def _recipe(*flags: str) -> Recipe:
    return recipe_from_args(build_parser().parse_args(["convert", "in.onnx", "-o", "out.onnx", *flags]))


def test_every_field_has_a_flag_with_the_recipes_default():
    convert = build_parser()._subparsers._group_actions[0].choices["convert"]  # type: ignore[union-attr]
    dests = {a.dest for a in convert._actions}
    assert {f.name for f in dataclasses.fields(Recipe)} <= dests
    assert _recipe() == Recipe()


@pytest.mark.parametrize(
    ("flags", "field", "value"),
    [
        (["--no-gptq"], "gptq", False),
        (["--gptq-samples", "64"], "gptq_samples", 64),
        (["--gptq-damp", "0.05"], "gptq_damp", 0.05),
        (["--scheme", "w8a8", "--kernels", "sq_onnx"], "kernels", "sq_onnx"),
        (["--exclude", "lm_head", "--exclude", "q_proj"], "exclude", ("lm_head", "q_proj")),
        (["--calib-mix", "docs, self"], "calib_mix", ("docs", "self")),
        (["--alpha", "auto"], "alpha_search", "model"),
        (["--alpha", "0.7"], "alpha", 0.7),
        (["--no-smooth"], "smooth", False),
        (["--symmetric"], "symmetric", True),
        (["--seed", "3"], "seed", 3),
    ],
)
def test_flags_set_their_field(flags, field, value):
    assert getattr(_recipe(*flags), field) == value


def test_choices_are_enums_that_read_as_strings():
    recipe = _recipe("--scheme", "w8a8")
    assert recipe.scheme is Scheme.W8A8 and recipe.scheme == "w8a8" and f"{recipe.scheme}" == "w8a8"
    assert json.loads(recipe.to_json())["scheme"] == "w8a8"
    with pytest.raises(RecipeError, match="--act must be one of"):
        Recipe(act="per-row")


def test_a_recipe_file_is_the_base_and_flags_override_it(tmp_path):
    path = tmp_path / "r.json"
    path.write_text(Recipe(scheme="w8a8", samples=5, act="static").to_json())
    assert _recipe("--recipe", str(path)) == Recipe(scheme="w8a8", samples=5, act="static")
    assert _recipe("--recipe", str(path), "--samples", "7").samples == 7
    yaml = pytest.importorskip("yaml")
    path_yaml = tmp_path / "r.yaml"
    path_yaml.write_text(yaml.safe_dump({"scheme": "w4", "gptq_samples": 32, "calib_mix": ["docs"]}))
    assert _recipe("--recipe", str(path_yaml)) == Recipe(gptq_samples=32, calib_mix=("docs",))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"schema": "w4"}', "unknown recipe field"),
        ('{"scheme": "w5"}', "must be one of"),
        ("[1, 2]", "object of recipe fields"),
    ],
)
def test_bad_recipe_files_are_one_sentence(tmp_path, capsys, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    assert main(["convert", "in.onnx", "-o", str(tmp_path / "o.onnx"), "--recipe", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_the_json_output_round_trips_into_the_same_recipe(llama_dir, tmp_path, capsys):
    calib = tmp_path / "c.npz"
    import numpy as np

    np.savez(calib, input_ids=tiny_models.random_ids(6, 32))
    flags = ["--scheme", "w8a8", "--samples", "4", "--alpha", "0.6", "--exclude", "lm_head", "--seed", "2"]
    first = tmp_path / "a.onnx"
    assert (
        main(
            [
                "convert",
                str(llama_dir / "model.onnx"),
                "-o",
                str(first),
                "--calib",
                str(calib),
                *flags,
                "--json",
            ]
        )
        == 0
    )
    output = tmp_path / "a.json"
    output.write_text(capsys.readouterr().out)
    recipe = _recipe("--recipe", str(output))
    assert recipe == _recipe(*flags) and recipe.to_dict() == json.loads(output.read_text())["recipe"]
    second = tmp_path / "b.onnx"
    args = ["convert", str(llama_dir / "model.onnx"), "-o", str(second), "--calib", str(calib)]
    assert main([*args, "--recipe", str(output), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["recipe"] == json.loads(output.read_text())["recipe"]
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize(
    ("flags", "folds", "alpha"),
    [
        ([], False, 0.4),
        (["--scheme", "w8a8"], True, 0.5),
        (["--scheme", "w8a8", "--act", "static"], True, 0.8),  # measured: static needs both
        (["--scheme", "w8a8", "--act", "per-tensor"], True, 0.8),  # one scale per tensor, like static
        (["--scheme", "w8a8", "--act", "static", "--linear-folds", "off", "--alpha", "0.5"], False, 0.5),
        (["--linear-folds"], True, 0.4),  # the bare flag means on
        (["--scheme", "w4", "--linear-folds", "on"], True, 0.4),
    ],
)
def test_linear_folds_and_alpha_defaults_follow_the_activations(flags, folds, alpha):
    recipe = recipe_from_args(build_parser().parse_args(["convert", "m.onnx", "-o", "o.onnx", *flags]))
    assert recipe.uses_linear_folds is folds
    assert recipe.effective_alpha == alpha
