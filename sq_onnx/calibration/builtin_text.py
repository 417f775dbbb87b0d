"""The built-in texts, present wherever Python is: its documentation topics (``pydoc_data.topics``, English
technical prose) and its standard library's source (``code``).

Each is split once: a calibration part and a held-out part that calibration never sees, so a number
measured on the held-out part is not a fit to the calibration text. The docs split at 75% of the text,
the code by module (every fourth top-level module is held out).
"""

from __future__ import annotations

import sysconfig
from functools import lru_cache
from pathlib import Path

HELDOUT_FRACTION = 0.25
CODE_HELDOUT_EVERY = 4
CODE_MAX_CHARS = 600_000  # about 150k tokens: more than any calibration takes


@lru_cache(maxsize=1)
def _full_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


@lru_cache(maxsize=2)
def _code(heldout: bool) -> str:
    """Top-level standard-library modules, the held-out ones or the others, in name order."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    picked = [f for i, f in enumerate(files) if (i % CODE_HELDOUT_EVERY == CODE_HELDOUT_EVERY - 1) == heldout]
    parts, size = [], 0
    for f in picked:
        try:
            text = f.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError):
            continue
        parts.append(text)
        size += len(text)
        if size > CODE_MAX_CHARS:
            break
    return "\n\n".join(parts)


def builtin_text(part: str = "calibration", domain: str = "docs") -> str:
    """``part`` is "calibration" or "heldout"; ``domain`` is "docs" (the first 75% / last 25% of the
    documentation topics, split at a paragraph) or "code" (standard-library modules, split by module)."""
    if part not in ("calibration", "heldout"):
        raise ValueError(f"unknown part {part!r}")
    if domain == "code":
        return _code(part == "heldout")
    if domain != "docs":
        raise ValueError(f"unknown domain {domain!r}")
    text = _full_text()
    cut = text.find("\n\n", int(len(text) * (1 - HELDOUT_FRACTION)))
    cut = cut if cut > 0 else int(len(text) * (1 - HELDOUT_FRACTION))
    if part == "calibration":
        return text[:cut]
    return text[cut:].lstrip()
