"""Export a local Hugging Face folder or a GGUF file to ONNX with torch.onnx (dynamo), offline.

Writes DIR/model.onnx (input_ids, attention_mask -> logits) with the tokenizer and config beside it, so
``convert`` and ``eval`` find them. torch.onnx is used rather than optimum: with transformers 5 it
exports Llama-family models exactly, while optimum-onnx pins transformers 4.57 (see DESIGN.md).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sq_onnx.errors import ModelLoadError, OutputError, SqOnnxError
from sq_onnx.model_io import save_model


def _load_hf(src: Path, dtype: str):
    try:
        import torch
        import transformers
    except ImportError:
        raise SqOnnxError("export needs torch and transformers: pip install 'sq-onnx[export]'.") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    if src.is_file() and src.suffix.lower() == ".gguf":
        kwargs = {"gguf_file": src.name}
        folder = str(src.parent)
    elif src.is_dir() and (src / "config.json").is_file():
        kwargs, folder = {}, str(src)
    else:
        raise ModelLoadError(
            f"{str(src)!r} is neither a .gguf file nor a Hugging Face model folder with config.json."
        )
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            f"could not load {str(src)!r} with transformers ({str(exc).splitlines()[0]})."
        ) from None
    model.eval()
    return model, tokenizer


def export(
    src: str | os.PathLike,
    out_dir: str | os.PathLike,
    dtype: str = "fp32",
    overwrite: bool = False,
    quiet: bool = False,
) -> Path:
    """Export ``src`` to ``out_dir/model.onnx`` (no KV cache) and save its tokenizer and config beside it."""
    import torch

    src, out = Path(src), Path(out_dir)
    target = out / "model.onnx"
    if target.exists() and not overwrite:
        raise OutputError(f"{str(target)!r} already exists; pass --overwrite to replace it.")
    if dtype not in ("fp32", "fp16"):
        raise SqOnnxError(f"--dtype must be fp32 or fp16, got {dtype!r}.")
    start = time.perf_counter()
    _say(quiet, f"loading {src.name} with transformers ...")
    model, tokenizer = _load_hf(src, dtype)

    class Logits(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, input_ids, attention_mask):
            return self.m(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    ids = torch.ones((1, 16), dtype=torch.int64)
    dyn = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"}}
    _say(quiet, f"exporting with torch.onnx (dynamo) after {time.perf_counter() - start:.0f}s ...")
    import logging
    import warnings

    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            Logits(model),
            (ids, torch.ones_like(ids)),
            dynamo=True,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes=dyn,
            verbose=False,
            optimize=True,
        )
    onnx_model = program.model  # an onnx_ir.Model
    out.mkdir(parents=True, exist_ok=True)
    save_model(onnx_model, target)
    tokenizer.save_pretrained(str(out))
    model.config.save_pretrained(str(out))
    _say(quiet, f"wrote {target} in {time.perf_counter() - start:.0f}s")
    return target


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        import sys

        print(text, file=sys.stderr)
