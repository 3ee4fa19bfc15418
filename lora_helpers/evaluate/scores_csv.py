"""``scores.csv`` and ``summary.csv``: writing score rows atomically and reading them back."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Sequence

from lora_helpers.core.fileio import write_text

__all__ = ["write_scores_csv", "read_scores_csv"]

_COLUMNS = ["checkpoint", "step", "scale", "category", "prompt_id", "prompt", "seed", "image", "face_found", "faces",
            "identity", "identity_heldout", "identity_pass", "nearest_training_photo", "copy_similarity", "memorised",
            "clip_t", "clip_i", "diversity", "error"]
_TEXT = ("prompt", "image", "checkpoint", "nearest_training_photo")  # kept as written, even when they look like numbers


def write_scores_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write score rows as CSV atomically (known columns first, then any others).

    Args:
        path: the CSV file.
        rows: dicts; None is written as an empty cell.

    Returns:
        ``path``.
    """
    extra = sorted({k for r in rows for k in r} - set(_COLUMNS))
    cols = [c for c in _COLUMNS if any(c in r for r in rows)] + extra
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return write_text(path, buf.getvalue())


def _parse(v: str):
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def read_scores_csv(path: str | Path) -> list[dict]:
    """Read a ``scores.csv`` back into rows with numbers and booleans restored.

    Args:
        path: a file written by :func:`write_scores_csv`.

    Returns:
        One dict per row; empty cells are None; prompt, image, checkpoint and
        nearest_training_photo stay text.
    """
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (v if k in _TEXT and v != "" else _parse(v)) for k, v in r.items()} for r in csv.DictReader(f)]
