"""Plots for the evaluation stage: identity likeness against prompt adherence.

matplotlib runs headless (Agg) and every figure is written atomically.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lora_helpers.core.fileio import atomic_path
from lora_helpers.evaluate.summary import is_base, is_finite_number

__all__ = ["plot_identity_vs_prompt", "plot_comparison"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    plt = _pyplot()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


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
    starts to cost prompt adherence). Solid lines are identity against the training
    photos; where photos were held out of training, a dashed line of the same colour with
    hollow markers is identity against those (a LoRA that copies its training photos
    climbs on the solid line only). The base model (scale 0) is a black star, the
    leave-one-out upper bound a grey dashed line, the same-person threshold a dotted one.

    Args:
        summary: rows from :func:`lora_helpers.evaluate.summary.summarize`.
        path: PNG file to write.
        upper_bound: leave-one-out similarity among the references.
        threshold: same-person cosine.
        choice: a :class:`lora_helpers.evaluate.choice.Choice` to ring.

    Returns:
        ``path``.
    """
    plt = _pyplot()
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
            (line,) = ax.plot([x(s) for s in grp], [s["identity_mean"] for s in grp], marker="o", label=label)
            held = [s for s in grp if is_finite_number(s.get("identity_heldout_mean"))]
            if held:  # the same images against photos the model never saw: dashed, hollow, same colour
                ax.plot([x(s) for s in held], [s["identity_heldout_mean"] for s in held], linestyle="--", marker="o",
                        markerfacecolor="none", color=line.get_color())
            for s in grp:
                tag = f"{s['scale']:g}" if key == "checkpoint" else str(s.get("checkpoint"))
                ax.annotate(tag, (x(s), s["identity_mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        for s in base:
            ax.plot([x(s)], [s["identity_mean"]], "k*", markersize=12, label="base model (lower bound)")
            if is_finite_number(s.get("identity_heldout_mean")):
                ax.plot([x(s)], [s["identity_heldout_mean"]], "*", color="k", markerfacecolor="none", markersize=12)
        if any(is_finite_number(s.get("identity_heldout_mean")) for s in rows):
            ax.plot([], [], "k--", marker="o", markerfacecolor="none", label="dashed, hollow: vs held-out photos")
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
    return _save(fig, path)


def plot_comparison(rows: Sequence[dict], labels: Sequence[str], path: str | Path, *, all_prompts: str = "all") -> Path:
    """Runs side by side: one point per run for each prompt and over all prompts.

    Panels: identity against the training photos (the number of near-copies of a training
    photo written over a point where there are any), identity against the held-out photos,
    and prompt adherence (CLIP-T); a panel without numbers is left out.

    Args:
        rows: the comparison rows (``prompt_id``, ``run``, ``identity_mean``, ...).
        labels: the runs, in the order of their bars.
        path: PNG file to write.
        all_prompts: ``prompt_id`` of the rows over all prompts (drawn last).

    Returns:
        ``path``.
    """
    plt = _pyplot()
    prompts = list(dict.fromkeys(r["prompt_id"] for r in rows if r["prompt_id"] != all_prompts)) + [all_prompts]
    by = {(r["prompt_id"], r["run"]): r for r in rows}
    panels = [(key, title) for key, title in (("identity_mean", "identity vs training photos"),
                                              ("identity_heldout_mean", "identity vs held-out photos"),
                                              ("clip_t_mean", "prompt adherence (CLIP-T)"))
              if any(is_finite_number(r.get(key)) for r in rows)]
    panels = panels or [("identity_mean", "identity vs training photos")]
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 0.6 * len(prompts) + 2), 3.2 * len(panels)),
                             squeeze=False, constrained_layout=True)
    # Points, not bars: identities differ in the second decimal, which bars from 0 would hide.
    step = 0.5 / max(len(labels) - 1, 1)
    for ax, (key, title) in zip(axes[:, 0], panels):
        for j, label in enumerate(labels):
            xs = [i + (j - (len(labels) - 1) / 2) * step for i in range(len(prompts))]
            cells = [by.get((p, label), {}) for p in prompts]
            points = [(x, c) for x, c in zip(xs, cells) if is_finite_number(c.get(key))]
            at = by.get((all_prompts, label), {})
            legend = f"{label} ({at['checkpoint']}, scale {at['scale']:g})" if at.get("scale") is not None else label
            ax.plot([x for x, _ in points], [c[key] for _, c in points], "o", markersize=8, label=legend)
            if key == "identity_mean":
                for x, c in points:
                    if c.get("memorised"):
                        ax.annotate(f"{c['memorised']} copied", (x, c[key]), ha="center", fontsize=7, color="red",
                                    xytext=(0, 6), textcoords="offset points")
        ax.set_xticks(range(len(prompts)))
        ax.set_xticklabels(prompts, rotation=30, ha="right", fontsize=8)
        ax.set_xlim(-0.6, len(prompts) - 0.4)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)
