"""Several people in one LoRA: identity per person, leakage between them, and who appeared.

A multi-person dataset names each photo's person in ``metadata.jsonl``
(:data:`~lora_helpers.core.run_folder.SUBJECT_FIELD`); each person gets a
:class:`~lora_helpers.evaluate.identity.ReferenceSet` of their own (their training photos,
their held-out photos). An image prompted with one person is scored against that person's
references (``identity``) and, with the same face, against every other person's
(``leak_<slug>``, their maximum ``leakage``): a LoRA that blends identities draws faces that
score high on both. An image prompted with several people has every face embedded; faces
are assigned to people one to one (the assignment with the highest total similarity) and
``appeared_<slug>`` says whether that person's face is there (its similarity passes the
same-person threshold).
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from tqdm.auto import tqdm

from lora_helpers.core.images import ImageLoadError, list_images
from lora_helpers.core.run_folder import SUBJECTS_KEY, read_caption_config
from lora_helpers.evaluate.identity import ReferenceSet, dataset_subjects, reference_embeddings
from lora_helpers.evaluate.memorisation import COPY_THRESHOLD, CopyIndex
from lora_helpers.evaluate.metrics import as_image, default_threshold, face_backend, face_embeddings, unit
from lora_helpers.evaluate.summary import _nanmean

__all__ = ["SubjectReferences", "SubjectScore", "subject_references", "subject_scores", "subject_summary"]


@dataclass
class SubjectReferences:
    """The reference photos of each person of a multi-person run.

    Attributes:
        subjects: slug -> that person's :class:`ReferenceSet` (training and held-out photos).
        triggers: slug -> trigger phrase (``"TOK1 person"``); its first word is the identifier
            that names the person in a prompt.
        threshold: same-person cosine.
        backend: face backend name.
    """

    subjects: dict[str, ReferenceSet]
    triggers: dict[str, str] = field(default_factory=dict)
    threshold: float = 0.0
    backend: str = "dlib"

    @property
    def slugs(self) -> list[str]:
        """The people, in order."""
        return list(self.subjects)

    @property
    def upper_bound(self) -> float:
        """Mean of the people's leave-one-out bounds (NaN when none has two photos)."""
        bounds = [r.upper_bound for r in self.subjects.values() if not math.isnan(r.upper_bound)]
        return float(np.mean(bounds)) if bounds else float("nan")

    @property
    def names(self) -> list[str]:
        """Every reference photo with a face, as ``<slug>/<name>``."""
        return [f"{slug}/{n}" for slug, r in self.subjects.items() for n in r.names]

    @property
    def without_face(self) -> list[str]:
        """Reference photos where no face was found, as ``<slug>/<name>``."""
        return [f"{slug}/{n}" for slug, r in self.subjects.items() for n in r.without_face]

    @property
    def images(self) -> list:
        """Every reference image with a face (for CLIP-I of an image naming nobody)."""
        return [x for r in self.subjects.values() for x in r.images]

    @property
    def copies(self) -> CopyIndex | None:
        """Fingerprints of every person's training photos: one LoRA learned them all, so a copy of
        anyone's photo is memorised."""
        found = [(slug, r.copies) for slug, r in self.subjects.items() if r.copies is not None]
        if not found:
            return None
        return CopyIndex(names=[f"{slug}/{n}" for slug, c in found for n in c.names],
                         vectors=np.concatenate([c.vectors for _, c in found]), threshold=found[0][1].threshold)

    @property
    def identifiers(self) -> list[str]:
        """The word that names each person in a prompt (removed before CLIP-T)."""
        return [t.split()[0] for t in self.triggers.values() if t.split()]

    def named(self, prompt: str | None) -> tuple[str, ...]:
        """The people a prompt names (by their identifier, as a whole word), in order of ``slugs``."""
        if not prompt:
            return ()
        return tuple(slug for slug, t in self.triggers.items() if t.split() and re.search(
            rf"(?<![\w@]){re.escape(t.split()[0])}(?!\w)", prompt, flags=re.IGNORECASE))


def _sources(source) -> dict[str, object]:
    """slug -> what :func:`reference_embeddings` takes, from a dataset, a folder of folders or a mapping."""
    if isinstance(source, Mapping):
        return dict(source)
    people = dataset_subjects(source)
    if people:
        return {slug: slug for slug in people}  # embedded from the dataset with subject=slug
    folder = Path(source) if isinstance(source, (str, Path)) else None
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir() and list_images(p)) if folder and folder.is_dir() else []
    if folder is None or not folder.is_dir() or not subfolders or list_images(folder):
        raise ValueError(f"references {source!r} do not say whose photo is whose: give the prepared multi-person "
                         "dataset/ (metadata.jsonl rows with 'subject'), a folder with one subfolder per person, "
                         "or a dict {slug: photos}")
    return {p.name.lower(): p for p in subfolders}


def subject_references(
    source: str | Path | Mapping[str, object] | SubjectReferences,
    *,
    triggers: Mapping[str, str] | None = None,
    backend: str = "dlib",
    threshold: float | None = None,
    copy_threshold: float = COPY_THRESHOLD,
    progress: bool = True,
) -> SubjectReferences:
    """Embed each person's reference photos (training and held-out, as for one person).

    Args:
        source: a prepared multi-person ``dataset/`` (its rows grouped by ``subject``; held-out
            photos per person), a folder with one subfolder of photos per person (named by its
            slug), a dict slug -> photos (anything :func:`reference_embeddings` takes), or a
            SubjectReferences (returned with ``triggers`` added where given).
        triggers: slug -> trigger phrase; None: the dataset's ``caption_config.json``
            ``subjects`` where there is one (else prompts cannot be matched to people).
        backend: face backend name.
        threshold: same-person cosine; None takes the backend's own.
        copy_threshold: fingerprint correlation of a near-copy of a training photo.
        progress: show progress bars.

    Returns:
        A :class:`SubjectReferences`.

    Raises:
        ValueError: references that do not say whose photo is whose, a person without a face
            in any photo, or a trigger for a person the references lack (named).
    """
    if isinstance(source, SubjectReferences):
        refs = source
    else:
        threshold = threshold if threshold is not None else default_threshold(backend)
        dataset = source if dataset_subjects(source) else None
        subjects = {slug: reference_embeddings(dataset if dataset is not None else item, backend=backend,
                                               threshold=threshold, copy_threshold=copy_threshold,
                                               subject=slug if dataset is not None else None, progress=progress)
                    for slug, item in _sources(source).items()}
        recorded = read_caption_config(dataset).get(SUBJECTS_KEY) if dataset is not None else None
        found = {s: str(v.get("trigger")) for s, v in (recorded or {}).items() if isinstance(v, dict) and v.get("trigger")}
        refs = SubjectReferences(subjects=subjects, triggers=found, threshold=threshold, backend=backend)
    if triggers:
        missing = [s for s in triggers if s not in refs.subjects]
        if missing:
            raise ValueError(f"no reference photos of {', '.join(missing)} (the references hold {', '.join(refs.slugs)}); "
                             "pass the dataset the run was trained on")
        refs = SubjectReferences(subjects=refs.subjects, triggers=dict(triggers), threshold=refs.threshold,
                                 backend=refs.backend)
    return refs


@dataclass
class SubjectScore:
    """One image against every person.

    ``identity`` is the named person's similarity (the largest face; with several people named, the
    mean over them of their assigned face's similarity); 0.0 without a face, NaN when unreadable.
    ``similarity`` is the largest face against each person, ``assigned`` the face assigned to each
    person (0.0: none), ``appeared`` whether that face passes the threshold.
    """

    subjects: tuple[str, ...]
    identity: float
    passed: bool
    face_found: bool
    faces: int = 0
    error: str | None = None
    heldout_similarity: float | None = None
    similarity: dict[str, float] = field(default_factory=dict)
    assigned: dict[str, float] = field(default_factory=dict)
    appeared: dict[str, bool] = field(default_factory=dict)

    @property
    def leakage(self) -> dict[str, float]:
        """For an image of one person: its face's similarity to each other person ({} otherwise)."""
        if len(self.subjects) != 1:
            return {}
        return {s: v for s, v in self.similarity.items() if s not in self.subjects}


def _assign(sims: np.ndarray) -> dict[int, int]:
    """person -> face, one to one, with the highest total similarity (faces x people matrix)."""
    if sims.size == 0:
        return {}
    n_faces, n_people = sims.shape
    k = min(n_faces, n_people)
    # every one-to-one choice of k faces for k people: a handful of faces and people, so a few hundred at most
    best, best_total = {}, -math.inf
    for people in itertools.combinations(range(n_people), k):
        for faces in itertools.permutations(range(n_faces), k):
            total = float(sum(sims[f, p] for f, p in zip(faces, people)))
            if total > best_total:
                best, best_total = {p: f for f, p in zip(faces, people)}, total
    return best


def _score_one(vecs: list[np.ndarray], named: tuple[str, ...], refs: SubjectReferences) -> SubjectScore:
    slugs = refs.slugs
    units = [unit(v) for v in vecs]
    sims = np.array([[float(u @ refs.subjects[s].mean) for s in slugs] for u in units]).reshape(len(units), len(slugs))
    pick = _assign(sims)
    assigned = {s: (float(sims[pick[j], j]) if j in pick else 0.0) for j, s in enumerate(slugs)}
    score = SubjectScore(subjects=named, identity=0.0, passed=False, face_found=bool(vecs), faces=len(vecs),
                         similarity={s: float(sims[0, j]) if len(units) else 0.0 for j, s in enumerate(slugs)},
                         assigned=assigned, appeared={s: assigned[s] >= refs.threshold for s in slugs})
    if not named:
        return score
    if len(named) == 1:
        (only,) = named
        score.identity = score.similarity[only]
        score.passed = bool(vecs) and score.identity >= refs.threshold
        held = refs.subjects[only].held_out
        score.heldout_similarity = held.similarity(units[0] if units else None) if held is not None else None
        return score
    score.identity = float(np.mean([assigned[s] for s in named]))
    score.passed = all(score.appeared[s] for s in named)
    helds = [refs.subjects[s].held_out for s in named]
    if all(h is not None for h in helds):
        faces = {s: units[pick[slugs.index(s)]] if slugs.index(s) in pick else None for s in named}
        score.heldout_similarity = float(np.mean([h.similarity(faces[s]) for s, h in zip(named, helds)]))
    return score


def subject_scores(images: Sequence, references: SubjectReferences, *, named: Sequence[tuple[str, ...]],
                   progress: bool = True) -> list[SubjectScore]:
    """Score every face of each image against every person.

    Args:
        images: PIL images or paths; an unreadable file gets NaN with ``error`` naming it.
        references: from :func:`subject_references`.
        named: for each image, the people its prompt names (() when unknown: no identity, but who
            appeared is still measured).
        progress: show a progress bar.

    Returns:
        One :class:`SubjectScore` per image, in order.

    Raises:
        ValueError: a person named that the references lack.
    """
    unknown = sorted({s for n in named for s in n} - set(references.slugs))
    if unknown:
        raise ValueError(f"no reference photos of {', '.join(unknown)}; the references hold {', '.join(references.slugs)}")
    fb = face_backend(references.backend)
    out = []
    for item, who in tqdm(list(zip(images, named)), desc="identity per person", disable=not progress):
        try:
            image = as_image(item)
        except ImageLoadError as exc:
            out.append(SubjectScore(tuple(who), float("nan"), False, False, 0, str(exc)))
            continue
        out.append(_score_one(face_embeddings(image, fb), tuple(who), references))
    return out


def subject_summary(rows: Sequence[dict]) -> list[dict]:
    """Aggregate the rows of a multi-person evaluation by checkpoint, scale and the people prompted.

    Args:
        rows: per-image rows with ``subject`` (slugs joined by ``+``), as in ``scores.csv``;
            unreadable images (``error``) are left out.

    Returns:
        Rows with checkpoint, step, scale, subject, images, faces_found (share), identity_mean
        (no face counts 0), identity_heldout_mean, identity_pass_rate, leakage_mean (the face's
        highest similarity to another person; images of one person), appeared_rate (share of
        images where every person prompted appeared) and others_appeared_rate (share where a person
        not prompted appeared); in order of step, scale and subject.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if not r.get("error") and r.get("subject"):
            groups.setdefault((r.get("checkpoint"), r.get("scale"), r["subject"]), []).append(r)
    out = []
    for (ckpt, scale, subject), rs in groups.items():
        named = subject.split("+")
        others = sorted({k[len("appeared_"):] for r in rs for k in r if k.startswith("appeared_")} - set(named))
        out.append({
            "checkpoint": ckpt, "step": rs[0].get("step"), "scale": scale, "subject": subject, "images": len(rs),
            "faces_found": sum(bool(r.get("face_found")) for r in rs) / len(rs),
            "identity_mean": _nanmean(r.get("identity") or 0.0 for r in rs),
            "identity_heldout_mean": _nanmean(r.get("identity_heldout") for r in rs),
            "identity_pass_rate": sum(bool(r.get("identity_pass")) for r in rs) / len(rs),
            "leakage_mean": _nanmean(r.get("leakage") for r in rs),
            "appeared_rate": sum(all(r.get(f"appeared_{s}") for s in named) for r in rs) / len(rs),
            "others_appeared_rate": sum(any(r.get(f"appeared_{s}") for s in others) for r in rs) / len(rs),
        })
    big = float("inf")
    return sorted(out, key=lambda s: (s["step"] if isinstance(s["step"], (int, float)) else big, str(s["checkpoint"]),
                                      s["scale"] if s["scale"] is not None else -1, s["subject"].count("+"),
                                      s["subject"]))
