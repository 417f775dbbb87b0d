"""tools/accuracy_level_table.at_level re-levels a W4 file as ``--accuracy-level`` would write it."""

from __future__ import annotations

import onnx_ir as ir
from accuracy_level_table import at_level

from sq_onnx import Recipe, convert


def test_the_other_level_leaves_the_lm_head_at_its_own(llama_dir, calib_ids, tmp_path):
    out = tmp_path / "w4.onnx"
    result = convert(
        llama_dir / "model.onnx", out, Recipe(samples=4, gptq_samples=4, block_size=32), calib_ids
    )
    head = result.accuracy_level["lm_head"]["level"]  # the lm_head's level, as verification chose it
    levels = {}
    for level in (0, 4):
        model = ir.load(at_level(out, level))
        nodes = [n for n in model.graph if n.op_type == "MatMulNBits"]
        found: dict[bool, set[int]] = {}
        for n in nodes:
            found.setdefault(n.outputs[0].is_graph_output(), set()).add(
                n.attributes.get_int("accuracy_level")
            )
        levels[level] = found
    assert levels[0] == {False: {0}, True: {head}}
    assert levels[4] == {False: {4}, True: {head}}
