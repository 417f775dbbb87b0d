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
    monkeypatch.setattr(trace_gptq.stages, "quantize_graph", trace_gptq.stages.quantize_graph)
    trace_gptq.main()
    out = capsys.readouterr().out
    assert "peak RSS" in out and "calibrate" in out
    for phase in ("segments+grams #0", "gptq #0", "verify, save"):
        assert phase in out, phase
