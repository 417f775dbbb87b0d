"""What ``--accuracy-level auto`` would choose for a converted W4 model on N built-in held-out samples: its
MatMulNBits but the lm_head run at level 0 and at level 4 against the float model, judged by
``sq_onnx.accuracy_level.judge`` as the conversion judges it, with each estimate's standard error over the samples
(tools/RESULTS.md, "on 2 or 8 held-out samples").

    python tools/level_choice.py demo_out/fp32/model.onnx demo_out/w4/model.onnx [--samples 16] [--seq-len 256]
    python tools/level_choice.py demo_out/fp32/model.onnx demo_out/w4/model.onnx --samples 64 --spread 8 16 32
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sq_onnx import accuracy_level
from sq_onnx.calibration.calibration_data import builtin_heldout_feeds
from sq_onnx.runtime.model_inputs import check_feed, complete_feed, input_specs
from sq_onnx.runtime.model_io import load_model
from sq_onnx.verify import each_first_output, first_outputs


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("fp32", type=Path)
    parser.add_argument("w4", type=Path)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tolerance", type=float, default=0.01)
    parser.add_argument(
        "--spread",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help="also the estimates' spread over random draws of N of the samples (e.g. --samples 64 --spread 8 16 32)",
    )
    args = parser.parse_args()
    reference = load_model(args.fp32)
    specs = input_specs(reference, args.fp32)
    feeds, origin = builtin_heldout_feeds(args.samples, args.seq_len, args.fp32.parent / "tokenizer.json")
    feeds = [complete_feed(check_feed(f, specs), specs) for f in feeds]
    ref = first_outputs(reference, feeds, "fp32", True)
    model = load_model(args.w4)
    nodes = accuracy_level.linear_nodes_in_file(model.graph)
    measured = {}
    for level in (0, 4):  # one sample's outputs at a time, as the conversion scores them
        accuracy_level.set_level(nodes, level)
        sums = accuracy_level.LossSums()
        for r, out, feed in zip(
            ref, each_first_output(model, feeds, f"level {level}", True), feeds, strict=True
        ):
            sums.add(r, out, feed)
        measured[level] = sums
    choice = accuracy_level.judge(measured[0], measured[4], args.tolerance)
    print(f"{len(feeds)} samples of {args.seq_len} tokens ({origin}): level {choice.level}; {choice.reason}")
    print(f"KL to fp32: level 0 {measured[0].kl:.4f}, level 4 {measured[4].kl:.4f}")
    for size in args.spread:
        print_spread(measured[0], measured[4], size, args.tolerance)


def print_spread(
    level0: accuracy_level.LossSums, level4: accuracy_level.LossSums, size: int, tolerance: float
) -> None:
    """How far a conversion's choice on ``size`` of these samples could move: the standard deviation of
    both estimates over 2000 random draws of ``size`` samples without replacement."""
    n = len(level0.sample_kl)
    if size >= n:
        print(f"--spread {size}: needs more than {size} samples")
        return
    rng = np.random.default_rng(0)
    kl, nll = (
        np.subtract(level4.sample_kl, level0.sample_kl),
        np.subtract(level4.sample_nll, level0.sample_nll),
    )
    draws = [rng.choice(n, size, replace=False) for _ in range(2000)]
    expected = np.expm1([kl[d].mean() for d in draws])
    on_tokens = np.expm1([nll[d].mean() for d in draws]) if nll.size == n else np.array([np.nan])
    print(
        f"draws of {size} of the {n} samples: as the float model predicts sd {expected.std():.2%}, on the "
        f"samples' tokens sd {on_tokens.std():.2%} (beyond {tolerance:.0%}: {np.mean(on_tokens > tolerance):.0%} of draws)"
    )


if __name__ == "__main__":
    main()
