"""Graph passes of sq-onnx, importable as ``sq_onnx.passes``. One concern per module."""
