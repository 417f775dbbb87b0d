"""Running and storing models: ONNX Runtime sessions (custom ops, bfloat16 twins, in-memory models), model files, model inputs, progress and peak memory."""
