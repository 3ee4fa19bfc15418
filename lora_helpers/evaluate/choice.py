"""Choosing the checkpoint and LoRA scale with the best mix of likeness and prompt adherence."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from lora_helpers.evaluate.summary import is_base, is_finite_number, summarize

__all__ = ["Choice", "best_checkpoint"]


@dataclass
class Choice:
    """The checkpoint and LoRA scale to use, and why."""

    checkpoint: str
    scale: float
    step: int | None
    score: float
    identity_mean: float
    identity_pass_rate: float
    clip_t_mean: float
    reason: str
    identity_heldout_mean: float = math.nan

    def __str__(self) -> str:
        return f"best: {self.checkpoint} at scale {self.scale:g} - {self.reason}"


def best_checkpoint(
    rows: Sequence[dict],
    *,
    identity_weight: float = 0.7,
    min_prompt_adherence: float | None = None,
    min_adherence_vs_base: float | None = 0.9,
    upper_bound: float | None = None,
) -> Choice:
    """Pick the checkpoint and scale with the best combined identity and prompt adherence.

    Identity and CLIP-T live on different scales (identity ~0.7-1.0, CLIP-T ~0.2-0.35),
    so each is put on the scale of the bounds before mixing them as
    ``w * identity_gain + (1 - w) * adherence_kept``:

    * ``identity_gain = (identity - base) / (upper - base)``: the share of the gap between
      the base model (scale 0) and the references' leave-one-out similarity that the LoRA
      closes (base 0 and upper 1 when unknown);
    * ``adherence_kept = clip_t / base_clip_t``: the share of the base model's prompt
      adherence kept (the best candidate's CLIP-T when there is no base model).

    Candidates below the CLIP-T floor are dropped first: a LoRA that draws the face
    whatever the prompt says has overfitted. So are candidates that drew a near-copy of a
    training photo (``memorised``), unless every candidate did. Where every candidate has
    a held-out identity (photos kept out of training), that is the identity compared: it
    measures the person, where similarity to the training photos also rewards copying
    them. The base model is never a candidate.

    Args:
        rows: per-image rows (as in scores.csv) or :func:`summarize` rows.
        identity_weight: weight ``w`` of identity (the goal) against prompt adherence.
        min_prompt_adherence: absolute CLIP-T floor.
        min_adherence_vs_base: floor as a share of the base model's CLIP-T.
        upper_bound: the references' leave-one-out similarity (ReferenceSet.upper_bound).

    Returns:
        A :class:`Choice`; its ``reason`` quotes the numbers.

    Raises:
        ValueError: when there is no LoRA candidate.
    """
    summary = list(rows) if rows and "identity_mean" in rows[0] else summarize(rows)
    base = next((s for s in summary if is_base(s)), None)
    # Images of unknown checkpoint and scale (no generation metadata) cannot be chosen.
    cands = [s for s in summary if not is_base(s) and s.get("scale") is not None]
    if not cands:
        raise ValueError("no LoRA checkpoint among the rows (only the base model); evaluate at a scale above 0")
    has_clip = any(is_finite_number(s["clip_t_mean"]) for s in cands)
    base_clip = base["clip_t_mean"] if base and is_finite_number(base["clip_t_mean"]) else None
    floors = []
    if has_clip and min_prompt_adherence is not None:
        floors.append((min_prompt_adherence, f"CLIP-T {min_prompt_adherence:.3f}"))
    if has_clip and min_adherence_vs_base is not None and base_clip is not None:
        floors.append((min_adherence_vs_base * base_clip, f"{min_adherence_vs_base:.0%} of the base model's CLIP-T {base_clip:.3f}"))
    notes = []
    pool = cands
    if floors:
        floor, why = max(floors)
        kept = [s for s in cands if is_finite_number(s["clip_t_mean"]) and s["clip_t_mean"] >= floor]
        notes.append(f"{len(cands) - len(kept)} of {len(cands)} dropped below {why}" if kept
                     else f"none reach {why}, so all were compared")
        pool = kept or cands
    originals = [s for s in pool if not s.get("memorised")]
    if len(originals) < len(pool):
        notes.append(f"{len(pool) - len(originals)} dropped for near-copies of training photos" if originals
                     else "every candidate drew a near-copy of a training photo")
        pool = originals or pool
    note = "".join(f"; {n}" for n in notes)
    heldout = all(is_finite_number(s.get("identity_heldout_mean")) for s in pool)
    key = "identity_heldout_mean" if heldout else "identity_mean"
    if heldout and base is not None and not is_finite_number(base.get(key)):
        base = {**base, key: base["identity_mean"]}

    lo = base[key] if base else 0.0
    hi = upper_bound if upper_bound is not None and is_finite_number(upper_bound) and upper_bound > lo else 1.0
    w = identity_weight if has_clip else 1.0
    ref_clip = base_clip or max((s["clip_t_mean"] for s in pool if is_finite_number(s["clip_t_mean"])), default=1.0)
    scores = []
    for s in pool:
        gain = (s[key] - lo) / max(hi - lo, 1e-6)
        kept_share = s["clip_t_mean"] / ref_clip if has_clip and is_finite_number(s["clip_t_mean"]) and ref_clip else 0.0
        scores.append(w * gain + (1 - w) * kept_share)
    k = max(range(len(pool)), key=lambda j: (scores[j], pool[j][key]))
    b = pool[k]
    parts = [f"{'held-out identity' if heldout else 'identity'} {b[key]:.3f}"
             + (f" vs {lo:.3f} for the base model" if base else "")
             + (f" (training photos {b['identity_mean']:.3f}, " if heldout else " (")
             + f"{b['identity_pass_rate']:.0%} pass)"]
    if has_clip:
        parts.append(f"CLIP-T {b['clip_t_mean']:.3f}" + (f" vs {base_clip:.3f}" if base_clip is not None else ""))
    reason = (f"highest combined score {scores[k]:.2f} (identity weight {w:g}) of {len(pool)} candidates: "
              + ", ".join(parts) + note)
    return Choice(checkpoint=str(b["checkpoint"]), scale=float(b["scale"]), step=b.get("step"), score=float(scores[k]),
                  identity_mean=b["identity_mean"], identity_pass_rate=b["identity_pass_rate"],
                  clip_t_mean=b["clip_t_mean"], reason=reason,
                  identity_heldout_mean=float(b.get("identity_heldout_mean", math.nan)))


