"""Identity during training: a validation hook that scores the trainer's sample images."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image

from lora_helpers.core.fileio import write_json
from lora_helpers.evaluate.identity import ReferenceSet, identity_scores, identity_summary, reference_embeddings

__all__ = ["identity_validation_hook"]


def identity_validation_hook(
    references: ReferenceSet | str | Path | Sequence,
    *,
    backend: str = "dlib",
    threshold: float | None = None,
    write_scores: bool = True,
) -> Callable[[int, list[Image.Image], Path | None], dict]:
    """A validation hook for the trainer: identity of the validation images at each step.

    The references are embedded on the first call (not at construction), so creating the
    hook costs nothing when validation never runs.

    Args:
        references: the person's photos (dataset/, a folder, paths or a ReferenceSet).
        backend: face backend name.
        threshold: same-person cosine (None: the backend's).
        write_scores: also write ``identity-<step>.json`` (per-image scores) beside the
            validation grids: into ``samples/`` of the run folder the trainer passes.

    Returns:
        ``hook(step, images, folder) -> {"identity_mean", "identity_pass_rate",
        "faces_found", "unreadable", "identity_upper_bound"}`` with plain numbers, ready for log.jsonl;
        with a dataset that holds photos out of training also ``"identity_heldout_mean"``, and
        ``"memorised"``: how many images are near-copies of a training photo.
    """
    state: dict[str, ReferenceSet] = {}

    def hook(step: int, images: list[Image.Image], folder: Path | None = None) -> dict:
        if "refs" not in state:
            state["refs"] = reference_embeddings(references, backend=backend, threshold=threshold, progress=False)
        refs = state["refs"]
        scores = identity_scores(images, refs, progress=False)
        stats = identity_summary(scores)
        stats["identity_upper_bound"] = refs.upper_bound
        if write_scores and folder is not None:
            folder = Path(folder) / "samples" if (Path(folder) / "samples").is_dir() else Path(folder)
            write_json(folder / f"identity-{int(step):06d}.json",
                       {"step": int(step), **stats, "threshold": refs.threshold,
                        "images": [{"identity": round(s.similarity, 5), "passed": s.passed, "face_found": s.face_found,
                                    "identity_heldout": None if s.heldout_similarity is None
                                    else round(s.heldout_similarity, 5), "memorised": s.memorised}
                                   for s in scores]})
        return {k: v if isinstance(v, int) else None if math.isnan(v) else round(float(v), 5) for k, v in stats.items()}

    return hook
