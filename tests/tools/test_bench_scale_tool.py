"""tools/bench_scale.py end to end on a tiny shape: export, convert in a fresh process, one table row with every
stage's seconds."""

from __future__ import annotations

import sys

import bench_scale


def test_bench_scale_prints_the_stages_of_each_conversion(monkeypatch, capsys, tmp_path) -> None:
    dims = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    tiny = ("LlamaConfig", {**dims, "num_key_value_heads": 2, "vocab_size": 300, "tie_word_embeddings": True})
    monkeypatch.setattr(bench_scale, "SHAPES", {"tiny": tiny})
    monkeypatch.setattr(bench_scale, "SEQ_LEN", 16)
    argv = ["bench_scale.py", "--shapes", "tiny", "--schemes", "w8a8", "--keep", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    bench_scale.main()
    out = capsys.readouterr().out
    assert "tiny w8a8:" in out
    for stage in ("calibrate", "quantize", "verify"):
        assert stage in out
    assert (tmp_path / "tiny" / "model.onnx").exists() and (tmp_path / "tiny" / "params.json").exists()
