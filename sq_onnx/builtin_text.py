"""The built-in English text: Python's own documentation topics (``pydoc_data.topics``), always installed.

The text is split once: the first part calibrates, the last part is held out for evaluation, so a
perplexity measured on the held-out part never saw the calibration text.
"""

from __future__ import annotations

from functools import lru_cache

HELDOUT_FRACTION = 0.25


@lru_cache(maxsize=1)
def _full_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key].strip() for key in sorted(topics))


def builtin_text(part: str = "calibration") -> str:
    """``part`` is "calibration" (the first 75%) or "heldout" (the last 25%), split at a paragraph."""
    text = _full_text()
    cut = text.find("\n\n", int(len(text) * (1 - HELDOUT_FRACTION)))
    cut = cut if cut > 0 else int(len(text) * (1 - HELDOUT_FRACTION))
    if part == "calibration":
        return text[:cut]
    if part == "heldout":
        return text[cut:].lstrip()
    raise ValueError(f"unknown part {part!r}")
