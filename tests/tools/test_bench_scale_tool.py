"""tools/bench_scale.py end to end on a tiny model: convert in a fresh process with the default recipe, one table
row with every stage's seconds. (The export is sq-onnx's own exporter, tested elsewhere: the tiny Llama stands in.)"""

from __future__ import annotations

import json
import shutil
import sys

import bench_scale
import pytest

import tiny_models


@pytest.mark.parametrize("layers", [None, 1])
def test_bench_scale_prints_the_stages_of_each_conversion(
    monkeypatch, capsys, tmp_path, llama_dir, layers
) -> None:
    asked: list[int | None] = []

    def exported(name, folder, layers=None):
        asked.append(layers)
        folder.mkdir(parents=True, exist_ok=True)
        for f in llama_dir.iterdir():
            if f.is_file():
                shutil.copy(f, folder / f.name)
        (folder / "params.json").write_text(json.dumps({"params": 123456}))
        return folder / "model.onnx", 123456

    monkeypatch.setattr(bench_scale, "SHAPES", {"tiny": ("LlamaConfig", {"vocab_size": tiny_models.VOCAB})})
    monkeypatch.setattr(bench_scale, "export_shape", exported)
    monkeypatch.setattr(bench_scale, "SEQ_LEN", 16)
    argv = ["bench_scale.py", "--shapes", "tiny", "--schemes", "w8a8", "--keep", str(tmp_path)]
    argv += ["--layers", str(layers)] if layers else []
    monkeypatch.setattr(sys, "argv", argv)
    bench_scale.main()
    out = capsys.readouterr().out
    assert asked == [layers]
    assert ("tiny-1-layers w8a8:" if layers else "tiny w8a8:") in out
    for stage in ("calibrate", "quantize", "verify"):
        assert stage in out
