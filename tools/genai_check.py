"""Run model folders in onnxruntime-genai beside sq-onnx's own runner: the same greedy tokens? how fast?

    python tools/genai_check.py demo_out/w4 demo_out/w8a8 [--tokens 32] [--json]

For each folder (one with genai_config.json, as `sq-onnx export` and `sq-onnx convert` write them) the prompt
is encoded once with genai's tokenizer, then decoded greedily by genai and by sq-onnx's runner (what
`sq-onnx generate` does) from the same ids. Prints both token streams' agreement and genai's decode tokens/s
(after the prompt, 2 threads like `sq-onnx bench`); one process per call.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

PROMPT = "What is the capital of France? Answer in one sentence."


def _chat_ids(folder: Path, tokenizer) -> list[int]:
    """The prompt through the folder's chat template when it has one, else as plain text."""
    template = folder / "chat_template.jinja"
    if template.is_file():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder))
        ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return [int(t) for t in tokenizer.encode(PROMPT)]


def genai_decode(folder: Path, ids: list[int], new_tokens: int, threads: int = 2) -> tuple[list[int], float]:
    """genai's greedy tokens after ``ids`` and its decode tokens/s (the prompt's step not counted)."""
    import onnxruntime_genai as og

    config = og.Config(str(folder))
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(ids)  # the prompt's forward pass runs here
    start, steps = time.perf_counter(), 0
    while not generator.is_done():
        generator.generate_next_token()
        steps += 1
    seconds = time.perf_counter() - start
    return [int(t) for t in generator.get_sequence(0)[len(ids) :]], steps / seconds if seconds else 0.0


def runner_decode(model_path: Path, ids: list[int], new_tokens: int, eos: set[int]) -> list[int]:
    from sq_onnx.lm.lm_runner import LMRunner
    from sq_onnx.runtime.model_inputs import input_specs
    from sq_onnx.runtime.model_io import load_model
    from sq_onnx.runtime.ort_session import session

    runner = LMRunner(session(model_path, threads=2), input_specs(load_model(model_path), model_path))
    logits, out = runner.prefill(np.asarray([ids], np.int64)), []
    while len(out) < new_tokens:
        out.append(int(np.argmax(logits)))
        if out[-1] in eos:
            break
        logits = runner.step(out[-1])
    return out


def check(folder: Path, new_tokens: int) -> dict:
    import onnxruntime_genai as og

    config = json.loads((folder / "genai_config.json").read_text())
    model_path = folder / config["model"]["decoder"]["filename"]
    tokenizer = og.Tokenizer(og.Model(str(folder)))
    ids = _chat_ids(folder, tokenizer)
    eos = config["model"]["eos_token_id"]
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    genai, tok_s = genai_decode(folder, ids, new_tokens)
    ours = runner_decode(model_path, ids, new_tokens, eos_ids)
    same = next(
        (i for i, (a, b) in enumerate(zip(genai, ours, strict=False)) if a != b), min(len(genai), len(ours))
    )
    return {
        "folder": str(folder),
        "same_tokens": genai == ours[: len(genai)],
        "agreeing_prefix": same,
        "genai_tokens": len(genai),
        "genai_decode_tok_s": round(tok_s, 1),
        "genai_text": tokenizer.decode(np.asarray(genai, np.int32)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("folders", nargs="+", type=Path)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens to decode (default 32)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = [check(folder, args.tokens) for folder in args.folders]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title="onnxruntime-genai beside sq-onnx's runner (greedy, 2 threads)")
    for col in rows[0]:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*[str(v) for v in row.values()])
    Console().print(table)


if __name__ == "__main__":
    main()
