"""tools/trace_gptq.py: a W4 conversion with every GPTQ batch's phases timed and its memory sampled."""

from __future__ import annotations

import sys

import trace_gptq

import tiny_models


def test_trace_gptq_times_each_batch_and_finds_the_peak(monkeypatch, capsys, llama_dir) -> None:
    monkeypatch.setattr(trace_gptq, "SEQ_LEN", 16)
    argv = [
        "trace_gptq.py",
        str(llama_dir / "model.onnx"),
        "--vocab",
        str(tiny_models.VOCAB),
        "--gptq-samples",
        "4",
    ]
    monkeypatch.setattr(sys, "argv", argv)
    # main() swaps in its traced functions: monkeypatch puts the originals back afterwards
    monkeypatch.setattr(trace_gptq.quantize_model, "batch_grams", trace_gptq.quantize_model.batch_grams)
    for name in trace_gptq.STAGES:  # and each stage, which it wraps to mark its phase
        monkeypatch.setattr(trace_gptq.stages, name, getattr(trace_gptq.stages, name))
    trace_gptq.main()
    out = capsys.readouterr().out
    assert "peak RSS" in out
    rows = [line for line in out.splitlines() if line.startswith("│")]  # the tables' rows, not the summary
    for phase in ("calibrate", "smooth", "segments+grams #0", "gptq #0", "verify", "save"):
        assert any(f" {phase} " in row for row in rows), phase
