"""Every option of a conversion in one frozen dataclass; CLI flags map 1:1 onto its fields."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from sq_onnx.errors import RecipeError

SCHEMES = ("w4", "w8a8", "smooth")
ACT_MODES = ("per-token", "per-tensor", "static")
KERNELS = ("ort", "sq_onnx")
LM_HEAD_MODES = ("4", "8", "fp")
ALPHA_SEARCHES = ("none", "model", "layer")
CALIB_DOMAINS = ("docs", "code", "self")

# Default α per scheme. w8a8: the SmoothQuant paper's 0.5. w4: 0.4, the best of a sweep on SmolLM2
# (docs/EXPERIMENTS.md, "Choosing the W4 default α").
DEFAULT_ALPHA = {"w8a8": 0.5, "w4": 0.4, "smooth": 0.5}


@dataclass(frozen=True)
class Recipe:
    """What to do to a model. ``alpha=None`` means the scheme's default."""

    scheme: str = "w4"
    alpha: float | None = None
    alpha_search: str = "none"
    alpha_step: float = 0.1
    search_samples: int = 4
    search_rows: int = 512
    smooth: bool = True
    block_size: int = 128
    symmetric: bool = False
    # measured on SmolLM2 (docs/EXPERIMENTS.md): perplexity +27% -> +19% over fp32 at block 128
    clip_search: bool = True
    # W4: GPTQ error feedback (Hessians of each linear's input from calibration); on SmolLM2
    # perplexity +19% -> +8.4% over fp32 at block 128 (docs/EXPERIMENTS.md)
    gptq: bool = True
    # GPTQ's Hessians use this many calibration samples (more than the statistics need): fewer fit the
    # calibration text and generalise worse. 256 rather than 128 was chosen on the validation domains
    # (mean KL to fp32 0.139 -> 0.129) for about twice GPTQ's time (tools/RESULTS.md).
    gptq_samples: int = 256
    # GPTQ: each batch of linears gets the Hessian of its input with every earlier batch already
    # quantized (GPTQ's own sequential mode), computed segment by segment in about one forward pass.
    # Alone it changes nothing measurable on SmolLM2 (KL to fp32 on the whole held-out text 0.0811 ->
    # 0.0814 at 128 samples, 0.0781 -> 0.0792 at 256); the default gptq_asymmetric runs it anyway.
    gptq_sequential: bool = False
    # GPTQ: fit each layer to the float model's output from the input the quantized model gives it
    # (GPTAQ's asymmetric calibration; implies the sequential Hessians, with a float copy run beside them).
    # On SmolLM2 at 128 samples with 4 refine rounds, KL to fp32 on the whole held-out text 0.0753 ->
    # 0.0539 (perplexity +5.5% -> +3.7%) for about 80 s more (docs/EXPERIMENTS.md)
    gptq_asymmetric: bool = True
    # GPTQ: quantize the most active input channels first (grids fixed up front, same layout)
    act_order: bool = True
    # GPTQ: rounds of coordinate descent over the codes + least-squares block scales on the same layer
    # loss after GPTQ's single greedy pass (each round can only lower it). On SmolLM2 at 128 samples,
    # mean KL to fp32 on the whole held-out text 0.0811 -> 0.0753 with 4 rounds for ~70 s, while
    # 256 samples instead of 128 give 0.0781 for ~120-170 s (docs/EXPERIMENTS.md)
    gptq_refine: int = 4
    # GPTQ: dampening of H (fraction of mean(diag H)) in the error feedback and the refinement. More of it
    # pulls GPTQ towards round-to-nearest and generalises better to text unlike the calibration's: chosen on
    # the validation domains (tools/RESULTS.md, mean KL 0.150 at 0.01, 0.142 at 0.1, 0.139 at 0.3)
    gptq_damp: float = 0.3
    # GPTQ asymmetric target: ridge of the correction H⁻¹X_qᵀ(X_f − X_q)W, as a fraction of mean(diag H)
    gptq_target_ridge: float = 0.1
    # GPTQ: hold this many of the GPTQ samples out; each batch of linears keeps GPTQ's result only where it
    # beats round-to-nearest (clip search) on them (0 = off)
    gptq_holdout: int = 0
    accuracy_level: int = 0
    lm_head: str = "8"
    # ORT's 8-bit MatMulNBits at level 0 is ~5x slower than fp32 for decode on AVX2 CPUs; level 4
    # (int8 activations per block) is fast and measured lossless for the lm_head (docs/EXPERIMENTS.md).
    lm_head_accuracy_level: int = 4
    act: str = "per-token"
    # "ort": stock ONNX Runtime ops; "sq_onnx": the custom-op library (fused norm + quantize, CUDA kernels)
    kernels: str = "ort"
    exclude: tuple[str, ...] = field(default_factory=tuple)
    # Without --calib: the built-in domains calibration draws on, in turn (docs, code, the model's own
    # samples). One domain calibrates GPTQ to that domain only (tools/RESULTS.md, multi-domain table).
    calib_mix: tuple[str, ...] = ("docs", "code", "self")
    samples: int = 16
    seq_len: int = 256
    verify_samples: int = 2
    external_data: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "calib_mix", tuple(self.calib_mix))
        self.validate()

    def validate(self) -> None:
        """Raise RecipeError with one sentence for the first invalid field."""
        if self.scheme not in SCHEMES:
            raise RecipeError(f"unknown scheme {self.scheme!r}; choose one of {', '.join(SCHEMES)}.")
        if self.alpha is not None and not (0.0 <= float(self.alpha) <= 1.0):
            raise RecipeError(f"alpha must be between 0 and 1, got {self.alpha}.")
        if self.alpha_search not in ALPHA_SEARCHES:
            raise RecipeError(
                f"--alpha-search must be one of {', '.join(ALPHA_SEARCHES)}, got {self.alpha_search!r}."
            )
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
        for level in (self.accuracy_level, self.lm_head_accuracy_level):
            if level not in (0, 1, 2, 3, 4):
                raise RecipeError(f"accuracy level must be 0..4, got {level}.")
        if self.lm_head not in LM_HEAD_MODES:
            raise RecipeError(f"--lm-head must be one of {', '.join(LM_HEAD_MODES)}, got {self.lm_head!r}.")
        if self.act not in ACT_MODES:
            raise RecipeError(f"--act must be one of {', '.join(ACT_MODES)}, got {self.act!r}.")
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
        if self.kernels not in KERNELS:
            raise RecipeError(f"--kernels must be one of {', '.join(KERNELS)}, got {self.kernels!r}.")
        if self.kernels == "sq_onnx" and (self.scheme != "w8a8" or self.act != "per-token"):
            raise RecipeError("--kernels sq_onnx is for --scheme w8a8 with --act per-token.")
        if not self.calib_mix or set(self.calib_mix) - set(CALIB_DOMAINS):
            raise RecipeError(
                f"--calib-mix takes a comma-separated subset of {', '.join(CALIB_DOMAINS)}, "
                f"got {','.join(self.calib_mix) or 'nothing'}."
            )
        if self.samples < 1:
            raise RecipeError(f"samples must be at least 1, got {self.samples}.")
        if self.seq_len < 2:
            raise RecipeError(f"seq-len must be at least 2, got {self.seq_len}.")
        if self.verify_samples < 0:
            raise RecipeError(f"verify-samples must be >= 0, got {self.verify_samples}.")
        for pattern in self.exclude:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise RecipeError(
                    f"--exclude {pattern!r} is not a valid regular expression ({exc})."
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
    def effective_alpha(self) -> float:
        """The α actually used: the given one or the scheme's default."""
        return float(self.alpha) if self.alpha is not None else DEFAULT_ALPHA[self.scheme]

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["exclude"] = list(self.exclude)
        data["calib_mix"] = list(self.calib_mix)
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
