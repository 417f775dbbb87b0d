"""Errors a user can cause. The CLI prints their one-sentence message and exits 2."""

from __future__ import annotations


class SqOnnxError(Exception):
    """Base class: a problem with the user's input, options or environment, not a bug."""


class ModelLoadError(SqOnnxError):
    """The input path is missing, not a file, or not a readable ONNX model."""


class ModelRunError(SqOnnxError):
    """ONNX Runtime loads the input model but fails running it: the model, not sq-onnx, needs fixing."""


class NothingToQuantizeError(SqOnnxError):
    """The model has no MatMul/Gemm with a constant weight that the recipe would quantize."""


class RecipeError(SqOnnxError):
    """An option has an invalid value."""


class OutputError(SqOnnxError):
    """The output path is not acceptable (exists, equals the input, not writable)."""


class CalibrationError(SqOnnxError):
    """Calibration data is missing, unreadable, or does not match the model's inputs."""


class TokenizerNotFoundError(CalibrationError):
    """Text calibration needs a tokenizer and none was found."""
