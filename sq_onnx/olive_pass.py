"""sq-onnx as one step of an Olive workflow (PyPI ``olive-ai``): the ``SqOnnxQuantization`` pass.

Its options are the ``Recipe``'s fields (same names, defaults and help), plus ``calibration`` (a .txt / .jsonl /
.npz file; default: the built-in text), ``tokenizer`` (a folder with tokenizer.json; default: beside the
model) and ``progress`` (progress lines on stderr, default on). Olive reads third-party passes from a package
config given to ``olive run --package-config``; a custom one replaces Olive's own, so ``write_package_config``
writes Olive's passes plus this one:

    python -m sq_onnx.olive_pass sq_onnx_olive.json
    olive run --config workflow.json --package-config sq_onnx_olive.json

with ``{"passes": {"quantize": {"type": "SqOnnxQuantization", "scheme": "w4"}}, ...}`` in the workflow. The
output is a folder (the model and, when the input had them, its genai config and tokenizer files).
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from olive.hardware import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.passes import Pass
from olive.passes.pass_config import BasePassConfig, PassConfigParam

from sq_onnx.pipeline import convert
from sq_onnx.recipe import Choice, Recipe

PASS_NAME = "SqOnnxQuantization"
EXTRA = {
    "calibration": (str, None, "calibration text or arrays (.txt, .jsonl, .npz); default: the built-in text"),
    "tokenizer": (str, None, "folder with tokenizer.json for text calibration; default: beside the model"),
    # a W4 conversion of a 1B-class model runs over an hour on a small CPU: say how far it is in Olive's log
    "progress": (
        bool,
        True,
        "progress lines on stderr (each step's start and end, every 30 s the time left)",
    ),
}


def _param(field: dataclasses.Field) -> PassConfigParam:
    """A Recipe field as an Olive option: enums as their strings, tuples as lists."""
    default = field.default if field.default is not dataclasses.MISSING else field.default_factory()  # type: ignore[misc]
    if isinstance(default, Choice):
        kind, default = str, str(default)
    elif isinstance(default, tuple):
        kind, default = list, [str(v) for v in default]
    elif default is None:
        kind = float  # alpha: None means the scheme's default
    else:
        kind = type(default)
    return PassConfigParam(
        type_=kind, default_value=default, description=field.metadata.get("help", field.name)
    )


class SqOnnxQuantization(Pass):
    """Smooth and quantize an ONNX model with sq-onnx (SmoothQuant W8A8, SmoothQuant+ W4)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        params = {f.name: _param(f) for f in dataclasses.fields(Recipe)}
        params |= {
            name: PassConfigParam(type_=t, default_value=d, description=h)
            for name, (t, d, h) in EXTRA.items()
        }
        return params

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        if not isinstance(model, ONNXModelHandler):
            raise ValueError(f"{PASS_NAME} takes an ONNX model, not {type(model).__name__}")
        values = config.dict() if hasattr(config, "dict") else dict(config)
        recipe = Recipe.from_dict({f.name: values[f.name] for f in dataclasses.fields(Recipe)})
        out_dir = Path(output_model_path)
        out_dir = out_dir.parent / out_dir.stem if out_dir.suffix == ".onnx" else out_dir
        source = Path(model.model_path)
        output = out_dir / source.name
        convert(
            source,
            output,
            recipe,
            values.get("calibration"),
            tokenizer=values.get("tokenizer"),
            overwrite=True,
            show_progress=bool(values.get("progress", True)),
        )
        return ONNXModelHandler(model_path=str(out_dir), onnx_file_name=source.name)


def package_config() -> dict[str, Any]:
    """Olive's own package config with this pass added."""
    from olive.package_config import OlivePackageConfig

    data = json.loads(Path(OlivePackageConfig.get_default_config_path()).read_text())
    data["passes"][PASS_NAME] = {
        "module_path": f"{__name__}.{PASS_NAME}",
        "supported_providers": ["*"],
        "supported_accelerators": ["*"],
        "supported_precisions": ["int4", "int8"],
        "supported_algorithms": [],
        "supported_quantization_encodings": [],
        "dataset": "dataset_optional",
    }
    return data


def write_package_config(path: str | Path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(package_config(), indent=2) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sq_onnx.olive_pass PACKAGE_CONFIG.json")
    print(write_package_config(sys.argv[1]))
