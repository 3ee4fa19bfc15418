"""Identity during training: a validation hook that scores the trainer's sample images.

With several people in the dataset each image is scored against the person its prompt names
(the trainer passes the prompts), so the log shows each person's likeness and how much one
person's images look like another."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from lora_helpers.core.fileio import write_json
from lora_helpers.evaluate.identity import (ReferenceSet, dataset_subjects, identity_scores, identity_summary,
                                            reference_embeddings)
from lora_helpers.evaluate.subjects import SubjectReferences, SubjectScore, subject_references, subject_scores
from lora_helpers.evaluate.summary import rounded

__all__ = ["identity_validation_hook"]


def identity_validation_hook(
    references: ReferenceSet | str | Path | Sequence,
    *,
    backend: str = "dlib",
    threshold: float | None = None,
    write_scores: bool = True,
) -> Callable[..., dict]:
    """A validation hook for the trainer: identity of the validation images at each step.

    The references are embedded on the first call (not at construction), so creating the
    hook costs nothing when validation never runs.

    Args:
        references: the person's photos (dataset/, a folder, paths or a ReferenceSet); a
            multi-person dataset/ scores each person against their own photos.
        backend: face backend name.
        threshold: same-person cosine (None: the backend's).
        write_scores: also write ``identity-<step>.json`` (per-image scores) beside the
            validation grids: into ``samples/`` of the run folder the trainer passes.

    Returns:
        ``hook(step, images, folder, prompts=None) -> {"identity_mean", "identity_pass_rate",
        "faces_found", "unreadable", "identity_upper_bound"}`` with plain numbers, ready for log.jsonl;
        with a dataset that holds photos out of training also ``"identity_heldout_mean"``, and
        ``"memorised"``: how many images are near-copies of a training photo. With several people
        (a multi-person dataset) each image counts against the people its prompt names, and
        ``"identity_<slug>"`` (each person's images) and ``"leakage"`` (the mean similarity of a
        person's images to the others) are added.
    """
    state: dict[str, ReferenceSet | SubjectReferences] = {}

    def hook(step: int, images: list[Image.Image], folder: Path | None = None,
             prompts: Sequence[str] | None = None) -> dict:
        if "refs" not in state:
            state["refs"] = (subject_references(references, backend=backend, threshold=threshold, progress=False)
                             if dataset_subjects(references) else
                             reference_embeddings(references, backend=backend, threshold=threshold, progress=False))
        refs = state["refs"]
        if isinstance(refs, SubjectReferences):
            named = [refs.named(p) for p in prompts] if prompts is not None else [()] * len(images)
            people = subject_scores(images, refs, named=named, progress=False)
            stats = _people_summary(people, refs)
            per_image = [{"people": list(s.subjects), "identity": rounded(s.identity), "passed": s.passed,
                          "face_found": s.face_found, "identity_heldout": rounded(s.heldout_similarity),
                          "leakage": {k: rounded(v) for k, v in s.leakage.items()}} for s in people]
        else:
            scores = identity_scores(images, refs, progress=False)
            stats = identity_summary(scores)
            stats["identity_upper_bound"] = refs.upper_bound
            per_image = [{"identity": rounded(s.similarity), "passed": s.passed, "face_found": s.face_found,
                          "identity_heldout": rounded(s.heldout_similarity), "memorised": s.memorised}
                         for s in scores]
        if write_scores and folder is not None:
            folder = Path(folder) / "samples" if (Path(folder) / "samples").is_dir() else Path(folder)
            write_json(folder / f"identity-{int(step):06d}.json",
                       {"step": int(step), **stats, "threshold": refs.threshold, "images": per_image})
        return {k: v if isinstance(v, int) else None if math.isnan(v) else round(float(v), 5) for k, v in stats.items()}

    return hook


def _people_summary(scores: Sequence[SubjectScore], refs: SubjectReferences) -> dict[str, float]:
    """The one-person summary over images that name someone, plus each person's identity and the leakage."""
    readable = [s for s in scores if not s.error]
    scored = [s for s in readable if s.subjects]  # an image whose prompt names nobody has no identity
    nan = float("nan")
    out = {
        "identity_mean": float(np.mean([s.identity for s in scored])) if scored else nan,
        "identity_pass_rate": sum(s.passed for s in scored) / len(scored) if scored else nan,
        "faces_found": sum(s.face_found for s in readable) / len(readable) if readable else nan,
        "unreadable": len(scores) - len(readable),
        "identity_upper_bound": float(np.mean([r.upper_bound for r in refs.subjects.values()])),
    }
    held = [s.heldout_similarity for s in scored if s.heldout_similarity is not None]
    if held:
        out["identity_heldout_mean"] = float(np.mean(held))
    for slug in refs.slugs:
        own = [s.identity for s in scored if s.subjects == (slug,)]
        out[f"identity_{slug}"] = float(np.mean(own)) if own else nan
    leaks = [max(s.leakage.values()) for s in scored if s.leakage and s.face_found]
    out["leakage"] = float(np.mean(leaks)) if leaks else nan
    return out
