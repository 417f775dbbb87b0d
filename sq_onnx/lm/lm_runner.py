"""Run a causal-LM ONNX model step by step through ORT, with or without a KV cache."""

from __future__ import annotations

import numpy as np

from sq_onnx.runtime.model_inputs import InputSpec, complete_feed


class LMRunner:
    """Prefill a prompt, then decode one token at a time, feeding present.* back as past_key_values.*.

    Models without KV-cache inputs are run on the whole sequence at every step (correct, slower).
    """

    def __init__(self, sess, specs: list[InputSpec]):
        self.sess = sess
        self.specs = specs
        self.kv_names = [s.name for s in specs if s.is_past_kv]
        outputs = [o.name for o in sess.get_outputs()]
        self.logits_name = outputs[0]
        self.present_names = [n.replace("past_key_values", "present") for n in self.kv_names]
        missing = [n for n in self.present_names if n not in outputs]
        if missing:
            raise ValueError(f"model has past inputs but no matching outputs: {missing[:2]}")
        self.has_cache = bool(self.kv_names)
        self._ids: np.ndarray | None = None
        self._past: list[np.ndarray] | None = None

    def prefill(self, ids: np.ndarray) -> np.ndarray:
        """Run the prompt ``ids`` ([1, S] int64); returns the last position's logits."""
        self._ids = ids
        feed = complete_feed({"input_ids": ids}, self.specs)
        out = self.sess.run([self.logits_name, *self.present_names], feed)
        self._past = out[1:]
        return out[0][0, -1]

    def step(self, token: int) -> np.ndarray:
        """Append one token; returns its logits."""
        assert self._ids is not None, "prefill first"
        self._ids = np.concatenate([self._ids, np.array([[token]], dtype=self._ids.dtype)], axis=1)
        if not self.has_cache:
            return self.prefill(self._ids)
        total = self._ids.shape[1]
        feed = {"input_ids": self._ids[:, -1:]}
        names = {s.name for s in self.specs}
        if "attention_mask" in names:
            feed["attention_mask"] = np.ones((1, total), dtype=np.int64)
        if "position_ids" in names:
            feed["position_ids"] = np.array([[total - 1]], dtype=np.int64)
        feed.update(dict(zip(self.kv_names, self._past or [], strict=True)))
        out = self.sess.run([self.logits_name, *self.present_names], feed)
        self._past = out[1:]
        return out[0][0, -1]
