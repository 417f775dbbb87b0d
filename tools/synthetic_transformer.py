"""A transformer-shaped float model of any size, written with external data and never held in memory.

Each layer: RMSNorm (decomposed, outlier γ) -> q, k, v (summed) -> o_proj -> residual; RMSNorm -> up ->
Relu -> down -> residual. Weights are generated per tensor while saving (onnx_ir LazyTensor), so a
2.5 GB model costs the builder one tensor of memory. Used by the >2 GB test and tools/bench_memory.py.

    python tools/synthetic_transformer.py --gb 2.2 -o /tmp/big/model.onnx
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx_ir as ir

FLOAT = ir.DataType.FLOAT


def _lazy(name: str, shape: tuple[int, ...], seed: int, scale: float) -> ir.Value:
    def make() -> ir.Tensor:
        rng = np.random.default_rng(seed)
        return ir.tensor(rng.standard_normal(shape, dtype=np.float32) * np.float32(scale), name=name)

    tensor = ir.LazyTensor(make, dtype=FLOAT, shape=ir.Shape(shape), name=name)
    return ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(FLOAT), const_value=tensor)


def _const(graph_inits: list[ir.Value], name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph_inits.append(value)
    return value


def layer_bytes(hidden: int, ffn: int) -> int:
    return 4 * (4 * hidden * hidden + 2 * hidden * ffn)


def build(path: Path, hidden: int, ffn: int, layers: int, seed: int = 0) -> int:
    """Write the model to ``path`` (+ ``path.data``); returns the bytes of weights."""
    tape = ir.tape.Tape()
    inits: list[ir.Value] = []
    x = ir.Value(name="hidden_states", shape=ir.Shape([1, "seq", hidden]), type=ir.TensorType(FLOAT))
    axes = _const(inits, "axes", np.array([-1], np.int64))
    eps = _const(inits, "eps", np.array(1e-5, np.float32))
    rng = np.random.default_rng(seed)

    def norm(h: ir.Value, i: int, which: str) -> ir.Value:
        gamma = rng.uniform(0.5, 1.5, hidden).astype(np.float32)
        gamma[rng.choice(hidden, 4, replace=False)] *= 30.0  # SmoothQuant's outlier channels
        ms = tape.op("ReduceMean", [tape.op("Mul", [h, h]), axes])
        inv = tape.op("Reciprocal", [tape.op("Sqrt", [tape.op("Add", [ms, eps])])])
        return tape.op("Mul", [tape.op("Mul", [h, inv]), _const(inits, f"l{i}.{which}.gamma", gamma)])

    def linear(h: ir.Value, name: str, k: int, n: int, tensor_seed: int) -> ir.Value:
        w = _lazy(name, (k, n), tensor_seed, 1.0 / np.sqrt(k))
        inits.append(w)
        return tape.op("MatMul", [h, w])

    h = x
    for i in range(layers):
        a = norm(h, i, "attn_norm")
        qkv = [
            linear(a, f"l{i}.{p}_proj", hidden, hidden, seed * 1000 + 10 * i + j) for j, p in enumerate("qkv")
        ]
        mixed = tape.op("Add", [tape.op("Add", [qkv[0], qkv[1]]), qkv[2]])
        h = tape.op("Add", [h, linear(mixed, f"l{i}.o_proj", hidden, hidden, seed * 1000 + 10 * i + 3)])
        m = norm(h, i, "mlp_norm")
        up = tape.op("Relu", [linear(m, f"l{i}.up_proj", hidden, ffn, seed * 1000 + 10 * i + 4)])
        h = tape.op("Add", [h, linear(up, f"l{i}.down_proj", ffn, hidden, seed * 1000 + 10 * i + 5)])
    h.name, h.type = "output", ir.TensorType(FLOAT)
    graph = ir.Graph([x], [h], nodes=tape.nodes, initializers=inits, opset_imports={"": 18}, name="synthetic")
    path.parent.mkdir(parents=True, exist_ok=True)
    ir.save(ir.Model(graph, ir_version=10), path, external_data=path.name + ".data")
    return layers * layer_bytes(hidden, ffn)


def build_of_size(path: Path, gigabytes: float, hidden: int = 2048, ffn: int = 5632) -> int:
    """As many layers as reach ``gigabytes`` (10^9 bytes) of weights."""
    layers = max(1, int(np.ceil(gigabytes * 1e9 / layer_bytes(hidden, ffn))))
    return build(path, hidden, ffn, layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=2.2, help="weights in GB (default 2.2)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--ffn", type=int, default=5632)
    parser.add_argument("-o", "--output", required=True)
    args = parser.parse_args()
    size = build_of_size(Path(args.output), args.gb, args.hidden, args.ffn)
    print(f"wrote {args.output}: {size / 1e9:.2f} GB of weights")


if __name__ == "__main__":
    main()
