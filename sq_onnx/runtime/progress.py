"""Progress on stderr, silent when quiet: a rich bar on a terminal, plain lines elsewhere.

A conversion of a 1B-class model runs for over an hour on a small CPU; in a log file, a CI job or a pipeline
(stderr not a terminal) rich draws nothing, so the same loops print a line when they start, at most every
``LINE_EVERY_S`` seconds with the time left at the pace so far, and when they finish.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO, TypeVar

T = TypeVar("T")

# Seconds between two progress lines of one loop when stderr is not a terminal.
LINE_EVERY_S = 30.0
# The bar's time left is the pace over this many seconds: steps of one loop differ (a layer's down_proj takes
# several times its q/k/v), so a short window would swing with each step.
BAR_PACE_WINDOW_S = 3600.0


def track(
    items: Iterable[T], description: str, total: int | None = None, enabled: bool = True
) -> Iterator[T]:
    """Iterate ``items`` reporting progress on stderr when ``enabled``: a transient rich bar on a terminal,
    ``progress_lines`` otherwise."""
    if not enabled:
        yield from items
    elif sys.stderr.isatty():
        yield from _bar(items, description, total)
    else:
        yield from progress_lines(items, description, total)


def _bar(items: Iterable[T], description: str, total: int | None) -> Iterator[T]:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    progress = Progress(
        *columns, console=Console(stderr=True), transient=True, speed_estimate_period=BAR_PACE_WINDOW_S
    )
    with progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def progress_lines(
    items: Iterable[T],
    description: str,
    total: int | None = None,
    every: float = LINE_EVERY_S,
    clock: Callable[[], float] = time.monotonic,
    out: TextIO | None = None,
) -> Iterator[T]:
    """Iterate ``items`` printing ``sq-onnx: DESCRIPTION: done/total`` lines: one at the start, one after a
    step when ``every`` seconds have passed since the last line (with the time left when ``total`` is known),
    one at the end with the time taken."""

    def say(text: str) -> None:
        print(f"sq-onnx: {description}: {text}", file=out or sys.stderr, flush=True)

    of = f"/{total}" if total is not None else ""
    say(f"0{of}")
    start = last = clock()
    done = 0
    for item in items:
        yield item
        done += 1
        now = clock()
        if now - last >= every and (total is None or done < total):
            left = f", about {duration((now - start) / done * (total - done))} left" if total else ""
            say(f"{done}{of}, {duration(now - start)}{left}")
            last = now
    say(f"{done}{of} done in {duration(clock() - start)}")


def duration(seconds: float) -> str:
    """``1h02m``, ``6m12s`` or ``42s``: what a reader of a log wants, not more digits."""
    s = int(round(max(seconds, 0.0)))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"
