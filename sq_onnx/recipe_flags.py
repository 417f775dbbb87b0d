"""The ``convert`` flags, generated from ``Recipe``'s fields (help, choices, defaults in one place), and the
recipe built back from parsed arguments, on top of an optional ``--recipe FILE`` (JSON or YAML: a recipe,
or the ``--json`` output of an earlier convert, whose ``recipe`` it takes)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from sq_onnx.errors import RecipeError
from sq_onnx.recipe import CHOICE_FIELDS, Recipe

DEFAULTS = Recipe()


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _default_text(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "the scheme's"
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "none"
    return str(value)


def _alpha(text: str) -> float | str:
    if text == "auto":
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid alpha {text!r} (a number between 0 and 1, or auto)"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha must be between 0 and 1, got {value}")
    return value


def _comma_list(text: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in text.split(",") if x.strip())


def add_recipe_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Recipe field (booleans as --x / --no-x). Unset flags stay off the namespace, so a
    ``--recipe`` file's values survive unless a flag overrides them."""
    parser.add_argument(
        "--recipe",
        default=None,
        metavar="FILE",
        help="start from this recipe (.json or .yaml; also the --json output of a convert); flags override it",
    )
    for f in dataclasses.fields(Recipe):
        default = getattr(DEFAULTS, f.name)
        meta = f.metadata
        help_text = f"{meta['help']} (default: {_default_text(default)})"
        kwargs: dict[str, Any] = {"default": argparse.SUPPRESS, "help": help_text, "dest": f.name}
        if isinstance(default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.name == "alpha":
            kwargs["type"] = _alpha
        elif f.name in CHOICE_FIELDS:
            kwargs["choices"] = CHOICE_FIELDS[f.name].values()
            if "on" in kwargs["choices"]:  # an on / off / auto switch: the bare flag means on
                kwargs.update(nargs="?", const="on")
        elif meta.get("list") == "append":
            kwargs.update(action="append", metavar=meta.get("metavar"))
        elif meta.get("list") == "comma":
            kwargs.update(type=_comma_list, metavar=meta.get("metavar"))
        else:
            kwargs["type"] = type(default)
        parser.add_argument(flag(f.name), **kwargs)


def load_recipe_file(path: str | Path) -> dict[str, Any]:
    """A recipe dict from JSON or YAML; a convert's --json output gives its ``recipe``."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"--recipe {path}: no such file.")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise RecipeError("--recipe FILE.yaml needs PyYAML (pip install pyyaml); or give JSON.") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RecipeError(f"--recipe {path} is not valid JSON ({exc.msg}, line {exc.lineno}).") from None
    if isinstance(data, dict) and isinstance(data.get("recipe"), dict):
        data = data["recipe"]
    if not isinstance(data, dict):
        raise RecipeError(f"--recipe {path} must hold an object of recipe fields.")
    return data


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The file's recipe (or the defaults), with every flag given on the command line on top."""
    data = load_recipe_file(args.recipe) if getattr(args, "recipe", None) else {}
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if hasattr(args, f.name)}
    if given.get("alpha") == "auto":  # --alpha auto is the model-level α search
        if given.get("alpha_search", "model") != "model":
            raise RecipeError("give either --alpha auto or --alpha-search, not both.")
        given["alpha"], given["alpha_search"] = None, "model"
    elif given.get("alpha") is not None and given.get("alpha_search", "none") != "none":
        raise RecipeError("give either a fixed --alpha or an α search, not both.")
    for name in ("exclude", "act16"):
        if name in given:
            given[name] = tuple(given[name])
    return Recipe.from_dict({**data, **given})
