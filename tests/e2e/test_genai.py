"""onnxruntime-genai folders: `sq-onnx export` writes genai_config.json, `convert` carries it (and the tokenizer,
and for --kernels sq_onnx the custom-op library) to its output folder, and onnxruntime-genai then generates
the same greedy tokens from each folder as sq-onnx's own runner; configs that contradict the graph are refused
before any work."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sq_onnx import Recipe, convert
from sq_onnx.cli import main
from sq_onnx.lm.genai_folder import CONFIG
from sq_onnx.lm.lm_runner import LMRunner
from sq_onnx.runtime import custom_ops
from sq_onnx.runtime.model_inputs import input_specs
from sq_onnx.runtime.model_io import load_model
from sq_onnx.runtime.ort_session import session

import tiny_models

og = pytest.importorskip(
    "onnxruntime_genai", reason="onnxruntime-genai is not installed (pip install onnxruntime-genai)"
)

PROMPT = [5, 17, 42, 7, 99, 3]
NEW = 8


def runner_tokens(model: Path, n: int = NEW) -> list[int]:
    """sq-onnx's greedy decode (what `sq-onnx generate` does), as token ids."""
    runner = LMRunner(session(model), input_specs(load_model(model), model))
    logits, out = runner.prefill(np.asarray([PROMPT], np.int64)), []
    for _ in range(n):
        out.append(int(np.argmax(logits)))
        logits = runner.step(out[-1])
    return out


def genai_tokens(folder: Path, n: int = NEW) -> tuple[list[int], bool]:
    """onnxruntime-genai's greedy decode of the folder, and whether it stopped early at an end-of-text id."""
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + n, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT)
    while not generator.is_done():
        generator.generate_next_token()
    new = [int(t) for t in generator.get_sequence(0)[len(PROMPT) :]]
    return new, len(new) < n


def assert_same_tokens(folder: Path, model: Path) -> None:
    genai, stopped = genai_tokens(folder)
    ours = runner_tokens(model)
    assert genai and genai == ours[: len(genai)]
    assert len(genai) == NEW or stopped


def test_export_writes_a_genai_config_that_genai_runs(llama_kv):
    torch_model, folder = llama_kv
    config = json.loads((folder / CONFIG).read_text())
    decoder, hf = config["model"]["decoder"], torch_model.config
    assert decoder["filename"] == "model.onnx" and config["model"]["type"] == "llama"
    assert (decoder["num_hidden_layers"], decoder["num_attention_heads"], decoder["num_key_value_heads"]) == (
        hf.num_hidden_layers,
        hf.num_attention_heads,
        hf.num_key_value_heads,
    )
    assert decoder["head_size"] == hf.hidden_size // hf.num_attention_heads
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert config["search"]["past_present_share_buffer"] is False
    assert_same_tokens(folder, folder / "model.onnx")


RECIPES = {
    "w4": Recipe(scheme="w4", samples=4, gptq_samples=8),
    "w8a8": Recipe(scheme="w8a8", samples=4),
    "w8a8-kernels": Recipe(scheme="w8a8", samples=4, kernels="sq_onnx"),
    "w4-kernels": Recipe(scheme="w4", samples=4, gptq_samples=8, kernels="sq_onnx", accuracy_level="4"),
}


@pytest.mark.parametrize("name", list(RECIPES))
def test_converted_folder_runs_in_genai(name, llama_kv, calib_ids, tmp_path):
    recipe = RECIPES[name]
    if recipe.kernels == "sq_onnx" and not custom_ops.available():
        pytest.skip("custom-op library not built")
    _, folder = llama_kv
    out = tmp_path / name / "quantized.onnx"
    result = convert(folder / "model.onnx", out, recipe, calibration=calib_ids)
    assert CONFIG in result.genai["written"] and "tokenizer.json" in result.genai["written"]
    config = json.loads((out.parent / CONFIG).read_text())
    assert config["model"]["decoder"]["filename"] == "quantized.onnx"
    if recipe.kernels == "sq_onnx" and recipe.scheme == "w4":
        assert result.nbits_a8_kernels["swapped"] > 0
        assert result.masked_attention == 2  # both layers' attention: genai runs MaskedAttention too
    library = config["model"]["decoder"]["session_options"].get("custom_ops_library")
    if recipe.kernels == "sq_onnx":  # the library travels inside the folder, named relative to it
        assert library and (out.parent / library).is_file() and not Path(library).is_absolute()
        # a fresh process elsewhere (this one has loaded the library already): genai finds it in the folder
        code = f"import onnxruntime_genai as og; og.Model({str(out.parent)!r})"
        subprocess.run([sys.executable, "-c", code], cwd=tmp_path, check=True, capture_output=True)
    else:
        assert library is None
    assert_same_tokens(out.parent, out)


def test_a_config_from_elsewhere_is_carried_over_with_what_it_sets(llama_kv, calib_ids, tmp_path):
    """A genai config that came with the input (e.g. the genai builder's) keeps its own settings."""
    _, folder = llama_kv
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    config = json.loads((src / CONFIG).read_text())
    config["search"]["max_length"] = 77
    (src / CONFIG).write_text(json.dumps(config))
    out = tmp_path / "out" / "model.onnx"
    convert(src / "model.onnx", out, Recipe(scheme="w8a8", samples=4), calibration=calib_ids)
    assert json.loads((out.parent / CONFIG).read_text())["search"]["max_length"] == 77


@pytest.mark.parametrize("bos", ["as exported", "null"])
def test_a_config_is_derived_from_config_json_when_none_is_beside_the_input(
    bos, llama_kv, calib_ids, tmp_path
):
    """Also from a config.json whose bos_token_id is null (genai refuses a null id, so none is written)."""
    _, folder = llama_kv
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    (src / CONFIG).unlink()
    if bos == "null":
        for name in ("config.json", "generation_config.json"):
            if (src / name).is_file():
                hf = json.loads((src / name).read_text())
                (src / name).write_text(json.dumps({**hf, "bos_token_id": None}))
    out = tmp_path / "out" / "model.onnx"
    result = convert(src / "model.onnx", out, Recipe(scheme="w8a8", samples=4), calibration=calib_ids)
    assert result.genai["config"].startswith("derived")
    assert_same_tokens(out.parent, out)


def test_the_tokenizer_comes_from_tokenizer_dir_when_the_input_folder_has_none(llama_kv, calib_ids, tmp_path):
    """optimum's export folders hold config.json but no tokenizer: ``--tokenizer DIR`` fills the genai folder."""
    _, folder = llama_kv
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"):
        (src / name).unlink(missing_ok=True)
    out = tmp_path / "out" / "model.onnx"
    result = convert(
        src / "model.onnx", out, Recipe(scheme="w8a8", samples=4), calibration=calib_ids, tokenizer=folder
    )
    assert "tokenizer.json" in result.genai["written"]
    model = og.Model(str(out.parent))
    assert og.Tokenizer(model).encode("hello world").size > 0


def test_a_family_genai_has_no_type_for_runs_as_its_generic_decoder(tmp_path, calib_ids):
    """OPT has no model type in genai: the config names genai's generic "decoder", and the converted folder
    decodes in genai as in sq-onnx's runner."""
    hf = tmp_path / "hf"
    tiny_models.save_hf_folder(tiny_models.build_family("opt"), hf)
    assert main(["export", str(hf), "-o", str(tmp_path / "fp32"), "--quiet"]) == 0
    assert json.loads((tmp_path / "fp32" / CONFIG).read_text())["model"]["type"] == "decoder"
    out = tmp_path / "w8a8" / "model.onnx"
    convert(tmp_path / "fp32" / "model.onnx", out, Recipe(scheme="w8a8", samples=4), calibration=calib_ids)
    assert_same_tokens(out.parent, out)


def test_without_any_config_convert_says_which_file_is_missing(llama_dir, calib_ids, tmp_path, capsys):
    out = tmp_path / "out" / "model.onnx"
    result = convert(llama_dir / "model.onnx", out, Recipe(scheme="w8a8", samples=4), calibration=calib_ids)
    assert "config.json" in result.genai["why_not"] and not (out.parent / CONFIG).exists()


@pytest.mark.parametrize(
    "edit,said",
    [
        (lambda c: c["model"]["decoder"].update(num_hidden_layers=5), "5 layers"),
        (lambda c: c["model"]["decoder"]["inputs"].update(position_ids="pos"), "pos"),
    ],
    ids=["layers", "input-name"],
)
def test_a_config_that_contradicts_the_graph_is_refused_before_any_work(
    edit, said, llama_kv, tmp_path, capsys
):
    _, folder = llama_kv
    src = tmp_path / "src"
    shutil.copytree(folder, src)
    config = json.loads((src / CONFIG).read_text())
    edit(config)
    (src / CONFIG).write_text(json.dumps(config))
    out = tmp_path / "out" / "model.onnx"
    assert main(["convert", str(src / "model.onnx"), "-o", str(out), "--scheme", "w8a8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert said in err and "Traceback" not in err and not out.exists()
