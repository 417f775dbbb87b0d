"""Dependencies point one way (docs/DESIGN.md): CLI / API -> pipeline -> conversion -> tools -> passes -> maths.

Read from the source with ``ast``, so function-level imports count too. The layers, lowest first:
0. ``sq_onnx.quant`` (quantization arithmetic), ``sq_onnx.errors``, ``sq_onnx.version``: nothing else of ours;
1. ``sq_onnx.passes`` (graph passes, the top-level ``passes/`` folder);
2. ``sq_onnx.runtime`` (ORT sessions, model files and inputs);
3. ``sq_onnx.calibration``;
4. ``sq_onnx.lm`` (export, eval, bench, generate) and ``sq_onnx.reporting``;
5. the conversion modules at the package's top (recipe, plans, stages, α search, inspect, ...);
6. ``sq_onnx.pipeline``; 7. the entry points: ``sq_onnx.cli``, the Olive pass, the package's ``__init__`` and
``__main__``.
A module imports its own layer or lower ones, never a higher one, and there is no import cycle at all.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
BOTTOM = {"sq_onnx.errors", "sq_onnx.version"}
TOP = {"sq_onnx", "sq_onnx.cli", "sq_onnx.__main__", "sq_onnx.olive_pass"}


def _modules() -> dict[str, Path]:
    found = {}
    for path in [*(ROOT / "sq_onnx").rglob("*.py"), *(ROOT / "passes").glob("*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "passes":
            parts.insert(0, "sq_onnx")
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def imports_of(path: Path) -> set[str]:
    """Every sq_onnx module ``path`` imports, anywhere in the file (``from pkg import mod`` names mod)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sq_onnx":
            subs = {f"{node.module}.{a.name}" for a in node.names} & MODULES.keys()
            out |= subs or {node.module}
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "sq_onnx"}
    return out


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


PACKAGES = {
    "sq_onnx.quant": 0,
    "sq_onnx.passes": 1,
    "sq_onnx.runtime": 2,
    "sq_onnx.calibration": 3,
    "sq_onnx.lm": 4,
    "sq_onnx.reporting": 4,
}


def layer(module: str) -> int:
    if module in BOTTOM:
        return 0
    for package, rank in PACKAGES.items():
        if _within(module, package):
            return rank
    if module == "sq_onnx.pipeline":
        return 6
    if module in TOP:
        return 7
    return 5


GRAPH = {m: {t for t in imports_of(p) if t != m} for m, p in MODULES.items()}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_import_reaches_up(module):
    up = sorted(t for t in GRAPH[module] if layer(t) > layer(module))
    assert not up, f"{module} (layer {layer(module)}) imports higher layers: {up}"


def test_each_layer_below_the_app_stays_inside_its_own_imports():
    # the maths knows nothing of graphs; the passes know nothing of calibration, ORT sessions or the CLI
    for module, targets in GRAPH.items():
        if layer(module) == 0:
            assert all(layer(t) == 0 for t in targets), (module, targets)
        if layer(module) == 1:
            assert all(layer(t) <= 1 for t in targets), (module, targets)


def test_no_import_cycles():
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join([*path[path.index(module) :], module]))
        if module in done:
            return
        for target in sorted(GRAPH.get(module, ())):
            visit(target, [*path, module])
        done.add(module)

    for module in sorted(GRAPH):
        visit(module, [])


def test_the_contract_sees_the_tree():
    # a broken module map would make every check above pass vacuously
    assert {
        "sq_onnx.quant.blockwise",
        "sq_onnx.passes.smooth",
        "sq_onnx.pipeline",
        "sq_onnx.cli",
    } <= MODULES.keys()
    assert "sq_onnx.quant.blockwise" in GRAPH["sq_onnx.passes.quantize_w4"]
    assert "sq_onnx.pipeline" in GRAPH["sq_onnx.cli"]
    assert layer("sq_onnx.quantize_model") == 5 and layer("sq_onnx.quant.gptq") == 0
    assert layer("sq_onnx.runtime.ort_session") == 2 and layer("sq_onnx.lm.evaluate") == 4
