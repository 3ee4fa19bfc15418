"""Plots for the evaluation stage: identity likeness against prompt adherence.

matplotlib runs headless (Agg) and every figure is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lora_helpers.core.fileio import atomic_path
from lora_helpers.evaluate.summary import is_base, is_finite_number

__all__ = ["plot_identity_vs_prompt"]


def plot_identity_vs_prompt(
    summary: Sequence[dict],
    path: str | Path,
    *,
    upper_bound: float | None = None,
    threshold: float | None = None,
    choice=None,
) -> Path:
    """Identity mean (y) against CLIP-T (x): one panel per checkpoint, one per LoRA scale.

    Left, each checkpoint is a line through its scales (how far to turn the LoRA up);
    right, each scale is a line through the checkpoints in step order (when training
    starts to cost prompt adherence). The base model (scale 0) is a black star, the
    leave-one-out upper bound a dashed line, the same-person threshold a dotted one.

    Args:
        summary: rows from :func:`lora_helpers.evaluate.summary.summarize`.
        path: PNG file to write.
        upper_bound: leave-one-out similarity among the references.
        threshold: same-person cosine.
        choice: a :class:`lora_helpers.evaluate.choice.Choice` to ring.

    Returns:
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    # Images without a known LoRA scale (photos from elsewhere, mixed into a folder of generated
    # ones) have no place on a line through scales or checkpoints.
    rows = [s for s in summary if is_finite_number(s.get("identity_mean")) and s.get("scale") is not None]
    xs_known = any(is_finite_number(s.get("clip_t_mean")) for s in rows)
    x = (lambda s: s["clip_t_mean"]) if xs_known else (lambda s: s["scale"] or 0.0)
    base = [s for s in rows if is_base(s)]
    lora = [s for s in rows if s not in base]

    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True, constrained_layout=True)
    panels = [("per checkpoint (line through LoRA scales)", "checkpoint", "scale"),
              ("per LoRA scale (line through checkpoints)", "scale", "step")]
    for ax, (title, key, order) in zip(axes, panels):
        groups: dict = {}
        for s in lora:
            groups.setdefault(s.get(key), []).append(s)
        for name, grp in groups.items():
            grp = sorted(grp, key=lambda s: (s.get(order) if isinstance(s.get(order), (int, float)) else float("inf")))
            label = f"scale {name:g}" if key == "scale" else str(name)
            ax.plot([x(s) for s in grp], [s["identity_mean"] for s in grp], marker="o", label=label)
            for s in grp:
                tag = f"{s['scale']:g}" if key == "checkpoint" else str(s.get("checkpoint"))
                ax.annotate(tag, (x(s), s["identity_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for s in base:
            ax.plot([x(s)], [s["identity_mean"]], "k*", markersize=12, label="base model (lower bound)")
        if upper_bound is not None and is_finite_number(upper_bound):
            ax.axhline(upper_bound, color="grey", linestyle="--", label=f"references, leave-one-out {upper_bound:.3f}")
        if threshold is not None:
            ax.axhline(threshold, color="grey", linestyle=":", label=f"same-person threshold {threshold:.2f}")
        if choice is not None:
            for s in lora:
                if str(s.get("checkpoint")) == choice.checkpoint and s.get("scale") == choice.scale:
                    ax.plot([x(s)], [s["identity_mean"]], "o", markersize=16, markerfacecolor="none",
                            markeredgecolor="red", label="chosen")
        ax.set_title(title)
        ax.set_xlabel("prompt adherence: CLIP-T (identifier removed)" if xs_known else "LoRA scale")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0].set_ylabel("identity: cosine to mean reference face (no face = 0)")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path
