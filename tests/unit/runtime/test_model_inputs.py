"""Empty KV caches for graphs whose cache dims the genai config knows (onnxruntime-genai's model builder)."""

from __future__ import annotations

import numpy as np

from sq_onnx.runtime.model_inputs import InputSpec, complete_feed, with_cache_dims

CONFIG = {
    "model": {
        "decoder": {
            "num_key_value_heads": 2,
            "head_size": 16,
            "sliding_window": {"window_size": 8, "layers": [0]},
        }
    }
}


def _specs() -> list[InputSpec]:
    past = ("batch_size", 2, "past_sliding_length", "kv_cache_dim")
    full = ("batch_size", "kv_heads", "past_sequence_length", "kv_cache_dim")
    return [
        InputSpec("input_ids", np.dtype(np.int64), ("batch_size", "sequence_length")),
        InputSpec("past_key_values.0.key", np.dtype(np.float32), past),
        InputSpec("past_key_values.1.key", np.dtype(np.float32), full),
    ]


def test_a_sliding_window_layer_gets_a_cache_of_the_windows_length():
    specs = with_cache_dims(_specs(), CONFIG)
    assert specs[1].dims == ("batch_size", 2, 8, 16)  # layer 0 is listed: its cache is the window
    assert specs[2].dims == ("batch_size", 2, "past_sequence_length", 16)
    feed = complete_feed({"input_ids": np.zeros((3, 5), np.int64)}, specs)
    assert feed["past_key_values.0.key"].shape == (3, 2, 8, 16)
    assert not feed["past_key_values.0.key"].any()
    assert feed["past_key_values.1.key"].shape == (3, 2, 0, 16)


def test_without_a_window_every_cache_starts_empty():
    config = {"model": {"decoder": {"num_key_value_heads": 2, "head_size": 16}}}
    specs = with_cache_dims(_specs(), config)
    feed = complete_feed({"input_ids": np.zeros((1, 4), np.int64)}, specs)
    assert feed["past_key_values.0.key"].shape == feed["past_key_values.1.key"].shape == (1, 2, 0, 16)
