"""The ``sq-onnx`` command. User errors print one sentence and exit 2; never a traceback."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

from sq_onnx.errors import SqOnnxError
from sq_onnx.recipe_flags import add_recipe_flags, recipe_from_args

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one sentence with exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"sq-onnx: error: {message}.", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sq-onnx", description="SmoothQuant / SmoothQuant+ for ONNX LLMs.")
    from sq_onnx.version import __version__

    parser.add_argument("--version", action="version", version=f"sq-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    c = sub.add_parser("convert", help="smooth and quantize a model (W4 by default)")
    c.add_argument("model", help="input .onnx model (never modified)")
    c.add_argument("-o", "--output", required=True, help="output .onnx path")
    add_recipe_flags(c)
    c.add_argument(
        "--calib", default=None, help="calibration data: .txt, .jsonl or .npz (default: the built-in mix)"
    )
    c.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: beside the model)")
    c.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="write DIR/report.html (plots) and DIR/report.json: per-channel smoothing, per-layer errors",
    )
    c.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where ONNX Runtime runs calibration, GPTQ's segments and verification (auto: a CUDA GPU when "
        "onnxruntime-gpu can use one, else the CPU); the output does not depend on it beyond float rounding",
    )
    c.add_argument("--overwrite", action="store_true", help="replace an existing output (and report)")
    c.add_argument("--json", action="store_true", help="print one JSON object")
    c.add_argument("--quiet", action="store_true", help="no progress or summary")

    e = sub.add_parser("export", help="export a Hugging Face folder or .gguf file to ONNX (offline)")
    e.add_argument("src", help="local HF model folder or .gguf file")
    e.add_argument("-o", "--output", required=True, help="output folder (model.onnx + tokenizer)")
    e.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    e.add_argument("--no-kv-cache", action="store_true", help="input_ids, attention_mask -> logits only")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--quiet", action="store_true")

    v = sub.add_parser("eval", help="perplexity through ONNX Runtime on held-out text")
    v.add_argument("model")
    v.add_argument(
        "--text",
        "--texts",
        dest="text",
        action="append",
        default=None,
        help="text file, or a folder of .txt files (one domain each); repeatable: one row per domain, "
        "then their mean and worst (default: the built-in held-out text)",
    )
    v.add_argument("--seq-len", type=int, default=512)
    v.add_argument("--windows", type=int, default=16)
    v.add_argument("--tokenizer", default=None)
    v.add_argument("--threads", type=int, default=None)
    v.add_argument(
        "--compare",
        default=None,
        help="another model (the reference): perplexity ratio, top-1 agreement, KL divergence",
    )
    v.add_argument("--json", action="store_true")

    b = sub.add_parser("bench", help="prefill latency, decode tokens/s, load time and peak memory")
    b.add_argument("model")
    b.add_argument("--prompt-lengths", default="32,128,512", help="comma-separated (default 32,128,512)")
    b.add_argument("--decode-tokens", type=int, default=32)
    b.add_argument("--repeats", type=int, default=3)
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--provider", choices=("cpu", "cuda"), default="cpu")
    b.add_argument("--json", action="store_true")

    g = sub.add_parser("generate", help="greedy generation with the KV cache, streamed")
    g.add_argument("model")
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    g.add_argument("--tokenizer", default=None)
    g.add_argument("--threads", type=int, default=None)
    g.add_argument("--json", action="store_true")

    i = sub.add_parser("inspect", help="show smoothing groups and what would be quantized")
    i.add_argument("model")
    i.add_argument(
        "--calib",
        nargs="?",
        const="builtin",
        default=None,
        metavar="FILE",
        help="run calibration data (default: the built-in text) and show each group's outlier channels",
    )
    i.add_argument("--tokenizer", default=None, help="folder with tokenizer.json (default: beside the model)")
    i.add_argument("--samples", type=int, default=8, help="calibration samples for --calib (default 8)")
    i.add_argument("--seq-len", type=int, default=256, help="tokens per text sample (default 256)")
    i.add_argument("--json", action="store_true")
    return parser


def _print_summary(result: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    alpha = "off" if result["alpha"] is None else f"{result['alpha']:.2f}"
    if result["alpha"] is not None and not result["smoothed_groups"]:
        alpha = "- (no group to smooth: see 'not smoothed' below)"
    console.print(
        f"[bold green]wrote[/] {result['output']}  scheme={result['scheme']} alpha={alpha}  "
        f"{len(result['smoothed_groups'])} groups smoothed, {len(result['quantized_matmuls'])} linears quantized, "
        f"{result['output_bytes'] / 1e6:.1f} MB (from {result['input_bytes'] / 1e6:.1f} MB) in {result['seconds']:.1f}s, "
        f"peak RSS {result['peak_rss_mb']:.0f} MB"
    )
    stages = result.get("stage_seconds") or {}
    if stages:
        times = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in stages.items())
        console.print(f"  time: {times}", soft_wrap=True)
    if result.get("kept_8bit"):
        names = ", ".join(c["name"] for c in result["kept_8bit"])
        console.print(f"  8-bit weights (--keep-8bit, most 4-bit error per byte): {names}", soft_wrap=True)
    joined = result.get("joined_linears") or []
    if joined:
        linears = sum(len(names) for names in joined)
        console.print(
            f"  {linears} linears joined into {len(joined)} MatMulNBits (shared inputs; --no-join-linears keeps one each)"
        )
    w4a8 = result.get("nbits_a8_kernels")
    if w4a8 is not None:
        kept = ", ".join(f"{n} ({why})" for why, n in w4a8["kept"].items())
        console.print(
            f"  {w4a8['swapped']} MatMulNBits -> sq_onnx MatMulNBitsA8"
            + (f"; kept as MatMulNBits: {kept}" if kept else "")
        )
    if result.get("masked_attention"):
        console.print(
            f"  {result['masked_attention']} attention blocks -> sq_onnx MaskedAttention (causal keys skipped)"
        )
    for skip in result["skipped"]:
        console.print(f"  not smoothed: {skip['tensor']} -> {', '.join(skip['consumers'])}: {skip['reason']}")
    genai = result.get("genai")
    if genai and genai["written"]:
        console.print(f"  onnxruntime-genai folder ({genai['config']}): wrote {', '.join(genai['written'])}")
    elif genai:
        console.print(f"  [yellow]not a genai folder[/]: {genai['why_not']}")
    fusions = result.get("fusions")
    if fusions:
        console.print(f"  norms fused with their quantization: {fusions['fused']}")
        for r in fusions["not_fused"]:
            console.print(f"  not fused: {r['norm']} -> {r['tensor']}: {r['reason']}")
    check = result.get("smoothing_check")
    if check:
        console.print(
            f"  smoothing check: relative error {check['relative_error']:.2e} (equivalent: {check['equivalent']})"
        )
    calibration = result["calibration"]
    gptq = f", GPTQ {calibration['hessian_samples']}" if calibration.get("hessian_samples") else ""
    console.print(f"  calibration: {calibration['samples']} sample(s){gptq} of {calibration['source']}")
    v = result.get("verify")
    if v:
        top1 = "n/a" if v["top1_agreement"] is None else f"{100 * v['top1_agreement']:.1f}%"
        calib = result["calibration"]
        held = (
            calib.get("verify_source", "held-out samples")
            if calib["held_out"]
            else "calibration samples (too few to hold any out)"
        )
        console.print(
            f"  verify on {v['samples']} sample(s) of {held}: relative error {v['relative_error']:.4f}, "
            f"cosine {v['cosine']:.5f}, top-1 agreement {top1}"
        )
    level = result.get("accuracy_level")
    if level and "level" in level:
        console.print(f"  accuracy level {level['level']} (--accuracy-level auto): {level['reason']}")
    if level and "lm_head" in level:
        head = level["lm_head"]
        console.print(f"  lm_head accuracy level {head['level']} (--accuracy-level auto): {head['reason']}")
    if result.get("report"):
        console.print(f"  report: {result['report'][0]}")


def _cmd_convert(args: argparse.Namespace) -> int:
    from sq_onnx.pipeline import convert
    from sq_onnx.verify import degradation_warning

    recipe = recipe_from_args(args)
    result = convert(
        args.model,
        args.output,
        recipe,
        calibration=args.calib,
        tokenizer=args.tokenizer,
        overwrite=args.overwrite,
        show_progress=not (args.quiet or args.json),
        report=args.report,
        device=args.device,
    ).to_dict()
    if args.json:
        print(json.dumps(result, indent=2))
    elif not args.quiet:
        _print_summary(result)
    warning = degradation_warning(result.get("verify"))
    if warning:  # with --json and --quiet too: never convert silently
        print(f"sq-onnx: warning: {warning}", file=sys.stderr)
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from sq_onnx.inspect_model import inspect_model, render_inspection

    info = inspect_model(
        args.model, calib=args.calib, tokenizer=args.tokenizer, samples=args.samples, seq_len=args.seq_len
    )
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        render_inspection(info)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from sq_onnx.lm.export import export

    export(
        args.src,
        args.output,
        dtype=args.dtype,
        kv_cache=not args.no_kv_cache,
        overwrite=args.overwrite,
        quiet=args.quiet,
    )
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from sq_onnx.lm.evaluate import evaluate_domains, text_sources

    texts = text_sources(args.text) if args.text else {"built-in held-out text": None}
    result = evaluate_domains(
        args.model,
        texts,
        seq_len=args.seq_len,
        windows=args.windows,
        tokenizer=args.tokenizer,
        threads=args.threads,
        show_progress=not args.json,
        compare=args.compare,
    )
    if args.json:
        one = len(result.domains) == 1 and not (args.text and Path(args.text[0]).is_dir())
        print(json.dumps(result.domains[0].to_dict() if one else result.to_dict(), indent=2))
        return 0
    if len(result.domains) == 1:
        r = result.domains[0]
        print(
            f"{r.model}: perplexity {r.perplexity:.3f} over {r.tokens} tokens "
            f"({r.windows} windows of {r.seq_len}) in {r.seconds:.1f}s"
        )
        c = r.compare
        if c:
            print(
                f"{c['model']}: perplexity {c['perplexity']:.3f}; ratio {c['perplexity_ratio']:.4f}, "
                f"top-1 agreement {100 * c['top1_agreement']:.1f}%, KL divergence {c['kl_divergence']:.4f}"
            )
        return 0
    print(domains_table(result))
    return 0


def domains_table(result) -> str:
    """One row per domain (and the mean and worst when there is a reference), as aligned text."""
    compared = result.mean is not None
    head = ["domain", "perplexity", "windows"] + (["reference", "ratio", "KL", "top-1"] if compared else [])
    rows = []
    for r in result.domains:
        row = [r.domain, f"{r.perplexity:.3f}", str(r.windows)]
        if compared:
            c = r.compare
            row += [
                f"{c['perplexity']:.3f}",
                f"{c['perplexity_ratio']:.4f}",
                f"{c['kl_divergence']:.4f}",
                f"{100 * c['top1_agreement']:.1f}%",
            ]
        rows.append(row)
    for label, agg in (("mean", result.mean), ("worst", result.worst)) if compared else ():
        rows.append(
            [
                label,
                "",
                "",
                "",
                f"{agg['perplexity_ratio']:.4f}",
                f"{agg['kl_divergence']:.4f}",
                f"{100 * agg['top1_agreement']:.1f}%",
            ]
        )
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(x, widths, strict=True)).rstrip() for x in [head, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cmd_bench(args: argparse.Namespace) -> int:
    from sq_onnx.lm.bench import bench

    try:
        lengths = tuple(int(x) for x in args.prompt_lengths.split(",") if x.strip())
    except ValueError:
        raise SqOnnxError(
            f"--prompt-lengths must be comma-separated integers, got {args.prompt_lengths!r}."
        ) from None
    result = bench(
        args.model, lengths, args.decode_tokens, args.repeats, args.threads, args.provider
    ).to_dict()
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{result['model']} ({result['provider']}, {result['size_mb']} MB)")
    for col in ("metric", "value"):
        table.add_column(col)
    table.add_row("load", f"{result['load_s']:.2f} s")
    for length, ms in result["prefill_ms"].items():
        table.add_row(f"prefill {length} tokens", f"{ms:.1f} ms")
    table.add_row(
        f"decode (context {result['decode_context']})", f"{result['decode_tokens_per_s']:.1f} tokens/s"
    )
    table.add_row("peak RSS", f"{result['peak_rss_mb']:.0f} MB")
    table.add_row("CPU", result["cpu"])
    if result["cpu_kernels"]:
        table.add_row("sq_onnx CPU kernels", result["cpu_kernels"])
    Console().print(table)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from sq_onnx.lm.generate import generate, print_stream

    result = generate(
        args.model,
        args.prompt,
        args.max_new_tokens,
        args.chat,
        args.tokenizer,
        on_text=None if args.json else print_stream,
        threads=args.threads,
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"\n[{result['new_tokens']} tokens, {result['decode_tokens_per_s']} tokens/s]", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "convert": _cmd_convert,
        "inspect": _cmd_inspect,
        "export": _cmd_export,
        "eval": _cmd_eval,
        "bench": _cmd_bench,
        "generate": _cmd_generate,
    }
    previous = _sigterm_as_interrupt()
    try:
        with _run_failures(args):
            return handlers[args.command](args)
    except SqOnnxError as exc:
        print(f"sq-onnx: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("sq-onnx: interrupted; no output was written.", file=sys.stderr)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run_failures(args: argparse.Namespace) -> AbstractContextManager[None]:
    """eval, bench and generate only run the models they are given: ONNX Runtime failing there is said in one
    sentence (convert says it for its input's steps, ``sq_onnx.pipeline``)."""
    if args.command not in ("eval", "bench", "generate"):
        return nullcontext()
    from sq_onnx.runtime.ort_session import run_failures_said

    compare = getattr(args, "compare", None)
    return run_failures_said(f"{args.model}" + (f" or {compare}" if compare else ""))


def _sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so temporary files are removed and no partial output remains."""

    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not in the main thread
        return None


if __name__ == "__main__":
    raise SystemExit(main())
