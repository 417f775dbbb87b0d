"""The report's figures as PNG bytes (matplotlib, Agg backend: no screen needed).

Each function takes plain report records (lists and dicts, as in report.json) so figures can be
re-drawn from a saved report.json without the model.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

MAX_LAYER_BARS = 40


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def group_figure(group: dict[str, Any]) -> bytes:
    """SmoothQuant's picture for one group: per-channel |X| and max|W| before and after, and s."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 2.8))
    channels = np.arange(len(group["act_absmax_before"]))
    panels = (
        ("activation abs-max per channel", "act_absmax_before", "act_absmax_after"),
        ("weight abs-max per input channel", "weight_absmax_before", "weight_absmax_after"),
    )
    for ax, (title, before, after) in zip(axes, panels, strict=False):
        ax.plot(channels, group[after], lw=0.7, color="tab:blue", alpha=0.8, label="after")
        ax.plot(channels, group[before], lw=0.7, color="tab:red", alpha=0.8, label="before")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("channel", fontsize=8)
        ax.legend(fontsize=7, loc="upper right")
    axes[2].plot(channels, group["scales"], lw=0.7, color="tab:green")
    axes[2].set_yscale("log")
    axes[2].set_title(f"smoothing scale s (α = {group['alpha']:.2f})", fontsize=9)
    axes[2].set_xlabel("channel", fontsize=8)
    for ax in axes:
        ax.tick_params(which="both", labelsize=7)
    fig.suptitle(f"{group['tensor']} ({group['kind']}) -> {', '.join(group['modules'])}", fontsize=9, y=1.04)
    return _png(fig)


def layers_figure(layers: list[dict[str, Any]]) -> bytes:
    """Relative output error per quantized layer, worst at the top (the first MAX_LAYER_BARS)."""
    plt = _pyplot()
    shown = layers[:MAX_LAYER_BARS]
    fig, ax = plt.subplots(figsize=(9, 0.6 + 0.22 * max(1, len(shown))))
    y = np.arange(len(shown))
    ax.barh(y, [layer["relative_error"] for layer in shown], color="tab:orange")
    ax.set_yticks(y, [layer["module"] for layer in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("relative output error on calibration rows", fontsize=8)
    title = "worst layers" if len(layers) > len(shown) else "all quantized layers"
    ax.set_title(f"{title} ({len(shown)} of {len(layers)})", fontsize=9)
    return _png(fig)


def alpha_figure(search: dict[str, Any]) -> bytes:
    """The α search: the model's loss per α (model search), or each group's error curve (layer search)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.2))
    if search["method"] == "model":
        alphas = [c["alpha"] for c in search["curve"]]
        losses = [c["loss"] for c in search["curve"]]
        ax.plot(alphas, losses, marker="o")
        best = int(np.argmin(losses))
        ax.plot([alphas[best]], [losses[best]], marker="*", markersize=14, color="tab:red", label="chosen")
        ax.set_ylabel(f"{search['loss']} on calibration samples", fontsize=8)
        ax.legend(fontsize=8)
    else:
        grid = search["grid"]
        for g in search["groups"]:
            curve = np.asarray(g["curve"], dtype=np.float64)
            ax.plot(grid, curve / max(curve.min(), 1e-30), lw=0.6, alpha=0.6)
        ax.set_yscale("log")
        ax.set_ylabel("group error / its minimum", fontsize=8)
    ax.set_xlabel("α", fontsize=8)
    ax.set_title(f"α search ({search['method']})", fontsize=9)
    return _png(fig)
