"""Every option of a conversion in one frozen dataclass. Each field carries its help text and its choices,
so the CLI's ``convert`` flags are generated from it (``sq_onnx.recipe_flags``), and a recipe round-trips
through JSON / YAML (``--recipe FILE``, ``--json``)."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from sq_onnx.errors import RecipeError


class Choice(str, Enum):
    """A string option with a closed set of values; compares, prints and serialises as its value."""

    __hash__ = str.__hash__  # a dict or set keyed by the plain strings finds the member

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(str(m.value) for m in cls)


class Scheme(Choice):
    W4 = "w4"
    W8A8 = "w8a8"
    SMOOTH = "smooth"


class AlphaSearch(Choice):
    NONE = "none"
    MODEL = "model"
    LAYER = "layer"


class ActMode(Choice):
    PER_TOKEN = "per-token"
    PER_TENSOR = "per-tensor"
    STATIC = "static"


class Kernels(Choice):
    ORT = "ort"
    SQ_ONNX = "sq_onnx"


class Format(Choice):
    CONTRIB = "contrib"  # ORT's contrib ops: MatMulNBits, MatMulIntegerToFloat (or the sq_onnx kernels)
    QDQ = "qdq"  # QuantizeLinear / DequantizeLinear around standard MatMuls, for execution providers
    QOPERATOR = "qoperator"  # QuantizeLinear + MatMulInteger, float outputs (W8A8 with static activations)


class EmbeddingBits(Choice):
    EIGHT = "8"
    FOUR = "4"
    FP = "fp"


class AccuracyLevel(Choice):
    AUTO = "auto"  # 4 when the held-out verification shows it costs at most --level4-tolerance, else 0
    L0 = "0"
    L1 = "1"
    L2 = "2"
    L3 = "3"
    L4 = "4"


class LinearFolds(Choice):
    AUTO = "auto"  # where measured to help (``Recipe.uses_linear_folds``)
    ON = "on"
    OFF = "off"


class LmHead(Choice):
    FOUR = "4"
    EIGHT = "8"
    FP = "fp"


class CalibDomain(Choice):
    DOCS = "docs"
    CODE = "code"
    SELF = "self"


SCHEMES = Scheme.values()
ACT_MODES = ActMode.values()
KERNELS = Kernels.values()
LM_HEAD_MODES = LmHead.values()
ALPHA_SEARCHES = AlphaSearch.values()
CALIB_DOMAINS = CalibDomain.values()

# Default α per scheme. w8a8: the SmoothQuant paper's 0.5. w4: 0.4, the best of a sweep on SmolLM2
# (docs/EXPERIMENTS.md, "Choosing the W4 default α").
DEFAULT_ALPHA = {"w8a8": 0.5, "w4": 0.4, "smooth": 0.5}
# W8A8 with one activation scale per tensor (static, or per-tensor dynamic): one scale must cover every token,
# so more of the range moves into the weights; 0.8 was the best of 0.5 / 0.8 / 0.9 with the linear folds on
# SmolLM2's validation domains for both (static: --alpha auto picks it too; per-tensor: mean KL 0.198 / 0.135 /
# 0.212; tools/RESULTS.md)
PER_TENSOR_ALPHA = 0.8


def option(default: Any, help: str, **meta: Any) -> Any:
    """A recipe field with its CLI help (and optional ``flag``, ``metavar``, ``list``: how it is parsed)."""
    if isinstance(default, tuple):
        return field(default_factory=lambda: default, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass(frozen=True)
class Recipe:
    """What to do to a model. ``alpha=None`` means the scheme's default."""

    scheme: Scheme = option(Scheme.W4, "w4 (SmoothQuant+), w8a8 (SmoothQuant), smooth (float only)")
    alpha: float | None = option(
        None,
        "migration strength 0..1 (default 0.4 for w4, 0.5 for w8a8, 0.8 with --act static or per-tensor), or auto: search one α on the model's loss",
    )
    alpha_search: AlphaSearch = option(
        AlphaSearch.NONE,
        "model: one α end to end (= --alpha auto); layer: one α per group on its output error",
    )
    alpha_step: float = option(0.1, "grid step of the α search")
    search_samples: int = option(4, "calibration samples scored per α (model search)")
    search_rows: int = option(512, "activation rows kept per group (layer search)")
    smooth: bool = option(True, "smooth before quantizing (--no-smooth: the plain quantization baseline)")
    linear_folds: LinearFolds = option(
        LinearFolds.AUTO,
        "also smooth the linears that a linear feeds (up_proj -> down_proj through the gated product, fc1 -> fc2 "
        "through a ReLU, v_proj -> o_proj through attention): 1/s folds into the producer's output columns; "
        "auto: on for w8a8, where it was measured to help (most with --act static), off for w4",
    )
    block_size: int = option(128, "W4 block size along K")
    symmetric: bool = option(False, "W4 symmetric blocks (no zero points)")
    # The range per block that minimises the activation-weighted error, not the full range (docs/EXPERIMENTS.md)
    clip_search: bool = option(
        True, "W4: choose each block's range by the activation-weighted error (else plain round-to-nearest)"
    )
    # GPTQ's error feedback: the largest single W4 gain on SmolLM2 (docs/EXPERIMENTS.md)
    gptq: bool = option(
        True, "W4: GPTQ's error feedback (--no-gptq: per-block rounding with the clip search)"
    )
    # More samples fit the calibration text less and generalise better: 256 rather than 128 was chosen on
    # the validation domains (mean KL to fp32 0.139 -> 0.129) for about twice GPTQ's time (tools/RESULTS.md)
    gptq_samples: int = option(
        256, "W4: calibration samples for GPTQ's Hessians (more is slower and generalises better)"
    )
    # GPTQ's own sequential mode; alone it changes nothing measurable on SmolLM2, the asymmetric target runs it
    gptq_sequential: bool = option(
        False,
        "W4: Hessians of each layer's input from the model with the earlier layers already quantized "
        "(GPTQ's sequential mode; about the cost of the one-pass Hessians)",
    )
    # GPTAQ (Li et al., 2025): each layer also undoes the error the earlier ones left in its input
    gptq_asymmetric: bool = option(
        True,
        "W4: fit each layer to the float model's output from the input the quantized layers before it give it "
        "(GPTAQ; implies --gptq-sequential and runs a float copy beside it; --no-gptq-asymmetric is plain GPTQ, "
        "about 25%% faster)",
    )
    lm_head_gptq: bool = option(
        True,
        "W4: the 8- or 4-bit lm_head by GPTQ too (--no-lm-head-gptq: per-block rounding with the clip search; "
        "saves the lm_head's segment run and GPTQ over every vocabulary column)",
    )
    act_order: bool = option(True, "GPTQ: quantize the most active input channels first")
    # Each round can only lower GPTQ's layer loss; 4 rounds cost less than more samples for the same gain
    gptq_refine: int = option(
        4, "W4: rounds of coordinate descent over the codes and refitting of the block scales after GPTQ"
    )
    # More dampening pulls GPTQ towards round-to-nearest and generalises better to text unlike the
    # calibration's: chosen on the validation domains (tools/RESULTS.md)
    gptq_damp: float = option(0.3, "W4: GPTQ's dampening, a fraction of mean(diag H)")
    gptq_target_ridge: float = option(
        0.1, "W4: ridge of the asymmetric target's correction, a fraction of mean(diag H)"
    )
    gptq_holdout: int = option(
        0,
        "W4: GPTQ samples held out; a layer keeps GPTQ's weights only where they beat round-to-nearest with "
        "the clip search on them (0: off)",
    )
    # Level 4 (int8 activations) is about 2x faster on CPU; smoothing keeps it within +1% perplexity of level 0
    # on SmolLM2, and auto checks that on each model (tools/RESULTS.md)
    accuracy_level: AccuracyLevel = option(
        AccuracyLevel.AUTO,
        "MatMulNBits accuracy_level of the W4 linears (4: int8 activations, fast on CPU; 0: float); auto: 4 when "
        "the held-out verification shows it within --level4-tolerance of level 0, else 0",
    )
    level4_tolerance: float = option(
        0.01,
        "--accuracy-level auto: the largest perplexity increase of level 4 over level 0 on the verification "
        "samples that still chooses level 4 (0.01 = 1%%)",
    )
    gptq_int8_inputs: bool = option(
        False,
        "W4: where a linear will run at accuracy_level 4, GPTQ fits its weights to the int8-rounded input "
        "that level's CPU kernel multiplies (per block of K, as MLAS rounds it), not to the float input",
    )
    keep_8bit: int = option(
        0,
        "W4: give the N linears whose 4-bit weights lose the most output per byte (measured on calibration "
        "rows) 8-bit weights instead: mixed precision that trades a few MB for accuracy",
        metavar="N",
    )
    lm_head: LmHead = option(LmHead.EIGHT, "bits for the vocabulary projection")
    # ORT's 8-bit MatMulNBits at level 0 is ~5x slower than fp32 for decode on AVX2 CPUs; level 4 is fast
    # and measured lossless for the lm_head (docs/EXPERIMENTS.md)
    # auto: 4, unless --accuracy-level auto's verification finds it beyond --level4-tolerance of 0 (the level-4
    # failure case without smoothing: +26% -> +71% perplexity over fp32, tools/RESULTS.md)
    lm_head_accuracy_level: AccuracyLevel = option(
        AccuracyLevel.AUTO,
        "MatMulNBits accuracy_level of the lm_head; auto: 4, unless --accuracy-level auto also measures the "
        "lm_head at level 4 beyond --level4-tolerance of level 0 on the held-out samples, then 0",
    )
    # 8-bit rows measured within 0.2% perplexity on SmolLM2 (tools/RESULTS.md), a third of the W4 file
    # One kernel call per shared input instead of one per linear: decode 2.3x -> 2.6-2.9x fp32 on SmolLM2 (tools/RESULTS.md)
    join_linears: bool = option(
        True,
        "weight-only linears that read one tensor (q/k/v, gate/up) become one MatMulNBits and a Split "
        "(--format contrib; same outputs, fewer kernel calls)",
    )
    embedding: EmbeddingBits = option(
        EmbeddingBits.EIGHT,
        "bits of the token embedding table (GatherBlockQuantized, a contrib op: --format contrib only), or fp",
    )
    act: ActMode = option(ActMode.PER_TOKEN, "W8A8 activation quantization")
    kernels: Kernels = option(
        Kernels.ORT,
        "stock ONNX Runtime ops, or the sq_onnx custom ops, which sessions load with sq_onnx.register_custom_ops: "
        "W8A8 fused norm + quantize (CPU and CUDA); W4 at accuracy level 4, a W4A8 CPU kernel (AVX-512 VNNI) "
        "in place of MatMulNBits",
    )
    format: Format = option(
        Format.CONTRIB,
        "how quantized linears are written: ORT's contrib ops; qdq (standard Q/DQ ops, W8A8 with --act static, "
        "W4 as blocked int4 DequantizeLinear, opset 21) for TensorRT / QNN / OpenVINO / DirectML; qoperator "
        "(QuantizeLinear + MatMulInteger with a float output, W8A8 with --act static)",
    )
    exclude: tuple[str, ...] = option(
        (),
        "keep linears whose node, weight or module name matches in float (repeatable)",
        list="append",
        metavar="REGEX",
    )
    act16: tuple[str, ...] = option(
        (),
        "--act static --format qdq: linears whose node, weight or module name matches get 16-bit activations "
        "(A16W8, int16 QuantizeLinear; QNN runs them natively, ORT's CPU in float); repeatable",
        list="append",
        metavar="REGEX",
    )
    # One domain calibrates GPTQ to that domain only (tools/RESULTS.md, multi-domain table)
    calib_mix: tuple[CalibDomain, ...] = option(
        (CalibDomain.DOCS, CalibDomain.CODE, CalibDomain.SELF),
        "without --calib: built-in domains to draw on, comma-separated: docs (Python's documentation), "
        "code (standard-library source), self (text the model samples itself)",
        list="comma",
        metavar="DOMAINS",
    )
    samples: int = option(16, "calibration samples")
    seq_len: int = option(256, "tokens per text sample")
    # --accuracy-level auto decides on these: 2 were a coin toss near the tolerance; on SmolLM2 the estimate on the
    # samples' tokens spreads by 0.30% (sd) over draws of 8, 0.19% of 16 (tools/RESULTS.md). Verification holds
    # the float model's logits for them all (50 MB per 256-token sample at a 49K vocabulary) and one sample's more
    verify_samples: int = option(
        16, "held-out samples for verification (and the --accuracy-level auto choice)"
    )
    external_data: bool = option(False, "always write weights to OUTPUT.data")
    seed: int = option(0, "seed of the calibration's sampling")

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "act16", tuple(self.act16))
        for name in ("accuracy_level", "lm_head_accuracy_level"):
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, str(value))  # recipes before "auto"
        for name, kind in CHOICE_FIELDS.items():
            value = getattr(self, name)
            if value not in kind.values():
                raise RecipeError(
                    f"--{name.replace('_', '-')} must be one of {', '.join(kind.values())}, got {value!r}."
                )
            object.__setattr__(self, name, kind(value))
        mix = tuple(self.calib_mix)
        if not mix or set(mix) - set(CALIB_DOMAINS):
            raise RecipeError(
                f"--calib-mix takes a comma-separated subset of {', '.join(CALIB_DOMAINS)}, "
                f"got {','.join(map(str, mix)) or 'nothing'}."
            )
        object.__setattr__(self, "calib_mix", tuple(CalibDomain(d) for d in mix))
        self.validate()

    def validate(self) -> None:
        """Raise RecipeError with one sentence for the first invalid field."""
        if self.alpha is not None and not (_number(self.alpha) and 0.0 <= float(self.alpha) <= 1.0):
            raise RecipeError(f"alpha must be a number between 0 and 1, got {self.alpha!r}.")
        if self.alpha_search != "none" and self.scheme == "smooth":
            raise RecipeError("an α search needs a quantizing scheme (w4 or w8a8), not smooth.")
        if self.alpha_search != "none" and not self.smooth:
            raise RecipeError("an α search and --no-smooth contradict each other.")
        if not 0.0 < self.alpha_step <= 1.0:
            raise RecipeError(f"--alpha-step must be in (0, 1], got {self.alpha_step}.")
        if self.search_samples < 1 or self.search_rows < 16:
            raise RecipeError("--search-samples must be >= 1 and --search-rows >= 16.")
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise RecipeError(f"block size must be a power of two >= 16, got {self.block_size}.")
        if not 0.0 <= self.level4_tolerance <= 1.0:
            raise RecipeError(f"--level4-tolerance must be between 0 and 1, got {self.level4_tolerance}.")
        if not 0 <= self.gptq_refine <= 100:
            raise RecipeError(f"--gptq-refine must be between 0 and 100, got {self.gptq_refine}.")
        if not (0.0 < self.gptq_damp <= 10.0 and 0.0 < self.gptq_target_ridge <= 10.0):
            raise RecipeError("--gptq-damp and --gptq-target-ridge must be in (0, 10].")
        if not 0 <= self.gptq_holdout < self.gptq_samples:
            raise RecipeError("--gptq-holdout must be at least 0 and below --gptq-samples.")
        if self.gptq_holdout and not (self.gptq_asymmetric or self.gptq_sequential):
            raise RecipeError(
                "--gptq-holdout needs the sequential Hessians (--gptq-asymmetric, the default)."
            )
        if self.gptq_samples < 1:
            raise RecipeError(f"--gptq-samples must be at least 1, got {self.gptq_samples}.")
        if self.kernels == "sq_onnx" and self.scheme == "w8a8" and self.act != "per-token":
            raise RecipeError("--kernels sq_onnx is for --scheme w8a8 with --act per-token, or --scheme w4.")
        if self.kernels == "sq_onnx" and self.scheme == "smooth":
            raise RecipeError(
                "--kernels sq_onnx is for --scheme w8a8 or w4; --scheme smooth quantizes nothing."
            )
        if self.kernels == "sq_onnx" and self.scheme == "w4" and self.accuracy_level not in ("4", "auto"):
            raise RecipeError(
                "--kernels sq_onnx with --scheme w4 computes as accuracy level 4 (int8 activations); use "
                "--accuracy-level 4 or auto, or --kernels ort for level "
                f"{self.accuracy_level}."
            )
        if self.kernels == "sq_onnx" and self.format != "contrib":
            raise RecipeError(
                "--kernels sq_onnx writes its own ops; --format qdq and qoperator are for --kernels ort."
            )
        if self.format == "qoperator" and self.scheme != "w8a8":
            raise RecipeError(
                "--format qoperator writes MatMulInteger, which is W8A8; use --format qdq for w4."
            )
        if self.format in ("qdq", "qoperator") and self.scheme == "w8a8" and self.act != "static":
            raise RecipeError(
                f"--format {self.format} carries one calibrated activation scale per tensor "
                "(QuantizeLinear's scale is a scalar): add --act static."
            )
        if self.keep_8bit < 0 or (self.keep_8bit and self.scheme != "w4"):
            raise RecipeError("--keep-8bit takes a count >= 0 and applies to --scheme w4 only.")
        if self.samples < 1:
            raise RecipeError(f"samples must be at least 1, got {self.samples}.")
        if self.seq_len < 2:
            raise RecipeError(f"seq-len must be at least 2, got {self.seq_len}.")
        if self.verify_samples < 0:
            raise RecipeError(f"verify-samples must be >= 0, got {self.verify_samples}.")
        if self.act16 and not (self.scheme == "w8a8" and self.act == "static" and self.format == "qdq"):
            raise RecipeError(
                "--act16 writes int16 QuantizeLinear / DequantizeLinear pairs: it needs --scheme w8a8 --act static "
                "--format qdq (MatMulInteger and the contrib int8 ops take 8-bit activations only)."
            )
        for flag, patterns in (("--exclude", self.exclude), ("--act16", self.act16)):
            for pattern in patterns:
                try:
                    re.compile(pattern)
                except re.error as exc:
                    raise RecipeError(
                        f"{flag} {pattern!r} is not a valid regular expression ({exc})."
                    ) from None

    def alpha_grid(self) -> list[float]:
        """The α candidates of a search: 0, step, 2*step, ..., 1."""
        n = int(round(1.0 / self.alpha_step))
        return sorted({round(min(1.0, i * self.alpha_step), 4) for i in range(n + 1)} | {1.0})

    @property
    def uses_gptq(self) -> bool:
        """GPTQ applies to the weight-only scheme; W8A8 quantizes activations too and keeps RTN weights."""
        return self.gptq and self.scheme == "w4"

    @property
    def written_accuracy_level(self) -> int:
        """The level the W4 linears are written with; auto writes 0 and may raise it after verifying."""
        return 0 if self.accuracy_level == "auto" else int(self.accuracy_level)

    @property
    def written_lm_head_accuracy_level(self) -> int:
        """The lm_head's level: auto writes 4 (``--accuracy-level auto`` may lower it to 0 after verifying)."""
        return 4 if self.lm_head_accuracy_level == "auto" else int(self.lm_head_accuracy_level)

    def gptq_fits(self, lm_head: bool) -> bool:
        """Whether GPTQ, where it runs, fits this weight-only linear (``--no-lm-head-gptq`` rounds the lm_head)."""
        return self.lm_head_gptq or not lm_head

    def aimed_accuracy_level(self, lm_head: bool) -> int:
        """The level a weight-only linear is meant to run at: auto aims for 4 (and verifies it afterwards)."""
        if lm_head:
            return self.written_lm_head_accuracy_level
        return 4 if self.accuracy_level == "auto" else int(self.accuracy_level)

    @property
    def uses_linear_folds(self) -> bool:
        """--linear-folds, with auto on where measured to help on SmolLM2's validation domains (tools/RESULTS.md):
        W8A8, above all with static activations, whose one scale per tensor must cover down_proj's outliers
        (mean KL 0.82 -> 0.10; per token 0.021 -> 0.017); not W4 (0.134 -> 0.142)."""
        if self.linear_folds == "auto":
            return self.scheme == "w8a8"
        return self.linear_folds == "on"

    @property
    def effective_alpha(self) -> float:
        """The α actually used: the given one or the scheme's default (per-tensor activations: 0.8)."""
        if self.alpha is not None:
            return float(self.alpha)
        if self.scheme == "w8a8" and self.act in ("static", "per-tensor"):
            return PER_TENSOR_ALPHA
        return DEFAULT_ALPHA[self.scheme]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON types: choices as their strings, tuples as lists."""
        data = dataclasses.asdict(self)
        for name in CHOICE_FIELDS:
            data[name] = str(data[name])
        data["exclude"] = list(self.exclude)
        data["act16"] = list(self.act16)
        data["calib_mix"] = [str(d) for d in self.calib_mix]
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecipeError(f"unknown recipe field(s): {', '.join(unknown)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> Recipe:
        return cls.from_dict(json.loads(text))


def _number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return not isinstance(value, (str, bool))


# The fields whose values are a closed set, and the set.
CHOICE_FIELDS: dict[str, type[Choice]] = {
    "scheme": Scheme,
    "accuracy_level": AccuracyLevel,
    "lm_head_accuracy_level": AccuracyLevel,
    "linear_folds": LinearFolds,
    "alpha_search": AlphaSearch,
    "act": ActMode,
    "kernels": Kernels,
    "lm_head": LmHead,
    "format": Format,
    "embedding": EmbeddingBits,
}
