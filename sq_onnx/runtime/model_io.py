"""Load models lazily and save them atomically, never touching the input."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import onnx_ir as ir

from sq_onnx.errors import ModelLoadError, OutputError
from sq_onnx.passes.infer_shapes import fill_missing_shapes

TWO_GB = 2 * 1024**3
# Stay clear of protobuf's hard 2 GiB limit: headers and graph structure need room too.
EXTERNAL_DATA_THRESHOLD = TWO_GB - 64 * 1024**2


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX model; external data stays lazy (memory-mapped on access)."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file {str(p)!r} does not exist.")
    if p.is_dir():
        hint = " (did you mean model.onnx inside it?)" if (p / "model.onnx").exists() else ""
        raise ModelLoadError(f"{str(p)!r} is a directory, not an ONNX file{hint}.")
    if p.stat().st_size == 0:
        raise ModelLoadError(f"model file {str(p)!r} is empty.")
    try:
        model = ir.load(p)
    except Exception as exc:  # protobuf raises several unrelated types for garbage input
        raise ModelLoadError(f"{str(p)!r} is not a readable ONNX model ({type(exc).__name__}).") from None
    if model.graph is None or len(model.graph) == 0:
        raise ModelLoadError(f"{str(p)!r} is not a readable ONNX model (its graph has no nodes).")
    _check_external_data(model, p)
    _check_structure(model, p)
    fill_missing_shapes(model)
    return model


def _check_structure(model: ir.Model, path: Path) -> None:
    """Damaged files can still parse: undecodable names (onnx_ir keeps them as bytes) or inputs that
    nothing produces. Find those before a later stage trips over them with a traceback. (onnx's checker
    is not used: it rejects ORT's own ops in the default domain, e.g. SimplifiedLayerNormalization.)
    Unknown op types are left to ONNX Runtime, whose refusal becomes one sentence too."""
    graph = model.graph
    if not all(n is None or isinstance(n, str) for n in _all_strings(model)):
        raise ModelLoadError(f"{str(path)!r} is damaged: a name in it is not valid UTF-8.")
    known = {v.name for v in graph.inputs} | set(graph.initializers)
    for node in graph:
        for value in node.inputs:
            if value is not None and value.name and value.producer() is None and value.name not in known:
                raise ModelLoadError(
                    f"{str(path)!r} is damaged: node {node.name!r} reads {value.name!r}, which nothing produces."
                )


def _all_strings(model: ir.Model):
    """Every name and text field a later stage serializes (onnx_ir leaves undecodable ones as bytes)."""
    graph = model.graph
    yield from (model.producer_name, model.producer_version, model.domain, model.doc_string)
    yield from (graph.name, graph.doc_string, *model.opset_imports, *graph.opset_imports)
    yield from (v.name for v in (*graph.inputs, *graph.outputs, *graph.initializers.values()))
    yield from graph.initializers
    yield from (*model.metadata_props, *model.metadata_props.values())
    for node in graph:
        yield from (node.name, node.op_type, node.domain, node.doc_string)
        yield from (v.name for v in (*node.inputs, *node.outputs) if v is not None)
        for name, attr in node.attributes.items():
            yield name
            if attr.type == ir.AttributeType.STRING:
                yield attr.value


def _check_external_data(model: ir.Model, path: Path) -> None:
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if isinstance(tensor, ir.ExternalTensor):
            location = Path(tensor.base_dir) / tensor.location
            if not location.exists():
                raise ModelLoadError(
                    f"external data file {str(location)!r} referenced by {str(path)!r} is missing."
                )


def has_external_tensors(model: ir.Model) -> bool:
    """Whether any initializer of the main graph still lives in an external-data file."""
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def weight_bytes(model: ir.Model) -> int:
    """Total bytes of the main graph's initializers."""
    total = 0
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            total += value.const_value.nbytes
    return total


def check_output_path(
    input_path: str | os.PathLike | None, output: str | os.PathLike, overwrite: bool
) -> Path:
    """Refuse writing over the input, or over an existing output unless asked to."""
    out = Path(output)
    if out.suffix.lower() != ".onnx":
        raise OutputError(f"output path {str(out)!r} must end in .onnx.")
    if input_path is not None:
        src = Path(input_path)
        if out.resolve() == src.resolve() or (out.exists() and src.exists() and out.samefile(src)):
            raise OutputError("the output path is the input model; sq-onnx never overwrites its input.")
        clash = out.resolve().parent / _data_name(out)
        if clash.exists() and clash.parent == src.resolve().parent and clash.name in _external_files(src):
            raise OutputError(f"writing {str(out)!r} would overwrite the input's external data file.")
    if out.is_dir():
        raise OutputError(f"output path {str(out)!r} is a directory.")
    if out.exists() and not overwrite:
        raise OutputError(f"output {str(out)!r} already exists; pass --overwrite to replace it.")
    parent = out.resolve().parent
    existing = parent
    while not existing.exists():  # the folders save_model will create: fail now, not after the work
        existing = existing.parent
    if not existing.is_dir():
        raise OutputError(f"cannot create output folder {str(parent)!r}: {str(existing)!r} is a file.")
    refused = write_refused(existing)
    if refused and existing == parent:
        raise OutputError(f"output folder {str(existing)!r} is not writable ({refused}).")
    if refused:
        raise OutputError(f"cannot create output folder {str(parent)!r} ({refused}).")
    return out


def write_refused(folder: Path) -> str | None:
    """Why ``folder`` refuses a new entry (the OS's words), or None: found by making and removing one, as
    permission bits say nothing to root, nor about read-only or virtual file systems."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".sq-onnx-probe-", dir=folder))
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def _data_name(out: Path) -> str:
    return out.name + ".data"


def _external_files(src: Path) -> set[str]:
    try:
        model = ir.load(src)
    except Exception:
        return set()
    names = set()
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            names.add(Path(value.const_value.location).name)
    return names


def save_model(model: ir.Model, output: str | os.PathLike, external_data: bool = False) -> Path:
    """Write ``model`` atomically: into a temporary folder beside the output, then rename.

    External data (``<name>.onnx.data``) is used when forced, when the weights exceed 2 GB, or when the
    model came from a file with external data (so does its output).
    """
    out = Path(output)
    parent = out.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"cannot create output folder {str(parent)!r} ({exc.strerror}).") from None
    # A model still holding tensors from an input's external data must get its own data file: saved
    # inline, onnx_ir would keep references relative to the input's folder.
    use_external = (
        external_data or weight_bytes(model) > EXTERNAL_DATA_THRESHOLD or has_external_tensors(model)
    )
    data_name = _data_name(out)
    try:
        tmpdir = Path(tempfile.mkdtemp(prefix=".sq-onnx-", dir=parent))
    except OSError as exc:
        raise OutputError(f"cannot write to output folder {str(parent)!r} ({exc.strerror}).") from None
    try:
        tmp_model = tmpdir / out.name
        if use_external:
            ir.save(model, tmp_model, external_data=data_name, size_threshold_bytes=1024)
        else:
            ir.save(model, tmp_model)
        if use_external:
            os.replace(tmpdir / data_name, parent / data_name)
        os.replace(tmp_model, parent / out.name)
        stale = parent / data_name
        if not use_external and stale.exists():
            stale.unlink()
    except OSError as exc:
        raise OutputError(f"could not write {str(out)!r} ({exc.strerror or exc}).") from None
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return out


def copy_model(model: ir.Model) -> ir.Model:
    """A structural copy that shares (lazy) tensors with ``model``: no weights are read or duplicated."""
    return ir.Model(
        model.graph.clone(),
        ir_version=model.ir_version,
        producer_name=model.producer_name,
        functions=list(model.functions.values()),
    )
