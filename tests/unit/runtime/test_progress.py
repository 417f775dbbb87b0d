"""Progress where stderr is not a terminal (logs, CI, pipelines): plain lines with the time left."""

from __future__ import annotations

import io

import pytest

from sq_onnx.runtime.progress import duration, progress_lines, track


class _Clock:
    """A clock the test moves by hand, after each item."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _run(items: int, seconds_per_item: float, total: int | None, every: float = 30.0) -> list[str]:
    clock, out = _Clock(), io.StringIO()
    for _ in progress_lines(range(items), "quantizing", total, every=every, clock=clock, out=out):
        clock.now += seconds_per_item
    return out.getvalue().splitlines()


def test_lines_at_start_every_interval_with_time_left_and_at_the_end():
    lines = _run(10, 10.0, total=10)
    assert lines == [
        "sq-onnx: quantizing: 0/10",
        "sq-onnx: quantizing: 3/10, 30s, about 1m10s left",  # 10 s a step, 7 steps to go
        "sq-onnx: quantizing: 6/10, 1m00s, about 40s left",
        "sq-onnx: quantizing: 9/10, 1m30s, about 10s left",
        "sq-onnx: quantizing: 10/10 done in 1m40s",
    ]


def test_the_last_step_gets_the_done_line_only():
    assert _run(2, 30.0, total=2) == [
        "sq-onnx: quantizing: 0/2",
        "sq-onnx: quantizing: 1/2, 30s, about 30s left",
        "sq-onnx: quantizing: 2/2 done in 1m00s",
    ]


def test_a_short_loop_prints_only_its_start_and_end():
    assert _run(4, 1.0, total=4) == ["sq-onnx: quantizing: 0/4", "sq-onnx: quantizing: 4/4 done in 4s"]


def test_an_unknown_total_counts_without_a_time_left():
    lines = _run(4, 20.0, total=None)
    assert lines == [
        "sq-onnx: quantizing: 0",
        "sq-onnx: quantizing: 2, 40s",
        "sq-onnx: quantizing: 4, 1m20s",
        "sq-onnx: quantizing: 4 done in 1m20s",
    ]


@pytest.mark.parametrize(
    ("seconds", "text"), [(0.4, "0s"), (42, "42s"), (372, "6m12s"), (3720, "1h02m"), (5296, "1h28m")]
)
def test_duration(seconds, text):
    assert duration(seconds) == text


def test_track_prints_lines_when_stderr_is_not_a_terminal_and_nothing_when_disabled(capsys):
    assert list(track(range(3), "calibrating", total=3)) == [0, 1, 2]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "sq-onnx: calibrating: 0/3" and err[-1].startswith("sq-onnx: calibrating: 3/3 done in")
    assert list(track(range(3), "calibrating", total=3, enabled=False)) == [0, 1, 2]
    assert capsys.readouterr().err == ""
