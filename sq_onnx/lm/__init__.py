"""The language-model tools around a conversion: export (HF folder / GGUF -> ONNX with a KV cache), eval (perplexity, KL per domain), bench and generate."""
