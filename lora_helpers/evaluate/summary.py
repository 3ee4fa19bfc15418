"""Summarising per-image scores by checkpoint and LoRA scale."""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np

__all__ = ["summarize", "unreadable_rows", "memorised_rows", "is_base", "is_finite_number", "rounded"]


def _nanmean(values) -> float:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Aggregate per-image rows by (checkpoint, scale).

    Unreadable images (rows with an ``error``) are left out of every average and counted
    in ``unreadable``; a group of unreadable images alone has nothing to average and gets
    no row (:func:`unreadable_rows` lists them all).

    Args:
        rows: per-image rows, as in ``scores.csv``.

    Returns:
        Rows with checkpoint, step, scale, images (scored), unreadable, faces_found (share),
        identity_mean (vs the training photos; no face counts 0), identity_heldout_mean (vs the
        held-out photos; NaN without them), identity_pass_rate, memorised (images that are
        near-copies of a training photo), clip_t_mean, clip_i_mean, diversity_mean; ordered by
        step, then scale.
    """
    groups: dict[tuple, list[dict]] = {}
    unreadable: dict[tuple, int] = {}
    for r in rows:
        key = (r.get("checkpoint"), r.get("scale"))
        if r.get("error"):
            unreadable[key] = unreadable.get(key, 0) + 1
        else:
            groups.setdefault(key, []).append(r)
    out = []
    for (ckpt, scale), rs in groups.items():
        out.append({
            "checkpoint": ckpt, "step": rs[0].get("step"), "scale": scale, "images": len(rs),
            "unreadable": unreadable.get((ckpt, scale), 0),
            "faces_found": sum(bool(r.get("face_found")) for r in rs) / len(rs),
            "identity_mean": _nanmean(r.get("identity") or 0.0 for r in rs),
            # A no-face image holds 0 here too; NaN without held-out photos (every cell empty).
            "identity_heldout_mean": _nanmean(r.get("identity_heldout") for r in rs),
            "identity_pass_rate": sum(bool(r.get("identity_pass")) for r in rs) / len(rs),
            "memorised": sum(bool(r.get("memorised")) for r in rs),
            "clip_t_mean": _nanmean(r.get("clip_t") for r in rs),
            "clip_i_mean": _nanmean(r.get("clip_i") for r in rs),
            "diversity_mean": _nanmean(r.get("diversity") for r in rs),
        })
    big = float("inf")
    return sorted(out, key=lambda s: (s["step"] if isinstance(s["step"], (int, float)) else big,
                                      str(s["checkpoint"]), s["scale"] if s["scale"] is not None else -1))


def unreadable_rows(rows: Sequence[dict]) -> list[dict]:
    """The images that could not be read: ``{"image", "error"}`` each, in order.

    Args:
        rows: per-image rows, as in ``scores.csv``.
    """
    return [{"image": r.get("image"), "error": r["error"]} for r in rows if r.get("error")]


def memorised_rows(rows: Sequence[dict]) -> list[dict]:
    """The images flagged as near-copies of a training photo, most similar first.

    Args:
        rows: per-image rows, as in ``scores.csv``.

    Returns:
        ``{"image", "nearest_training_photo", "copy_similarity"}`` each.
    """
    found = [{"image": r.get("image"), "nearest_training_photo": r.get("nearest_training_photo"),
              "copy_similarity": r.get("copy_similarity")} for r in rows if r.get("memorised")]
    return sorted(found, key=lambda r: -(r["copy_similarity"] or 0.0))


def is_finite_number(v) -> bool:
    """True for a real, finite number (not None, NaN, inf or a bool): a score that can be averaged or plotted."""
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def is_base(s: dict) -> bool:
    """True for a row of the base model without the LoRA (scale 0, or checkpoint "base").

    Args:
        s: a per-image or summary row.
    """
    return s.get("scale") in (0, 0.0) or s.get("checkpoint") == "base"



def rounded(v, digits: int = 5):
    """A float rounded for a table or JSON (NaN becomes None: an empty cell, valid JSON); other values as they are.

    Args:
        v: a value of a summary row.
        digits: decimals to keep.
    """
    if isinstance(v, float):
        return None if math.isnan(v) else round(v, digits)
    return v
