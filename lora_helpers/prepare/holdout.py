"""Held-out photos: a few usable photos kept out of training, so evaluation can score likeness
on a face the LoRA never saw (scores on training photos reward memorising them).

How many: none below 8 usable photos (a LoRA from 5-7 photos misses each one; the held-out
score is then not available), 1 from 8 to 11, 2 from 12 (:func:`auto_count`). A person can
set another number (``PrepareConfig.hold_out``, 0 for none) or override single photos:
"hold_out" keeps a photo out of training, "train" keeps it in (``overrides.json``, the
notebook's override widgets, ``--hold-out-photo`` / ``--train-photo``). Forced photos count
towards the number; at least one usable photo always stays in training.

Which ones: among usable photos with exactly one detected face and no verdict override (a
face the identity score can measure, in a photo the checks passed), those whose file
contents have the lowest SHA-256. The hash makes the choice the same on every run and every
machine, whatever the listing order or file names, and it is blind to quality, so the
held-out photo is a typical one rather than the best or the worst; adding a photo changes
the choice only where the new photo's hash ranks first.

Several people: the rule applies to each person's photos on their own (a number given is per
person), so each person can be scored on a face of theirs the LoRA never saw.
"""

from __future__ import annotations

from lora_helpers.core.fileio import sha256_file
from lora_helpers.prepare.records import PhotoRecord

__all__ = ["HOLD_OUT", "TRAIN", "MIN_PHOTOS", "TWO_FROM", "auto_count", "choose_held_out"]

HOLD_OUT, TRAIN = "hold_out", "train"  # per-photo override values
MIN_PHOTOS = 8  # usable photos needed before one is held out automatically
TWO_FROM = 12  # usable photos from which two are held out


def auto_count(usable: int) -> int:
    """How many photos to hold out of ``usable`` ones: 0 below 8, 1 from 8, 2 from 12."""
    return 0 if usable < MIN_PHOTOS else 1 if usable < TWO_FROM else 2


def _rank(rec: PhotoRecord) -> tuple[str, str]:
    try:
        digest = sha256_file(rec.path)
    except OSError:  # read a moment ago; if it is gone now, rank it by name alone
        digest = "~"
    return digest, rec.file


def _eligible(rec: PhotoRecord) -> bool:
    return rec.override is None and rec.faces == 1 and rec.face_clarity_score is not None


def choose_held_out(records: list[PhotoRecord], *, hold_out: int | None = None) -> str:
    """Mark the held-out photos (``rec.held_out``) among the accepted records, per person when there are several.

    Args:
        records: every record after :func:`lora_helpers.prepare.judge.finalise`; each record's
            ``override`` may be "hold_out" or "train" (or a verdict override).
        hold_out: None: :func:`auto_count`; 0: none but the forced ones; n: n photos (per person).

    Returns:
        The summary: which photos are held out, or why none is (a line per person when there are several).
    """
    for r in records:
        r.held_out = False
    subjects = list(dict.fromkeys(r.subject for r in records))
    if subjects == [None]:
        return _choose(records, hold_out)
    return "\n".join(f"{who}: {_choose([r for r in records if r.subject == who], hold_out)}"
                     for who in subjects if who is not None and any(r.subject == who and r.accepted for r in records))


def _choose(records: list[PhotoRecord], hold_out: int | None) -> str:
    usable = [r for r in records if r.accepted]
    for r in records:
        r.held_out = False
        if r.override == HOLD_OUT and not r.accepted:
            r.notes.append("hold-out override ignored: the photo is not used for training or scoring")
    forced = sorted((r for r in usable if r.override == HOLD_OUT), key=_rank)
    target = auto_count(len(usable)) if hold_out is None else hold_out
    pool = sorted((r for r in usable if _eligible(r)), key=_rank)
    chosen = (forced + pool)[:max(target, len(forced))]
    capped = len(chosen) >= len(usable) and len(usable) > 0
    chosen = chosen[:len(usable) - 1]  # training needs at least one photo
    for r in chosen:
        r.held_out = True
    if chosen:
        names = ", ".join(r.file for r in chosen)
        note = f" ({len(usable)} usable photos; at least one must stay in training)" if capped else ""
        return (f"held out for the likeness score, not trained on: {names}{note}; "
                "change with a 'hold_out' or 'train' override, or hold_out=0")
    if capped:
        return "held-out score not available: the only usable photo is needed for training"
    if hold_out == 0:
        return "no photo held out (hold_out=0): likeness can then be scored only on photos the LoRA trained on"
    if target == 0:
        return (f"held-out score not available: {len(usable)} usable photo{'s' if len(usable) != 1 else ''}, and "
                f"{MIN_PHOTOS} or more are needed to spare one from training; add photos, or hold one out by "
                "override to score on it anyway")
    return ("held-out score not available: no usable photo with exactly one clear face and no override "
            "to hold out; override one with 'hold_out'")
