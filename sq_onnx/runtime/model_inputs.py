"""Describe a model's graph inputs and derive the ones calibration data usually lacks."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx_ir as ir

from sq_onnx.errors import CalibrationError


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]

    @property
    def is_past_kv(self) -> bool:
        return self.name.startswith("past_key_values") or self.name.startswith("past.")


def input_specs(model: ir.Model, path: str | Path | None = None) -> list[InputSpec]:
    """The graph inputs that are not initializers; with the model's ``path``, KV-cache dims the graph leaves
    symbolic are taken from the onnxruntime-genai config beside it (``with_cache_dims``)."""
    specs = []
    for value in model.graph.inputs:
        if value.is_initializer():
            continue
        dtype = value.dtype.numpy() if value.dtype is not None else np.dtype(np.float32)
        dims: tuple[int | str | None, ...] = ()
        if value.shape is not None:
            dims = tuple(
                d if isinstance(d, int) else (d.value if d is not None else None) for d in value.shape
            )
        specs.append(InputSpec(value.name or "", np.dtype(dtype), dims))
    return with_cache_dims(specs, _genai_config(Path(path).parent)) if path is not None else specs


def _genai_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "genai_config.json").read_text())
    except (OSError, ValueError):
        return {}


def with_cache_dims(specs: list[InputSpec], genai_config: dict | None) -> list[InputSpec]:
    """onnxruntime-genai's model builder leaves the KV cache's head count or size symbolic ('kv_cache_dim');
    its genai_config.json has them, so an empty cache can still be made (calibration, eval, generate). Layers
    it lists under ``sliding_window`` keep a cache of the window's length ('past_sliding_length': the
    builder's GroupQueryAttention with ``sliding_window_cache``, Gemma 2 / 3, refuses a shorter one), whose
    valid positions the attention mask counts: their cache is ``window_size`` long from the first step."""
    decoder = (genai_config or {}).get("model", {}).get("decoder", {})
    known = {1: decoder.get("num_key_value_heads"), 3: decoder.get("head_size")}
    window = decoder.get("sliding_window") or {}
    windowed = (
        {int(i) for i in window.get("layers") or []} if isinstance(window.get("window_size"), int) else set()
    )
    out = []
    for spec in specs:
        if spec.is_past_kv and len(spec.dims) == 4:
            sizes = dict(known)
            if _layer(spec.name) in windowed:
                sizes[2] = window["window_size"]
            dims = tuple(
                sizes[i] if i in sizes and not isinstance(d, int) and isinstance(sizes[i], int) else d
                for i, d in enumerate(spec.dims)
            )
            spec = InputSpec(spec.name, spec.dtype, dims)
        out.append(spec)
    return out


def _layer(name: str) -> int | None:
    """The layer index in a cache input's name (past_key_values.3.key -> 3)."""
    digits = [part for part in name.split(".") if part.isdigit()]
    return int(digits[0]) if digits else None


def is_language_model(specs: list[InputSpec]) -> bool:
    return any(s.name == "input_ids" for s in specs)


def _past_kv_array(spec: InputSpec, batch: int) -> np.ndarray:
    """An empty cache: batch from the sample, static dims (heads, head size) kept, 0 past positions or, for a
    cache of fixed length (a sliding window's, ``with_cache_dims``), that many positions the mask leaves out."""
    dims = list(spec.dims)
    if len(dims) != 4:
        raise CalibrationError(f"cannot derive model input {spec.name!r}: expected a 4-D key/value cache.")
    shape = [batch, dims[1], dims[2] if isinstance(dims[2], int) else 0, dims[3]]
    if not all(isinstance(d, int) for d in (shape[1], shape[3])):
        raise CalibrationError(
            f"cannot derive model input {spec.name!r}: its head dimensions are not static."
        )
    return np.zeros(shape, dtype=spec.dtype)


def complete_feed(feed: dict[str, np.ndarray], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Add attention_mask, position_ids and empty past key/values when the model wants them."""
    out = dict(feed)
    ids = feed.get("input_ids")
    for spec in specs:
        if spec.name in out:
            continue
        if ids is not None and spec.name == "attention_mask":
            out[spec.name] = np.ones(ids.shape, dtype=spec.dtype)
        elif ids is not None and spec.name == "position_ids":
            out[spec.name] = np.broadcast_to(np.arange(ids.shape[-1], dtype=spec.dtype), ids.shape).copy()
        elif ids is not None and spec.is_past_kv:
            out[spec.name] = _past_kv_array(spec, ids.shape[0])
        else:
            raise CalibrationError(
                f"the calibration data has no array for model input {spec.name!r} and it cannot be derived."
            )
    return out


def check_feed(feed: dict[str, np.ndarray], specs: list[InputSpec]) -> dict[str, np.ndarray]:
    """Check names, kinds of dtype and ranks against the model; cast within a kind (int32 -> int64)."""
    by_name = {s.name: s for s in specs}
    unknown = sorted(set(feed) - set(by_name))
    if unknown:
        raise CalibrationError(
            f"calibration input(s) {', '.join(map(repr, unknown))} are not inputs of the model "
            f"(it expects {', '.join(map(repr, by_name))})."
        )
    out = {}
    for name, arr in feed.items():
        spec = by_name[name]
        arr = np.asarray(arr)
        if arr.dtype.kind != spec.dtype.kind and not (arr.dtype.kind in "iu" and spec.dtype.kind in "iu"):
            raise CalibrationError(
                f"calibration input {name!r} has dtype {arr.dtype}, the model expects {spec.dtype}."
            )
        if spec.dims and arr.ndim != len(spec.dims):
            raise CalibrationError(
                f"calibration input {name!r} has {arr.ndim} dimensions per sample, the model expects {len(spec.dims)}."
            )
        if spec.dims:
            for have, want in zip(arr.shape, spec.dims, strict=True):
                if isinstance(want, int) and want != have:
                    raise CalibrationError(
                        f"calibration input {name!r} has shape {arr.shape}, the model expects {spec.dims}."
                    )
        out[name] = arr.astype(spec.dtype, copy=False)
    return out
