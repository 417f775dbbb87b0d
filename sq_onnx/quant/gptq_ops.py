"""Where GPTQ's maths run: numpy on the CPU, or torch on a device (the GPU when a conversion runs on CUDA).
The few calls in which numpy and torch differ, so that ``sq_onnx.quant.gptq`` is one loop for both: its slicing,
products and in-place arithmetic read the same for numpy arrays and torch tensors."""

from __future__ import annotations

from typing import Any

import numpy as np


class NumpyOps:
    """numpy on the CPU (GPTQ's default: about 2x faster there than torch's CPU device)."""

    float32, float64, uint8 = np.float32, np.float64, np.uint8

    def put(self, a: np.ndarray, dtype: Any = None) -> Any:
        return np.asarray(a, dtype)

    def get(self, a: Any) -> np.ndarray:
        return a

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return np.zeros(shape, dtype)

    def as_type(self, a: Any, dtype: Any) -> Any:
        return a.astype(dtype)

    def rint(self, a: Any) -> Any:
        return np.rint(a)

    def clip(self, a: Any, low: float, high: float) -> Any:
        return np.clip(a, low, high)

    def outer(self, a: Any, b: Any) -> Any:
        return np.outer(a, b)

    def nonzero(self, a: Any) -> Any:
        """Flat indices of the non-zero entries (a 1-D ``a``)."""
        return np.flatnonzero(a)

    def repeat_rows(self, a: Any, times: int) -> Any:
        return np.repeat(a, times, axis=0)

    def diag(self, a: Any) -> Any:
        return np.diag(a).copy()

    def eye(self, n: int) -> Any:
        return np.eye(n)

    def einsum(self, equation: str, *operands: Any) -> Any:
        return np.einsum(equation, *operands)

    def at_least(self, a: Any, low: float) -> Any:
        return np.maximum(a, low)

    def isfinite(self, a: Any) -> Any:
        return np.isfinite(a)

    def solve(self, a: Any, b: Any) -> Any:
        return np.linalg.solve(a, b)


class TorchOps(NumpyOps):
    """GPTQ's maths on a torch device ("cuda" when the conversion runs there), in the same precisions."""

    def __init__(self, device: str) -> None:
        import torch

        self.torch, self.device = torch, device
        self.float32, self.float64, self.uint8 = torch.float32, torch.float64, torch.uint8

    def put(self, a: np.ndarray, dtype: Any = None) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        return t if dtype is None else t.to(dtype)

    def get(self, a: Any) -> np.ndarray:
        return a.cpu().numpy()

    def zeros(self, shape: tuple[int, ...], dtype: Any) -> Any:
        return self.torch.zeros(shape, dtype=dtype, device=self.device)

    def as_type(self, a: Any, dtype: Any) -> Any:
        return a.to(dtype)

    def rint(self, a: Any) -> Any:
        return self.torch.round(a)  # half to even, as np.rint

    def clip(self, a: Any, low: float, high: float) -> Any:
        return self.torch.clamp(a, low, high)

    def outer(self, a: Any, b: Any) -> Any:
        return self.torch.outer(a, b)

    def nonzero(self, a: Any) -> Any:
        return self.torch.nonzero(a).flatten()

    def repeat_rows(self, a: Any, times: int) -> Any:
        return self.torch.repeat_interleave(a, times, dim=0)

    def diag(self, a: Any) -> Any:
        return self.torch.diagonal(a).clone()

    def eye(self, n: int) -> Any:
        return self.torch.eye(n, dtype=self.torch.float64, device=self.device)

    def einsum(self, equation: str, *operands: Any) -> Any:
        return self.torch.einsum(equation, *operands)

    def at_least(self, a: Any, low: float) -> Any:
        return self.torch.clamp_min(a, low)

    def isfinite(self, a: Any) -> Any:
        return self.torch.isfinite(a)

    def solve(self, a: Any, b: Any) -> Any:
        return self.torch.linalg.solve(a, b)

    def upper_factor_of_inverse(self, h: np.ndarray) -> Any:
        """U with UᵀU = H⁻¹ for a positive definite H, by the GPTQ reference's route (H's factor, its inverse,
        the inverse's upper factor), in float64 on the device."""
        torch = self.torch
        low = torch.linalg.cholesky(self.put(h, self.float64))
        return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True)

    def cholesky_solve(self, h: np.ndarray, rhs: np.ndarray) -> np.ndarray:
        """H⁻¹ rhs for a positive definite H, in float64 on the device."""
        torch = self.torch
        low = torch.linalg.cholesky(self.put(h, self.float64))
        return self.get(torch.cholesky_solve(self.put(rhs, self.float64), low))


def gptq_ops(device: str | None) -> NumpyOps:
    """numpy on the CPU (None), else torch on ``device``."""
    return NumpyOps() if device is None else TorchOps(device)
