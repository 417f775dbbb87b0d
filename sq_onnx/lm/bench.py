"""Latency and memory of an ONNX LLM through ORT: load time, prefill at several prompt lengths, decode tokens/s.

Medians over repeats after a warm-up run. Peak memory is the process's high-water mark (VmHWM), so
measure one model per process (the CLI does).
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from sq_onnx.errors import SqOnnxError
from sq_onnx.lm.lm_runner import LMRunner
from sq_onnx.runtime import custom_ops
from sq_onnx.runtime.cpu_info import cpu_description
from sq_onnx.runtime.model_inputs import input_specs, is_language_model
from sq_onnx.runtime.model_io import load_model
from sq_onnx.runtime.ort_session import session
from sq_onnx.runtime.peak_memory import peak_rss_mb

PROVIDERS = {"cpu": ["CPUExecutionProvider"], "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"]}


@dataclass
class BenchResult:
    model: str
    provider: str
    threads: int | None
    load_s: float
    prefill_ms: dict[int, float] = field(default_factory=dict)
    decode_tokens_per_s: float | None = None
    decode_context: int = 0
    peak_rss_mb: float = 0.0
    size_mb: float = 0.0
    cpu_kernels: str | None = None  # the sq_onnx CPU kernels' instruction set, for models that use them
    cpu: str = ""  # the CPU and the vector instructions its CPUID reports to this process

    def to_dict(self) -> dict:
        return asdict(self)


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _cpu_kernels(model, provider: str) -> str | None:

    if provider != "cpu" or custom_ops.DOMAIN not in model.opset_imports or not custom_ops.available():
        return None
    return custom_ops.cpu_kernels_description()


def bench(
    model_path: str | os.PathLike,
    prompt_lengths: tuple[int, ...] = (32, 128, 512),
    decode_tokens: int = 32,
    repeats: int = 3,
    threads: int | None = None,
    provider: str = "cpu",
) -> BenchResult:
    path = Path(model_path)
    if provider not in PROVIDERS:
        raise SqOnnxError(f"--provider must be cpu or cuda, got {provider!r}.")
    model = load_model(path)
    specs = input_specs(model, path)
    if not is_language_model(specs):
        raise SqOnnxError("bench needs a language model with an input_ids input.")
    start = time.perf_counter()
    sess = session(path, providers=PROVIDERS[provider], threads=threads)
    load_s = time.perf_counter() - start
    if provider == "cuda" and "CUDAExecutionProvider" not in sess.get_providers():
        raise SqOnnxError(
            "the CUDA execution provider is not available here (install onnxruntime-gpu, use a GPU)."
        )
    runner = LMRunner(sess, specs)
    rng = np.random.default_rng(0)
    vocab = sess.get_outputs()[0].shape[-1]
    hi = min(1000, vocab) if isinstance(vocab, int) else 1000
    data = path.with_name(path.name + ".data")
    result = BenchResult(
        model=str(path),
        provider=provider,
        threads=threads,
        load_s=round(load_s, 3),
        size_mb=round((path.stat().st_size + (data.stat().st_size if data.exists() else 0)) / 1e6, 1),
        cpu_kernels=_cpu_kernels(model, provider),
        cpu=cpu_description(),
    )
    for length in prompt_lengths:
        ids = rng.integers(0, hi, (1, length), dtype=np.int64)
        result.prefill_ms[length] = round(
            1000 * _median_time(lambda ids=ids: runner.prefill(ids), repeats), 2
        )
    context = prompt_lengths[min(1, len(prompt_lengths) - 1)]
    ids = rng.integers(0, hi, (1, context), dtype=np.int64)

    def decode_seconds() -> float:
        runner.prefill(ids)
        t = time.perf_counter()
        for _ in range(decode_tokens):
            runner.step(int(rng.integers(0, hi)))
        return time.perf_counter() - t

    decode_seconds()  # warm-up
    runs = [decode_seconds() for _ in range(repeats)]
    result.decode_tokens_per_s = round(decode_tokens / statistics.median(runs), 2)
    result.decode_context = context
    result.peak_rss_mb = round(peak_rss_mb(), 1)
    return result
