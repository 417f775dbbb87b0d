"""Small graphs built directly with onnx_ir: one per supported norm kind, feeding fan-outs of linears.

Each graph: X [batch, seq, C] -> (optional residual) -> norm with outlier γ -> several MatMul/Gemm
-> summed into one output, so any smoothing mistake shows up in the output.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

C = 32
N = 24
OUTLIERS = (2, 11)

NORM_KINDS = (
    "LayerNormalization",
    "RMSNormalization",
    "SimplifiedLayerNormalization",
    "SkipSimplifiedLayerNormalization",
    "SkipLayerNormalization",
    "DecomposedRMSNorm",
    "DecomposedLayerNorm",
)


def _init(tape: ir.tape.Tape, name: str, array: np.ndarray) -> ir.Value:
    value = tape.initializer(ir.tensor(array, name=name), name=name)
    value.shape = ir.Shape(array.shape)
    return value


def _gamma(rng: np.random.Generator) -> np.ndarray:
    g = rng.uniform(0.5, 1.5, C).astype(np.float32)
    g[list(OUTLIERS)] *= 50.0
    return g


def _norm(tape: ir.tape.Tape, kind: str, x: ir.Value, skip: ir.Value, rng: np.random.Generator) -> ir.Value:
    gamma = _init(tape, "gamma", _gamma(rng))
    beta_arr = rng.normal(0, 0.5, C).astype(np.float32)

    def beta() -> ir.Value:
        return _init(tape, "beta", beta_arr)

    ms = "com.microsoft"
    if kind == "LayerNormalization":
        return tape.op("LayerNormalization", [x, gamma, beta()], {"axis": -1, "epsilon": 1e-5})
    if kind == "RMSNormalization":
        return tape.op("RMSNormalization", [x, gamma], {"axis": -1, "epsilon": 1e-5})
    if kind == "SimplifiedLayerNormalization":
        return tape.op("SimplifiedLayerNormalization", [x, gamma], {"axis": -1, "epsilon": 1e-5})
    if kind == "SkipSimplifiedLayerNormalization":
        outs = tape.op_multi_out(kind, [x, skip, gamma], {"epsilon": 1e-5}, num_outputs=4, domain=ms)
        return outs[0], outs[3]  # type: ignore[return-value]
    if kind == "SkipLayerNormalization":
        outs = tape.op_multi_out(kind, [x, skip, gamma, beta()], {"epsilon": 1e-5}, num_outputs=4, domain=ms)
        return outs[0], outs[3]  # type: ignore[return-value]
    two = _init(tape, "two", np.array(2.0, np.float32))
    eps = _init(tape, "eps", np.array(1e-5, np.float32))
    axes = _init(tape, "axes", np.array([-1], np.int64))
    if kind == "DecomposedRMSNorm":
        ms_ = tape.op("ReduceMean", [tape.op("Pow", [x, two]), axes])
        inv = tape.op("Reciprocal", [tape.op("Sqrt", [tape.op("Add", [ms_, eps])])])
        return tape.op("Mul", [gamma, tape.op("Mul", [x, inv])])
    if kind == "DecomposedLayerNorm":
        centered = tape.op("Sub", [x, tape.op("ReduceMean", [x, axes])])
        var = tape.op("ReduceMean", [tape.op("Pow", [centered, two]), axes])
        normed = tape.op("Div", [centered, tape.op("Sqrt", [tape.op("Add", [var, eps])])])
        return tape.op("Add", [tape.op("Mul", [normed, gamma]), beta()])
    raise ValueError(kind)


def build_norm_graph(
    kind: str,
    consumers: int = 3,
    gemm: bool = False,
    transposed_weight: bool = False,
    extra_consumer: str | None = None,
    seed: int = 0,
) -> ir.Model:
    """A graph where norm ``kind`` feeds ``consumers`` linears (plus an optional non-foldable consumer op)."""
    rng = np.random.default_rng(seed)
    tape = ir.tape.Tape()
    x = ir.Value(
        name="X",
        shape=ir.Shape([1 if gemm else "batch", "seq", C] if not gemm else ["rows", C]),
        type=ir.TensorType(ir.DataType.FLOAT),
    )
    skip = ir.Value(name="S", shape=x.shape, type=ir.TensorType(ir.DataType.FLOAT))
    normed = _norm(tape, kind, x, skip, rng)
    residual = None
    if isinstance(normed, tuple):
        normed, residual = normed
    outputs = []
    for i in range(consumers):
        w = rng.normal(0, 0.2, (C, N)).astype(np.float32)
        if gemm:
            wt = _init(tape, f"w{i}", np.ascontiguousarray(w.T))
            bias = _init(tape, f"b{i}", rng.normal(0, 0.1, N).astype(np.float32))
            outputs.append(tape.op("Gemm", [normed, wt, bias], {"transB": 1}))
        elif transposed_weight:
            wt = _init(tape, f"w{i}", np.ascontiguousarray(w.T))
            outputs.append(tape.op("MatMul", [normed, tape.op("Transpose", [wt], {"perm": [1, 0]})]))
        else:
            outputs.append(tape.op("MatMul", [normed, _init(tape, f"w{i}", w)]))
    if extra_consumer == "Relu":
        side = tape.op("Relu", [normed])
        outputs.append(
            tape.op("MatMul", [side, _init(tape, "w_side", rng.normal(0, 0.2, (C, N)).astype(np.float32))])
        )
    total = outputs[0]
    for o in outputs[1:]:
        total = tape.op("Add", [total, o])
    if residual is not None:
        total = tape.op(
            "Add", [total, tape.op("ReduceSum", [residual, _init(tape, "rs_axes", np.array([-1], np.int64))])]
        )
    total.name = "Y"
    total.type = ir.TensorType(ir.DataType.FLOAT)
    inputs = [x, skip] if kind.startswith("Skip") else [x]
    opset = 23 if kind == "RMSNormalization" else 18
    graph = ir.Graph(
        inputs,
        [total],
        nodes=tape.nodes,
        initializers=tape.initializers,
        opset_imports={"": opset, "com.microsoft": 1},
        name=kind,
    )
    return ir.Model(graph, ir_version=10 if opset < 23 else 11)


def sample_inputs(model: ir.Model, samples: int = 4, seq: int = 8, seed: int = 1) -> dict[str, np.ndarray]:
    """Arrays for every graph input, first axis = samples, with outlier channels in the data too."""
    rng = np.random.default_rng(seed)
    out = {}
    for value in model.graph.inputs:
        rank = len(value.shape)
        shape = (samples, 1, seq, C) if rank == 3 else (samples, seq, C)
        arr = rng.normal(0, 1, shape).astype(np.float32)
        out[value.name] = arr
    return out
