"""The accuracy table's rows are CLI flags run in a subprocess 10 minutes in; a typo there should fail here."""

from __future__ import annotations

import pytest
from accuracy_table import ROWS

from sq_onnx.cli import build_parser

CONVERT_ROWS = {label: spec for label, spec in ROWS.items() if spec and spec[0] == "convert"}


@pytest.mark.parametrize("label", sorted(CONVERT_ROWS))
def test_convert_row_parses(label: str) -> None:
    spec = CONVERT_ROWS[label]
    args = build_parser().parse_args(["convert", "in.onnx", "-o", "out.onnx", *spec[1:]])
    assert args.command == "convert"
    assert args.model == "in.onnx"


def test_rows_are_known_kinds() -> None:
    assert ROWS["fp32"] is None
    kinds = {spec[0] for spec in ROWS.values() if spec}
    assert kinds <= {"convert", "ort-rtn", "ort-dynamic", "ort-static"}
