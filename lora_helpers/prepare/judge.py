"""Checks that need the whole photo set, and the verdict each photo ends with.

Run after every photo has been measured (:func:`lora_helpers.prepare.photo.process_photo`):
sharpness against the set's median and the face clarity score, near-duplicates, and
identity outliers (a friend's photo mixed in). :func:`finalise` then turns each record's
issues and override into its verdict and reasons.
"""

from __future__ import annotations

import math

import numpy as np

from lora_helpers.prepare import quality
from lora_helpers.prepare.config import PrepareConfig
from lora_helpers.prepare.faces import SAME_PERSON_COSINE, cosine_similarity
from lora_helpers.prepare.records import PhotoRecord

__all__ = ["judge_set", "finalise"]


def judge_set(records: list[PhotoRecord], config: PrepareConfig) -> None:
    """Add the set-level findings to the records, in place.

    Args:
        records: every input file's record, in input order, as
            :func:`lora_helpers.prepare.photo.process_photo` left them.
        config: the stage's settings (relative sharpness, clarity, duplicate and identity limits).
    """
    _score_faces(records, config)
    _skip_duplicates(records, config)
    _check_identity(records, config)


def _rejected(r: PhotoRecord) -> bool:
    return any(level == "reject" for level, _ in r.issues)


def _score_faces(records: list[PhotoRecord], config: PrepareConfig) -> None:
    """Sharpness against the set, the 0..1 scores and the face clarity score."""
    # A photo far softer than the others is out of focus.
    with_face = [r for r in records if "sharpness" in r.measures]
    median = float(np.median([r.measures["sharpness"] for r in with_face])) if len(with_face) >= 3 else None
    for r in with_face:
        m = r.measures
        rel = m["sharpness"] / median if median else None
        m["sharpness_rel"] = rel
        if rel is not None and m["sharpness"] >= config.min_sharpness:
            if rel < config.min_relative_sharpness:
                r.add("reject", f"face much softer than the other photos ({rel:.0%} of their median sharpness)")
            elif rel < config.warn_relative_sharpness:
                r.add("warn", f"face softer than the other photos ({rel:.0%} of their median sharpness)")
        b = config.brightness_limits
        scores = {
            "sharpness": quality.ramp(m["sharpness"], config.min_sharpness / 8, config.min_sharpness, config.good_sharpness, log=True),
            "relative_sharpness": 1.0 if rel is None else quality.ramp(rel, 0.05, config.min_relative_sharpness, config.warn_relative_sharpness * 1.2),
            "face_size": quality.ramp(m["face_px"], config.min_face_px / 4, config.min_face_px, config.good_face_px, log=True),
            "exposure": min(quality.ramp(m["brightness"], 0.0, b[0], b[1]), quality.ramp(m["brightness"], 255.0, b[3], b[2])),
            "clipping": quality.ramp(m["clipped"], 0.6, config.clipped_limits[1], config.clipped_limits[0]),
        }
        r.scores = {k: round(v, 4) for k, v in scores.items()}
        limiting = min(scores, key=scores.get)
        r.face_clarity_score = round(min(scores.values()), 4)
        r.measures["limited_by"] = limiting if r.face_clarity_score < 1.0 else None
        if r.face_clarity_score < config.clarity_pass and not _rejected(r):
            r.add("reject", f"face clarity {r.face_clarity_score:.2f} is below {config.clarity_pass:.2f} (limited by {limiting.replace('_', ' ')})")


def _skip_duplicates(records: list[PhotoRecord], config: PrepareConfig) -> None:
    """Near-duplicates among usable photos: keep the sharper (then the larger) one."""
    usable = [r for r in records if r.phash is not None and not _rejected(r) and not any(l == "skip" for l, _ in r.issues)]
    for i, a in enumerate(usable):
        if a.duplicate_of:
            continue
        group = [a]
        for b in usable[i + 1:]:
            if b.duplicate_of or quality.hash_distance(a.phash, b.phash) > config.duplicate_distance:
                continue
            aspect_a = a.original_size[0] / a.original_size[1]
            aspect_b = b.original_size[0] / b.original_size[1]
            same_face = a.embedding is None or b.embedding is None or cosine_similarity(a.embedding, b.embedding) >= SAME_PERSON_COSINE
            if abs(math.log(aspect_a / aspect_b)) < 0.1 and same_face:
                group.append(b)
        if len(group) < 2:
            continue
        best = max(group, key=lambda r: r.measures.get("sharpness", 0.0))
        # Sharpness within 10 % is noise (recompression adds edges): prefer more pixels.
        close = [r for r in group if r.measures.get("sharpness", 0.0) >= 0.9 * best.measures.get("sharpness", 0.0)]
        keep = max(close, key=lambda r: (r.original_size[0] * r.original_size[1], r.measures.get("sharpness", 0.0)))
        why = "sharper" if len(close) == 1 else "larger"
        for r in group:
            if r is not keep:
                r.duplicate_of = keep.file
                r.add("skip", f"near-duplicate of {keep.file}; keeping that one ({why})")


def _check_identity(records: list[PhotoRecord], config: PrepareConfig) -> None:
    """Identity: a face far from its person's other photos is probably someone else.

    With several people each is checked against their own photos only: another person's
    photos are no evidence about this one.
    """
    for subject in dict.fromkeys(r.subject for r in records):
        _check_one_person([r for r in records if r.subject == subject], config, subject)


def _check_one_person(records: list[PhotoRecord], config: PrepareConfig, subject: str | None) -> None:
    threshold = config.identity_threshold or SAME_PERSON_COSINE
    rest = f"{subject}'s other photos" if subject else "the rest of the set"
    counted = [r for r in records if r.embedding is not None and not _rejected(r) and not r.duplicate_of]
    others = [r for r in records if r.embedding is not None and r not in counted]
    people = counted
    if len(people) >= 2:
        sims = np.array([[cosine_similarity(a.embedding, b.embedding) for b in people] for a in people])
        same = sims >= threshold
        anchor = max(range(len(people)), key=lambda i: (same[i].sum(), sims[i].sum()))
        group = [j for j in range(len(people)) if same[anchor, j]]
        clear_majority = len(group) > len(people) / 2
        for i, r in enumerate(people):
            ref = [j for j in group if j != i]
            r.measures["identity_similarity"] = float(np.median(sims[i, ref])) if ref else 1.0
            if not clear_majority and len(group) < len(people):
                # No majority (e.g. two photos of two people): which one is wrong is unknowable.
                r.add("warn", f"the photos{f' of {subject}' if subject else ''} do not agree on one person; check "
                              "that they all show the same person")
            elif i not in group:
                r.add("reject", f"looks like a different person from {rest} (similarity {r.measures['identity_similarity']:.2f}; same person >= {threshold:.2f})")
        for r in others:
            r.measures["identity_similarity"] = float(np.median([cosine_similarity(r.embedding, people[j].embedding) for j in group]))


def finalise(rec: PhotoRecord) -> None:
    """Set the record's verdict and reasons from its issues and its override.

    The worst level wins (reject, then skip, then warn, else pass); the reasons list the
    issues in that order. An "accept" override turns a reject or skip into a warn when
    there is a rendered crop to use.

    Args:
        rec: a record after :func:`judge_set`; changed in place.
    """
    levels = [level for level, _ in rec.issues]
    verdict = "reject" if "reject" in levels else "skip" if "skip" in levels else "warn" if "warn" in levels else "pass"
    order = {"reject": 0, "skip": 1, "warn": 2}
    reasons = [text for _, text in sorted(rec.issues, key=lambda it: order[it[0]])]
    if rec.override == "reject":
        verdict, reasons = "reject", ["rejected by override"] + reasons
    elif rec.override == "accept" and verdict in ("reject", "skip"):
        if rec.rendered is not None:
            verdict, reasons = "warn", ["accepted by override"] + reasons
        else:
            reasons = ["override ignored: there is no picture to crop"] + reasons
    rec.verdict, rec.reasons = verdict, reasons
