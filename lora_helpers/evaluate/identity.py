"""The person's reference photos, and the identity of generated images against them.

A prepared ``dataset/`` splits its photos in two (``metadata.jsonl``, field
:data:`~lora_helpers.core.run_folder.HELD_OUT_FIELD`): the training photos, and photos
held out of training. Scoring generated faces against the training photos rewards
copying them; a face the model never saw cannot be copied, so identity against the
held-out photos (the "R-FaceSim" idea of Meta-LoRA, arXiv 2503.22352) is reported beside
it. Each image is also matched with its nearest training photo to flag near-copies
(:mod:`lora_helpers.evaluate.memorisation`).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from lora_helpers.core.fileio import sha256_file
from lora_helpers.core.images import ImageLoadError, list_images
from lora_helpers.core.run_folder import HELD_OUT_FIELD, METADATA_FILE, read_metadata
from lora_helpers.evaluate.memorisation import COPY_THRESHOLD, CopyIndex, copy_index, fingerprint_pair
from lora_helpers.evaluate.metrics import as_image, default_threshold, face_backend, largest_face_embedding, unit
from lora_helpers.prepare.holdout import MIN_PHOTOS

__all__ = [
    "ReferenceSet",
    "reference_embeddings",
    "without_trained_photos",
    "IdentityScore",
    "identity_scores",
    "identity_summary",
]

@dataclass
class ReferenceSet:
    """Embeddings of the reference photos of the person.

    Attributes:
        names: reference images with a face, in order of ``embeddings``.
        embeddings: ``N x D`` unit-length face embeddings.
        mean: unit-length mean embedding: what generated faces are compared with.
        leave_one_out: each reference's similarity to the mean of the others.
        without_face: references where no face was found (not used).
        threshold: same-person cosine for this backend.
        backend: face backend name.
        images: the reference images with a face (paths or images), for CLIP-I.
        held_out: the photos held out of training, as a ReferenceSet of their own (None
            when there are none, or none with a face).
        held_out_note: why there is no held-out score ("" when there is one).
        copies: fingerprints of every training photo, for the memorisation flag.
    """

    names: list[str]
    embeddings: np.ndarray
    mean: np.ndarray
    leave_one_out: list[float]
    without_face: list[str]
    threshold: float
    backend: str
    images: list = field(default_factory=list, repr=False)
    held_out: ReferenceSet | None = None
    held_out_note: str = ""
    copies: CopyIndex | None = field(default=None, repr=False)

    @property
    def upper_bound(self) -> float:
        """Mean leave-one-out similarity: what a perfect likeness would score (NaN for one photo)."""
        return float(np.mean(self.leave_one_out)) if self.leave_one_out else float("nan")

    @property
    def held_out_upper_bound(self) -> float:
        """Mean similarity of the training photos to the held-out photos: what real photos of the
        person score on the held-out scale (NaN without held-out photos)."""
        if self.held_out is None:
            return float("nan")
        return float(np.mean(self.embeddings @ self.held_out.mean))

    def similarity(self, embedding: np.ndarray | None) -> float:
        """Cosine similarity of an embedding to the mean reference (0.0 for None: no face)."""
        if embedding is None:
            return 0.0
        return float(unit(np.asarray(embedding, dtype=np.float64)) @ self.mean)


def _split_references(source) -> tuple[list[tuple[str, Any]], list[tuple[str, Any]], str]:
    """(training photos, held-out photos, why none is held out) as ``(name, path or image)``."""
    dataset = False
    if isinstance(source, (str, Path)):
        folder = Path(source)
        if (folder / "images").is_dir():  # a prepared dataset/
            dataset = True
            if (folder / METADATA_FILE).is_file():
                rows = read_metadata(folder)
                items = [(Path(r["file_name"]).name, folder / r["file_name"], r.get(HELD_OUT_FIELD) is True)
                         for r in rows]
            else:
                items = [(p.name, p, False) for p in list_images(folder / "images")]
        else:
            items = [(p.name, p, False) for p in list_images(folder)]
    else:
        items = [(getattr(x, "name", f"image-{i:03d}"), x, False) for i, x in enumerate(source)]
    training = [(name, item) for name, item, held in items if not held]
    held_out = [(name, item) for name, item, held in items if held]
    note = ""
    if not held_out:
        what = "the dataset has" if dataset else "the references have"
        if len(items) < MIN_PHOTOS:  # the prepare stage's rule
            note = f"{what} {len(items)} usable photos; {MIN_PHOTOS} or more are needed to hold one out"
        elif dataset:
            note = ("no photo was held out (HOLD_OUT in 01_prepare_photos, or `prepare --hold-out`, keeps one "
                    "out of training; then train again)")
        else:
            note = "no photo was held out (only a prepared dataset/ marks held-out photos; pass it as the references)"
    return training, held_out, note


def _embed(items: list[tuple[str, Any]], fb, *, desc: str, progress: bool, fingerprints: bool):
    """(names, unit embeddings, images with a face, names without a face, (name, fingerprint pair) of every
    readable photo: made while the photo is loaded, so 12-MP originals are not kept in memory for it)."""
    names, vecs, images, without, readable = [], [], [], [], []
    for name, item in tqdm(items, desc=desc, disable=not progress):
        try:
            image = as_image(item)
        except ImageLoadError as exc:
            warnings.warn(f"reference skipped: {exc}")
            continue
        if fingerprints:
            readable.append((name, fingerprint_pair(image)))
        vec, _ = largest_face_embedding(image, fb)
        if vec is None:
            without.append(name)
            continue
        names.append(name)
        vecs.append(unit(vec))
        images.append(item)
    return names, vecs, images, without, readable


def _reference_set(names, vecs, images, without, threshold: float, backend: str) -> ReferenceSet:
    emb = np.stack(vecs)
    loo = []
    if len(emb) > 1:
        total = emb.sum(axis=0)
        loo = [float(unit(total - e) @ e) for e in emb]
    return ReferenceSet(names=names, embeddings=emb, mean=unit(emb.mean(axis=0)), leave_one_out=loo,
                        without_face=without, threshold=threshold, backend=backend, images=images)


def reference_embeddings(
    source: str | Path | Sequence | ReferenceSet,
    *,
    backend: str = "dlib",
    threshold: float | None = None,
    copy_threshold: float = COPY_THRESHOLD,
    progress: bool = True,
) -> ReferenceSet:
    """Embed the reference photos of the person and compute the leave-one-out upper bound.

    A prepared dataset's photos marked held out in ``metadata.jsonl`` become
    ``held_out``; the others are the training photos that identity is measured against
    and that generated images are checked for copies of.

    Args:
        source: a prepared ``dataset/`` folder (the photos its ``metadata.jsonl`` lists, or
            its ``images/``), a plain folder of photos, a list of paths or PIL images, or a
            ReferenceSet (returned as is).
        backend: face backend name (see :func:`lora_helpers.evaluate.metrics.face_backend`).
        threshold: same-person cosine; None takes the backend's own.
        copy_threshold: fingerprint correlation from which an image is a near-copy of a
            training photo (see :mod:`lora_helpers.evaluate.memorisation`).
        progress: show a progress bar.

    Returns:
        A :class:`ReferenceSet`.

    Raises:
        ValueError: when no training photo has a detectable face.
        RunFolderError: a ``metadata.jsonl`` line that cannot be read (named).
    """
    if isinstance(source, ReferenceSet):
        return source
    fb = face_backend(backend)
    threshold = threshold if threshold is not None else default_threshold(backend)
    training, held_out, note = _split_references(source)
    names, vecs, images, without, readable = _embed(training, fb, desc="reference faces", progress=progress,
                                                    fingerprints=True)
    if not vecs:
        raise ValueError(
            f"no face found in any reference image of {source!r}; pass the folder of original photos "
            "(faces at least ~80 px wide) with --references"
        )
    refs = _reference_set(names, vecs, images, without, threshold, backend)
    refs.copies = copy_index(readable, threshold=copy_threshold)
    if held_out:
        h = _embed(held_out, fb, desc="held-out faces", progress=progress, fingerprints=False)
        if h[1]:
            refs.held_out = _reference_set(*h[:4], threshold=threshold, backend=backend)
        else:
            note = f"no face found in the held-out photo(s) {', '.join(n for n, _ in held_out)}"
    refs.held_out_note = note
    return refs


def without_trained_photos(refs: ReferenceSet, trained_sha256: set[str]) -> ReferenceSet:
    """``refs`` without the held-out photos that a run did train on.

    A dataset prepared again after training may mark a photo held out that the run saw;
    scored as "held out" it would reward memory again. The run's ``config.json`` lists the
    SHA-256 of every image it trained on, and held-out photos with one of those are dropped.

    Args:
        refs: from :func:`reference_embeddings`.
        trained_sha256: SHA-256 of the image files the run trained on (empty: unknown, keep all).

    Returns:
        ``refs`` itself when nothing changes, else a copy whose ``held_out`` lacks those
        photos (None, with ``held_out_note`` saying why, when none is left).
    """
    held = refs.held_out
    if held is None or not trained_sha256:
        return refs
    seen = [i for i, item in enumerate(held.images) if isinstance(item, (str, Path)) and Path(item).is_file()
            and sha256_file(item) in trained_sha256]
    if not seen:
        return refs
    names = ", ".join(held.names[i] for i in seen)
    keep = [i for i in range(len(held.names)) if i not in seen]
    if not keep:
        return replace(refs, held_out=None, held_out_note=f"this run trained on the held-out photo(s) {names} "
                       "(the dataset was prepared again after training); train again to score on them")
    warnings.warn(f"held-out photo(s) {names} left out of the held-out score: this run trained on them")
    return replace(refs, held_out=_reference_set([held.names[i] for i in keep], [held.embeddings[i] for i in keep],
                                                 [held.images[i] for i in keep], held.without_face,
                                                 threshold=held.threshold, backend=held.backend))


@dataclass
class IdentityScore:
    """Identity of one image: ``similarity`` is 0.0 when no face was found, NaN when the file is
    unreadable (``error`` says why): a broken file says nothing about the LoRA, so it is not a "no face".

    ``heldout_similarity`` is the same against the held-out photos (None without them);
    ``nearest_photo``, ``copy_similarity`` and ``memorised`` come from the memorisation check
    (None when the references have no fingerprints or the file is unreadable).
    """

    similarity: float
    passed: bool
    face_found: bool
    faces: int = 0
    error: str | None = None
    heldout_similarity: float | None = None
    nearest_photo: str | None = None
    copy_similarity: float | None = None
    memorised: bool | None = None


def identity_scores(images: Sequence, references: ReferenceSet, *, progress: bool = True) -> list[IdentityScore]:
    """Score the largest face of each image against the mean training and held-out embeddings,
    and match the image with its nearest training photo.

    Args:
        images: PIL images or paths; an unreadable file gets NaN with ``error`` naming it.
        references: from :func:`reference_embeddings`.
        progress: show a progress bar.

    Returns:
        One :class:`IdentityScore` per image, in order.
    """
    fb = face_backend(references.backend)
    out = []
    for item in tqdm(images, desc="identity", disable=not progress):
        try:
            image = as_image(item)
        except ImageLoadError as exc:
            out.append(IdentityScore(float("nan"), False, False, 0, str(exc)))
            continue
        vec, n = largest_face_embedding(image, fb)  # once: detection is the slow part
        sim = references.similarity(vec)
        score = IdentityScore(sim, vec is not None and sim >= references.threshold, vec is not None, n)
        if references.held_out is not None:
            score.heldout_similarity = references.held_out.similarity(vec)
        if references.copies is not None and references.copies.names:
            match = references.copies.match(image)
            score.nearest_photo, score.copy_similarity, score.memorised = match.photo, match.similarity, match.memorised
        out.append(score)
    return out


def identity_summary(scores: Sequence[IdentityScore]) -> dict[str, float]:
    """``identity_mean`` (no-face images count as 0), ``identity_pass_rate``, ``faces_found`` (share),
    over the readable images; ``unreadable`` counts the others, which are left out of every average.
    With held-out photos, ``identity_heldout_mean`` too; with fingerprints, ``memorised`` (a count)."""
    readable = [s for s in scores if not s.error]
    n = len(readable)
    if n == 0:
        return {"identity_mean": float("nan"), "identity_pass_rate": float("nan"), "faces_found": float("nan"),
                "unreadable": len(scores)}
    out = {
        "identity_mean": float(np.mean([s.similarity for s in readable])),
        "identity_pass_rate": sum(s.passed for s in readable) / n,
        "faces_found": sum(s.face_found for s in readable) / n,
        "unreadable": len(scores) - n,
    }
    if any(s.heldout_similarity is not None for s in readable):
        out["identity_heldout_mean"] = float(np.mean([s.heldout_similarity or 0.0 for s in readable]))
    if any(s.memorised is not None for s in readable):
        out["memorised"] = sum(bool(s.memorised) for s in readable)
    return out
