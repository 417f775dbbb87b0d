"""Shared fixtures: tiny exported LLMs (built once per test session) and helpers."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from sq_onnx.runtime import custom_ops

import tiny_models


def _exported(tmp_path_factory, arch: str) -> Path:
    folder = tmp_path_factory.mktemp(arch)
    tiny_models.export_torch(tiny_models.build_torch_model(arch), folder / "model.onnx")
    tiny_models.write_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory) -> Path:
    """A tiny Llama (RMSNorm, GQA, SwiGLU, tied lm_head) exported with torch.onnx, tokenizer beside it."""
    return _exported(tmp_path_factory, "llama")


@pytest.fixture(scope="session")
def llama_bias_dir(tmp_path_factory) -> Path:
    """The tiny Llama with random biases on every linear but the lm_head (attention_bias, mlp_bias)."""
    return _exported(tmp_path_factory, "llama_bias")


@pytest.fixture(scope="session")
def llama_fused(llama_dir, tmp_path_factory) -> Path:
    """The same Llama after onnxscript's ORT fusions (SkipSimplifiedLayerNormalization, FusedMatMul)."""
    folder = tmp_path_factory.mktemp("llama_fused")
    tiny_models.fuse_for_ort(llama_dir / "model.onnx", folder / "model.onnx")
    (folder / "tokenizer.json").write_bytes((llama_dir / "tokenizer.json").read_bytes())
    return folder


@pytest.fixture(scope="session")
def opt_dir(tmp_path_factory) -> Path:
    """A tiny OPT (LayerNorm with bias, biased linears, ReLU MLP) exported with torch.onnx."""
    return _exported(tmp_path_factory, "opt")


@pytest.fixture(scope="session")
def llama_kv(tmp_path_factory):
    """(torch model, folder from `sq-onnx export` of its HF folder: model.onnx with a KV cache, tokenizer)."""
    from sq_onnx.cli import main

    folder = tmp_path_factory.mktemp("hf_llama_kv")
    model = tiny_models.build_torch_model("llama", seed=4, layers=2)
    tiny_models.save_hf_folder(model, folder)
    out = folder.parent / "llama_kv_export"
    assert main(["export", str(folder), "-o", str(out), "--quiet"]) == 0
    return model, out


@pytest.fixture(scope="session")
def calib_ids() -> dict[str, np.ndarray]:
    """Token-id calibration arrays (first axis = samples)."""
    return {"input_ids": tiny_models.random_ids(10, 32)}


@pytest.fixture(params=list(custom_ops.CPU_ISAS))
def isa(request):
    """Each instruction set this machine has (AVX-512 VNNI, AVX-VNNI, AVX2, portable C++), forced through the
    test entry points and back to the best after; without them, only the one the library picked."""
    if not custom_ops.available():
        pytest.skip("custom-op library not built")
    lib = ctypes.CDLL(str(custom_ops.library_path()))
    wanted = custom_ops.CPU_ISAS.index(request.param)
    if not custom_ops.has_test_hooks():
        if lib.sq_onnx_cpu_isa() != wanted:
            pytest.skip("library built without its test entry points (SQ_ONNX_TEST_HOOKS): its own path only")
        yield request.param
        return
    control = custom_ops.cpu_isa_control()
    if control.sq_onnx_cpu_select_isa(wanted) != 0:
        pytest.skip(f"this CPU has no {request.param}")
    try:
        yield request.param
    finally:
        control.sq_onnx_cpu_select_isa(control.sq_onnx_cpu_best_isa())


def op_types(path: Path) -> list[str]:
    return [node.op_type for node in ir.load(path).graph]


def run(path: Path, feed: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def ids_feed(seq: int = 24, seed: int = 5) -> dict[str, np.ndarray]:
    ids = tiny_models.random_ids(1, seq, seed)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids)}


def rel_error(ref: np.ndarray, out: np.ndarray) -> float:
    """‖ref − out‖ / ‖ref‖. With SQ_ONNX_PRINT_ERRORS=1 (and pytest -s) each value is printed with its
    test's name: how the measured values beside the end-to-end bounds were taken."""
    value = float(np.linalg.norm(ref - out) / np.linalg.norm(ref))
    if os.environ.get("SQ_ONNX_PRINT_ERRORS"):
        print(f"\n[measured] {os.environ.get('PYTEST_CURRENT_TEST', '?').split(' ')[0]}: {value:.4f}")
    return value
