"""Run one sq_onnx node in an ONNX Runtime session on a chosen execution provider, and read back which
provider ran each node (from ORT's own profile), for the CPU and the CUDA op tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
from onnx import helper

from sq_onnx.runtime import custom_ops


def skip_module_without_library() -> None:
    """Skip the calling test module when the library was not built, except where SQ_ONNX_REQUIRE_OPS=1 (set by
    tools/dev.sh test and so by CI): there a missing library is a failure, as the build must have made it."""
    import os

    import pytest

    if custom_ops.available():
        return
    if os.environ.get("SQ_ONNX_REQUIRE_OPS") == "1":
        raise RuntimeError("SQ_ONNX_REQUIRE_OPS=1 but the sq_onnx custom-op library was not built")
    pytest.skip(
        "custom-op library not built (no ONNX Runtime headers at install time)", allow_module_level=True
    )


def single_op_model(
    op: str,
    inputs: dict[str, np.ndarray | None],
    n_out: int,
    constants: frozenset[str] = frozenset(),
    **attrs,
) -> onnx.ModelProto:
    """A one-node model; None inputs are left out (optional inputs as ''); those named in constants are
    initializers (as a converted model's weights are), the rest graph inputs."""
    names = [name if arr is not None else "" for name, arr in inputs.items()]
    while names and names[-1] == "":
        names.pop()
    outs = [f"out{i}" for i in range(n_out)]
    node = helper.make_node(op, names, outs, domain="sq_onnx", **attrs)
    graph_inputs = [
        helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
        for name, arr in inputs.items()
        if arr is not None and name not in constants
    ]
    initializers = [onnx.numpy_helper.from_array(inputs[name], name) for name in constants]
    graph = helper.make_graph(
        [node],
        "g",
        graph_inputs,
        [helper.make_value_info(o, onnx.TypeProto()) for o in outs],
        initializer=initializers,
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("sq_onnx", 1)]
    )


def make_session(model: onnx.ModelProto | Path, providers: list[str], profile_dir: Path | None = None):
    """A session with the sq_onnx library registered; with profile_dir, ORT profiles into it (see placed)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    custom_ops.register_custom_ops(so)
    if profile_dir is not None:
        so.enable_profiling = True
        so.profile_file_prefix = str(profile_dir / "ort_profile")
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, so, providers=providers)


def run_op(
    op: str,
    inputs: dict[str, np.ndarray | None],
    n_out: int,
    providers=("CPUExecutionProvider",),
    constants: frozenset[str] = frozenset(),
    **attrs,
) -> list[np.ndarray]:
    sess = make_session(single_op_model(op, inputs, n_out, constants, **attrs), list(providers))
    return sess.run(None, {k: v for k, v in inputs.items() if v is not None and k not in constants})


def placed(sess) -> dict[str, set[str]]:
    """op type -> the execution providers that ran its nodes, from the profile of a profiling session."""
    events = json.loads(Path(sess.end_profiling()).read_text())
    out: dict[str, set[str]] = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and "op_name" in args and "provider" in args:
            out.setdefault(args["op_name"], set()).add(args["provider"])
    return out
