"""Find linear layers: MatMul / Gemm nodes whose weight is a constant 2-D tensor."""

from __future__ import annotations

import ast
import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir


def _behind_identities(value: ir.Value | None) -> ir.Value | None:
    """What ``value`` is an Identity (chain) of: torch.onnx's TorchScript exporter shares equal tensors that
    way (a tiny random model's zero biases, a norm's γ of ones)."""
    while value is not None and value.const_value is None:
        producer = value.producer()
        if producer is None or producer.op_type != "Identity" or producer.domain != "":
            break
        value = producer.inputs[0]
    return value


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's constant content (initializer or Constant node, also behind Identity nodes), else None."""
    value = _behind_identities(value)
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def is_constant(value: ir.Value | None) -> bool:
    """An initializer or a Constant node's output, also behind Identity nodes."""
    value = _behind_identities(value)
    if value is None:
        return False
    if value.const_value is not None:
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant" and producer.domain == ""


def _attr_int(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _attr_float(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def is_float_dtype(dtype: np.dtype) -> bool:
    """numpy floats, and bfloat16 (an ml_dtypes type numpy does not count as floating)."""
    return np.issubdtype(dtype, np.floating) or dtype == ir.DataType.BFLOAT16.numpy()


def is_channel_vector(value: ir.Value | None, channels: int) -> bool:
    """A constant that broadcasts along the last axis only: shape [C] or [1, ..., 1, C]."""
    arr = constant_array(value)
    if arr is None or arr.ndim == 0 or arr.shape[-1] != channels:
        return False
    return all(d == 1 for d in arr.shape[:-1]) and is_float_dtype(arr.dtype)


@dataclass(frozen=True)
class Linear:
    """A MatMul/Gemm/FusedMatMul ``Y = X @ W (+ bias)`` with a constant weight (made by ``as_linear``).

    Everything is read from the node when asked, so a linear stays right after a pass gives it a new weight
    and carries over to a copy of the graph by its node alone (``passes.analyze.carried_over``).
    """

    node: ir.Node

    @property
    def source(self) -> ir.Value:
        """The constant tensor holding the weight."""
        found = _weight_of(self.node)
        assert found is not None, f"{self.name} no longer has a constant weight"
        return found[0]

    @property
    def transposed(self) -> bool:
        """The weight is stored as [N, K] (Gemm transB=1, or behind a Transpose node), not MatMul's [K, N]."""
        found = _weight_of(self.node)
        assert found is not None, f"{self.name} no longer has a constant weight"
        return found[1]

    @property
    def name(self) -> str:
        return self.node.name or ""

    @property
    def input(self) -> ir.Value:
        return self.node.inputs[0]

    @property
    def weight_name(self) -> str:
        return self.source.name or ""

    @property
    def module(self) -> str:
        """The source framework's module path (torch.onnx records it), else the node name: for people."""
        scopes = self.node.metadata_props.get("pkg.torch.onnx.name_scopes")
        if scopes and scopes.startswith("[") and len(parts := ast.literal_eval(scopes)) >= 2:
            path = parts[-2]
            return path[2:] if path.startswith("m.") else path
        return self.name

    @property
    def activation_type(self) -> ir.DataType | None:
        """X's element type; intermediate values often carry none, and then the weight's type is X's."""
        if self.input.dtype is not None:
            return self.input.dtype
        tensor = self.source.const_value
        return self.source.dtype or (tensor.dtype if tensor is not None else None)

    @property
    def bias(self) -> ir.Value | None:
        if self.node.op_type == "Gemm" and len(self.node.inputs) > 2:
            return self.node.inputs[2]
        return None

    def release(self) -> None:
        """Drop the memory map of an external weight once read: otherwise every weight a pass has
        touched stays resident and a large model's peak memory grows by its whole size."""
        release_weight(self.source)

    def weight_kn(self) -> np.ndarray:
        """The effective weight as a [K, N] array (Gemm's alpha folded in)."""
        return self.weight_as_now()()

    def weight_as_now(self) -> Callable[[], np.ndarray]:
        """A function that reads the [K, N] weight the node has now, also after the node is given a new one
        (a lazy rewrite computes the new weight from the old)."""
        source, transposed = self.source, self.transposed
        alpha = _attr_float(self.node, "alpha", 1.0) if self.node.op_type in ("Gemm", "FusedMatMul") else 1.0

        def read() -> np.ndarray:
            w = constant_array(source)
            assert w is not None
            w = w.T if transposed else w
            return w * np.asarray(alpha, dtype=w.dtype) if alpha != 1.0 else w

        return read

    def bias_array(self) -> np.ndarray | None:
        """The effective bias (Gemm's beta folded in), as a 1-D [N] array, or None."""
        bias = self.bias
        if bias is None:
            return None
        b = constant_array(bias)
        if b is None:
            return None
        beta = _attr_float(self.node, "beta", 1.0)
        b = b * np.asarray(beta, dtype=b.dtype) if beta != 1.0 else b
        n = self.shape[1]
        if b.size not in (1, n):
            return None
        return np.broadcast_to(b.reshape(-1), (n,)).copy()

    @property
    def shape(self) -> tuple[int, int]:
        """(K, N) of the effective weight."""
        dims = tuple(int(d) for d in self.source.shape)  # type: ignore[union-attr]
        return (dims[1], dims[0]) if self.transposed else (dims[0], dims[1])


def release_weight(source: ir.Value) -> None:
    """Drop an external weight's memory map (see ``Linear.release``)."""
    tensor = source.const_value
    if isinstance(tensor, ir.ExternalTensor):
        with contextlib.suppress(BufferError):  # an array still views the map: keep it
            tensor.release()


def _weight_source(value: ir.Value) -> tuple[ir.Value, bool] | None:
    """Return (constant source, transposed) for a weight input, following one Transpose."""
    if is_constant(value):
        return (value, False) if _rank(value) == 2 else None
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.domain == "":
        perm = producer.attributes.get("perm")
        src = producer.inputs[0]
        if is_constant(src) and _rank(src) == 2 and (perm is None or list(perm.value) == [1, 0]):
            return (src, True)
    return None


def constant_scalar(value: ir.Value | None) -> float | None:
    """The value's one constant number (a scalar or a one-element tensor), else None."""
    arr = constant_array(value) if is_constant(value) else None
    return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None


def _rank(value: ir.Value) -> int | None:
    if value.shape is not None:
        return len(value.shape)
    arr = constant_array(value)
    return None if arr is None else arr.ndim


def _ensure_shape(value: ir.Value) -> None:
    if value.shape is None:
        arr = constant_array(value)
        if arr is not None:
            value.shape = ir.Shape(arr.shape)


def _weight_of(node: ir.Node) -> tuple[ir.Value, bool] | None:
    """(constant weight, stored as [N, K]) of a MatMul / Gemm / FusedMatMul as it is now, or None."""
    found = _weight_source(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1] is not None else None
    if found is None:
        return None
    source, transposed = found
    if node.op_type in ("Gemm", "FusedMatMul") and _attr_int(node, "transB", 0):
        transposed = not transposed
    return source, transposed


def as_linear(node: ir.Node) -> Linear | None:
    """Interpret ``node`` as a linear layer with a constant weight, or return None."""
    fused = node.domain == "com.microsoft" and node.op_type == "FusedMatMul"
    if not fused and (node.domain != "" or node.op_type not in ("MatMul", "Gemm")):
        return None
    if len(node.inputs) < 2:
        return None
    if node.inputs[0] is None or node.inputs[1] is None or is_constant(node.inputs[0]):
        return None
    found = _weight_of(node)
    if found is None:
        return None
    _ensure_shape(found[0])
    if node.op_type == "Gemm":
        if _attr_int(node, "transA", 0):
            return None
        if len(node.inputs) > 2 and node.inputs[2] is not None and not is_constant(node.inputs[2]):
            return None
    if fused and any(_attr_int(node, a, 0) for a in ("transA", "transBatchA", "transBatchB")):
        return None
    return Linear(node)


def find_linears(graph: ir.Graph) -> list[Linear]:
    """All linear layers of the main graph, in graph order."""
    return [lin for node in graph for lin in [as_linear(node)] if lin is not None]


def is_lm_head(linear: Linear, graph: ir.Graph) -> bool:
    """The projection to the vocabulary: its output is a graph output, or its weight is tied to a Gather."""
    if linear.node.outputs[0].is_graph_output():
        return True
    src = linear.source
    candidates = [src]
    producer = linear.node.inputs[1].producer()
    if producer is not None and producer.op_type == "Transpose":
        candidates.append(producer.inputs[0])
    for value in candidates:
        for user, index in value.uses():
            if user.op_type == "Gather" and index == 0:
                return True
    return False
