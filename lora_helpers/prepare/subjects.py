"""Several people in one dataset: whose photo each one is, from subfolders or by face.

``PrepareConfig.subjects`` says how photos are told apart:

* ``"one"``: one person (every photo is theirs), as a dataset has always been.
* ``"folders"``: one subfolder per person (``photos/ada/*.jpg``, ``photos/grace/*.jpg``); the
  person's name (a lowercase slug, ``"ada"``) comes from the folder. Photos lying in the photo
  folder itself are rejected with a message to move them into a person's folder.
* ``"group"``: one mixed folder, grouped by face: the 128-d identity embeddings prepare already
  computes are joined by average-linkage clustering, two groups merging while their mean cosine
  similarity is at least the same-person limit (:data:`~lora_helpers.prepare.faces.SAME_PERSON_COSINE`,
  dlib's distance 0.6). Average linkage, unlike chaining single pairs, does not let one
  in-between photo join two people. Groups are named ``person_1``, ``person_2``, ... in the order
  of their first photo; ties break by input order, so runs repeat.
* ``"auto"`` (the default): ``"folders"`` when the photo folder holds no photos of its own but
  subfolders with photos, else ``"one"``, exactly as before.

People correct the result in ``subjects.json`` beside ``overrides.json`` (the notebook's widgets
write it): ``{"photos": {"IMG_7.jpg": "grace"}, "names": {"person_1": "ada"}}``. ``"photos"`` moves
a photo to a person (a new name makes a new person); ``"names"`` renames a group, keyed by its
automatic name or by any photo in it (the key that survives photos being added); giving two
groups the same name merges them. Fewer than two people among the used photos makes a one-person
dataset (no ``"subject"`` in ``metadata.jsonl``), with a message.

The crops stay in ``images/`` whoever they show; each ``metadata.jsonl`` row names its person under
``"subject"`` (:data:`~lora_helpers.core.run_folder.SUBJECT_FIELD`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from lora_helpers.core import fileio
from lora_helpers.core.images import list_images
from lora_helpers.prepare.faces import cosine_similarity
from lora_helpers.prepare.records import PhotoRecord

__all__ = [
    "SUBJECT_MODES",
    "SUBJECTS_FILE",
    "LOOSE_PHOTO",
    "subject_slug",
    "read_subject_overrides",
    "write_subject_overrides",
    "find_photos",
    "group_faces",
    "assign_subjects",
    "merge_subject_overrides",
    "settle_subjects",
]

SUBJECT_MODES = ("auto", "one", "folders", "group")
SUBJECTS_FILE = "subjects.json"
# The subject of a photo lying in the photo folder itself while photos are sorted by subfolder.
LOOSE_PHOTO = ""


def subject_slug(name: str) -> str:
    """The subject name used in files: lowercase letters, digits and ``_`` ("Grace Hopper" -> "grace_hopper")."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).strip().lower()).strip("_")


def _checked(data, where: str) -> dict[str, dict[str, str]]:
    if not isinstance(data, dict) or not set(data) <= {"photos", "names"}:
        raise ValueError(f'{where}: expected {{"photos": {{file: person}}, "names": {{group or file: new name}}}}')
    out = {}
    for key in ("photos", "names"):
        part = data.get(key) or {}
        if not isinstance(part, dict):
            raise ValueError(f"{where}: {key!r} must map names to a person's name, got {type(part).__name__}")
        clean = {}
        for name, value in part.items():
            if value is None or not str(value).strip() or str(value).strip().lower() == "auto":
                continue  # cleared in the widget: back to the automatic choice
            slug = subject_slug(value)
            if not slug:
                raise ValueError(f"{where}: the person's name {value!r} for {name!r} has no letters or digits; "
                                 "use a name such as 'ada'")
            clean[str(name)] = slug
        out[key] = clean
    return out


def read_subject_overrides(out_dir: str | os.PathLike) -> dict[str, dict[str, str]]:
    """Subject corrections saved in ``out_dir/subjects.json``.

    Args:
        out_dir: the dataset folder.

    Returns:
        ``{"photos": {file: person}, "names": {group or file: name}}`` (both empty without the file).

    Raises:
        ValueError: the file is not valid JSON or not of that shape (named).
    """
    path = Path(out_dir) / SUBJECTS_FILE
    if not path.exists():
        return {"photos": {}, "names": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}); fix or delete the file") from exc
    return _checked(data, str(path))


def write_subject_overrides(out_dir: str | os.PathLike, *, photos: dict[str, str] | None = None,
                            names: dict[str, str] | None = None) -> Path:
    """Save subject corrections for the next run, replacing earlier ones.

    Args:
        out_dir: the dataset folder.
        photos: ``{file name: person}``: whose photo it is ("" or "auto" drops a file's entry).
        names: ``{automatic group name or a photo in the group: new name}``.

    Returns:
        The path of ``subjects.json``.
    """
    clean = _checked({"photos": photos or {}, "names": names or {}}, "subject overrides")
    return fileio.write_json(Path(out_dir) / SUBJECTS_FILE, {k: dict(sorted(v.items())) for k, v in clean.items()})


def merge_subject_overrides(saved: dict, given: dict | None) -> dict[str, dict[str, str]]:
    """``given`` (a ``prepare_photos`` argument) over ``saved`` (``subjects.json``), part by part."""
    given = _checked(given or {}, "subject_overrides")
    return {key: {**saved.get(key, {}), **given[key]} for key in ("photos", "names")}


def find_photos(photos, mode: str) -> tuple[list[Path], dict[Path, str] | None, str, list[str]]:
    """The files to look at, and the person of each when subfolders say so.

    Args:
        photos: a folder, or a list of photo files (with ``"folders"`` their parent folder names the person).
        mode: one of :data:`SUBJECT_MODES`.

    Returns:
        ``(files, folder subject of each file or None, the mode used, notes)``; a file lying in the
        photo folder itself in folder mode has the subject :data:`LOOSE_PHOTO`.

    Raises:
        FileNotFoundError: a folder or listed file does not exist.
        ValueError: an unknown mode, or two subfolders whose names give the same person's name.
    """
    if mode not in SUBJECT_MODES:
        raise ValueError(f"subjects must be one of {', '.join(SUBJECT_MODES)}, got {mode!r}")
    if not isinstance(photos, (str, os.PathLike)):
        files = [Path(p) for p in photos]
        for p in files:
            if not p.is_file():
                raise FileNotFoundError(f"photo not found: {p}")
        if mode != "folders":
            return files, None, "one" if mode == "auto" else mode, []
        return files, {p: _folder_slug(p.parent) for p in files}, mode, []
    folder = Path(photos)
    loose = list_images(folder, include_all_files=True)
    subfolders = [d for d in sorted(folder.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    with_photos = [d for d in subfolders if list_images(d)]
    if mode == "auto":
        mode = "folders" if with_photos and not list_images(folder) else "one"
        if mode == "one" and with_photos:
            names = ", ".join(f"{d.name}/" for d in with_photos)
            return loose, None, mode, [f"the subfolders {names} were not read: for several people put every photo "
                                       "in a subfolder per person (or set subjects='folders')"]
    if mode != "folders":
        return loose, None, mode, []
    seen: dict[str, Path] = {}
    for d in with_photos:
        slug = _folder_slug(d)
        if slug in seen:
            raise ValueError(f"the photo folders {seen[slug]} and {d} both give the person's name {slug!r}; rename one")
        seen[slug] = d
    subject_of = {p: LOOSE_PHOTO for p in loose}
    for slug, d in seen.items():
        subject_of.update({p: slug for p in list_images(d, include_all_files=True)})
    return list(subject_of), subject_of, mode, []


def _folder_slug(folder: Path) -> str:
    slug = subject_slug(folder.name)
    if not slug:
        raise ValueError(f"the photo folder {folder} gives no person's name (no letters or digits); rename it, "
                         "e.g. to the person's first name")
    return slug


def group_faces(embeddings: list[np.ndarray], *, threshold: float) -> list[list[int]]:
    """Group face embeddings by person: average-linkage clustering with a same-person limit.

    Args:
        embeddings: one identity embedding per photo.
        threshold: two groups join while the mean cosine similarity between their members is at least this.

    Returns:
        Groups of indexes into ``embeddings``, each sorted, ordered by their first index.
    """
    n = len(embeddings)
    sims = np.array([[cosine_similarity(a, b) for b in embeddings] for a in embeddings]).reshape(n, n)
    groups = [[i] for i in range(n)]
    while len(groups) > 1:
        best = None
        for a in range(len(groups)):
            for b in range(a + 1, len(groups)):
                mean = float(sims[np.ix_(groups[a], groups[b])].mean())
                if mean >= threshold and (best is None or mean > best[0]):
                    best = (mean, a, b)
        if best is None:
            break
        _, a, b = best
        groups[a] = sorted(groups[a] + groups.pop(b))
    return sorted(groups, key=lambda g: g[0])


def assign_subjects(records: list[PhotoRecord], *, mode: str, folder_subjects: dict[str, str] | None,
                    overrides: dict[str, dict[str, str]], threshold: float) -> list[str]:
    """Set each record's ``subject`` (None for a one-person dataset), before the set-level checks.

    Args:
        records: every input file's record, in input order.
        mode: the mode used ("one", "folders" or "group"; see :func:`find_photos`).
        folder_subjects: record file name -> person from its folder (``"folders"``).
        overrides: ``{"photos": {file: person}, "names": {group or file: name}}``.
        threshold: the same-person cosine similarity for ``"group"``.

    Returns:
        Messages for the person (the groups found, ...).
    """
    for r in records:
        r.subject = None
    if mode == "one":
        return []
    if mode == "folders":
        for r in records:
            r.subject = (folder_subjects or {}).get(r.file)
            if r.subject == LOOSE_PHOTO:
                r.subject = None
                r.add("reject", "lies in the photo folder itself, not in a person's subfolder: move it into the "
                                "folder of the person it shows")
    else:
        faces = [r for r in records if r.embedding is not None]
        groups = group_faces([r.embedding for r in faces], threshold=threshold)
        names = overrides.get("names", {})
        for n, group in enumerate(groups, 1):
            members = [faces[i] for i in group]
            auto = f"person_{n}"
            # A rename keyed by a photo wins over one keyed by the automatic name (numbers can shift).
            name = next((names[m.file] for m in members if m.file in names), names.get(auto, auto))
            for m in members:
                m.subject = name
    for r in records:
        chosen = overrides.get("photos", {}).get(r.file) or overrides.get("photos", {}).get(r.path.name)
        if chosen:
            r.subject = chosen
            r.notes.append(f"person set by override: {chosen}")
    people = sorted({r.subject for r in records if r.subject})
    if not people:
        return []
    counts = {p: sum(r.subject == p for r in records) for p in people}
    return [f"{len(people)} people: " + ", ".join(f"{p} ({counts[p]} photo{'s' if counts[p] != 1 else ''})"
                                                  for p in people)]


def settle_subjects(records: list[PhotoRecord]) -> list[str]:
    """After the verdicts: drop the subjects when fewer than two people are used; name used photos without one.

    Args:
        records: the judged and finalised records.

    Returns:
        Messages for the person.
    """
    used = {r.subject for r in records if r.accepted and r.subject}
    if not any(r.subject for r in records):
        return []
    if len(used) < 2:
        for r in records:
            r.subject = None
        who = f"only {next(iter(used))!r} has" if used else "no person has"
        return [f"{who} usable photos: prepared as a one-person dataset"]
    messages = []
    for r in records:
        if r.accepted and not r.subject:
            # Accepted by override without a face to tell whose it is: training must not guess.
            r.verdict = "reject"
            r.reasons = ["no face to tell whose photo it is: choose its person in subjects.json (or the "
                         "widgets) to use it"] + r.reasons
            messages.append(f"{r.file}: not used, its person is unknown")
    return messages
