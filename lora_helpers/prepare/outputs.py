"""Writing the prepare stage's files into the dataset folder without touching anyone else's.

What the stage owns is in :class:`~lora_helpers.prepare.manifest.Manifest`; this module
names the crops so they never land on a file the stage did not write, writes crops,
masks and ``metadata.jsonl``, removes crops of photos no longer accepted, and moves
those photos' ``.txt`` captions to ``dropped/`` (back again when the photo returns).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from lora_helpers.core import fileio
from lora_helpers.core.run_folder import HELD_OUT_FIELD, RESIZE_QUALITY_FIELD, SUBJECT_FIELD, write_metadata
from lora_helpers.prepare.manifest import DROPPED_DIR, Manifest
from lora_helpers.prepare.records import PhotoRecord, PrepareResult

__all__ = ["name_outputs", "write_outputs", "record_reports"]


def _stem(record: PhotoRecord) -> str:
    # A file name that is not UTF-8 is shown with U+FFFD; keep that out of the crop's name.
    return Path(record.file).stem.replace("\ufffd", "_") or "photo"


def _earlier_stems(manifest: Manifest) -> dict[str, str]:
    """Photo file -> the stem its crop had in this dataset (accepted or dropped out since)."""
    stems = {src: Path(e["row"]["file_name"]).stem for src, e in manifest.dropped.items()
             if isinstance(e.get("row"), dict) and e["row"].get("file_name")}
    stems.update({r["source"]: Path(r["file_name"]).stem for r in manifest.rows if "source" in r and r.get("file_name")})
    return stems


def name_outputs(records: list[PhotoRecord], manifest: Manifest) -> list[str]:
    """Give each record its ``images/<stem>.png`` stem: unique, and never a file we did not write.

    A photo keeps the stem its crop had before, so a caption file beside the crop
    (``images/<stem>.txt``) stays with its photo when photos are added or removed; new
    photos take the next free name.

    Args:
        records: every record, in input order (IMG_1.jpg next to IMG_1.png get distinct stems).
        manifest: what the stage owns in the dataset folder.

    Returns:
        One message per accepted photo whose crop had to take another name.
    """
    earlier = _earlier_stems(manifest)
    taken: set[str] = set()
    for r in records:
        stem = earlier.get(r.file)
        if stem and stem.lower() not in taken and not (r.accepted and _blocked(stem, manifest)):
            r.stem = stem
            taken.add(stem.lower())
        else:
            r.stem = None
    messages = []
    for r in records:
        if r.stem is not None:
            continue
        stem = _stem(r)
        name = stem if stem.lower() not in taken else f"{stem}_{Path(r.file).suffix.lstrip('.').lower()}"
        first, n = name, 2
        while name.lower() in taken or (r.accepted and _blocked(name, manifest)):
            name, n = f"{stem}_{n}", n + 1
        if name != first and r.accepted and _blocked(first, manifest):
            messages.append(f"images/{first}.png or masks/{first}.png is not a file prepare wrote (or was changed "
                            f"since); left as it is, the crop of {r.file} is images/{name}.png")
        taken.add(name.lower())
        r.stem = name
    return messages


def _blocked(stem: str, manifest: Manifest) -> bool:
    return manifest.foreign(f"images/{stem}.png") or manifest.foreign(f"masks/{stem}.png")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write_if_changed(path: Path, data: bytes) -> None:
    # Skipping identical files keeps re-runs cheap and leaves timestamps alone.
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    fileio.write_bytes(path, data)


def _free_name(path: Path) -> Path:
    n = 2
    candidate = path
    while candidate.exists():
        candidate, n = path.with_name(f"{path.stem}.{n}{path.suffix}"), n + 1
    return candidate


def _set_aside(manifest: Manifest, image_file: str | None) -> str | None:
    """Move the ``.txt`` caption of a crop that is going away into ``dropped/``; its new path."""
    image = manifest.path(image_file) if image_file else None
    if image is None or not image.with_suffix(".txt").is_file():
        return None
    sidecar = image.with_suffix(".txt")
    target = _free_name(manifest.folder / DROPPED_DIR / sidecar.relative_to(manifest.folder))
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(sidecar, target)  # a rename: the file stays byte for byte what it was
    return target.relative_to(manifest.folder).as_posix()


def _bring_back(manifest: Manifest, entry: dict, image_file: str) -> str | None:
    """Move a dropped photo's caption back beside its crop; a message when it has to stay aside."""
    kept = manifest.path(entry.get("sidecar")) if entry.get("sidecar") else None
    if kept is None or not kept.is_file():
        return None
    target = (manifest.folder / image_file).with_suffix(".txt")
    if target.exists():
        return f"{target.relative_to(manifest.folder).as_posix()} exists, so the earlier caption stays in {entry['sidecar']}"
    os.replace(kept, target)
    return None


def write_outputs(result: PrepareResult, manifest: Manifest) -> list[str]:
    """Write crops, masks and ``metadata.jsonl``; retire files of photos that dropped out.

    Rows the stage did not write (no ``"source"``) are kept as they are; a photo's caption
    (its row's ``"text"``) follows the photo across re-runs and drop-outs.

    Args:
        result: the judged records, named with :func:`name_outputs`.
        manifest: what the stage owns; updated and saved.

    Returns:
        Messages for the person (a caption kept aside, ...).
    """
    out, messages = result.out_dir, []
    old_rows = [r for r in manifest.rows if "source" in r]
    by_source = {r["source"]: r for r in old_rows}
    new_files: dict[str, str] = {}
    rows, plan = [], []
    for r in result.records:
        if not r.accepted or r.rendered is None:
            continue
        r.image_file, r.mask_file = f"images/{r.stem}.png", f"masks/{r.stem}.png"
        for name, data in zip((r.image_file, r.mask_file), r.rendered):
            plan.append((name, data))
            new_files[name] = _sha(data)
        row = {"file_name": r.image_file, "mask_file": r.mask_file, **r.metadata,
               "source": r.file, "face_clarity_score": r.face_clarity_score,
               RESIZE_QUALITY_FIELD: r.resize_quality}
        if r.held_out:  # absent means a training photo, as in datasets from before holding out
            row[HELD_OUT_FIELD] = True
        if r.subject:  # absent means the dataset's one person
            row[SUBJECT_FIELD] = r.subject
        earlier = by_source.get(r.file) or manifest.dropped.get(r.file, {}).get("row") or {}
        if "text" in earlier:
            row["text"] = earlier["text"]  # the caption belongs to the photo, hand edits included
        rows.append(row)

    # Record old and new contents first: a crash mid-run leaves every file we wrote recognisable.
    for name, sha in new_files.items():
        manifest.files[name] = manifest.files.get(name, []) + [sha]
    manifest.save()
    for name, data in plan:
        _write_if_changed(out / name, data)
    # Captions of photos that dropped out go aside first, so a returning photo can take its stem back.
    accepted = {row["source"]: row["file_name"] for row in rows}
    for row in old_rows:
        if row["source"] not in accepted:
            moved = _set_aside(manifest, row.get("file_name"))
            manifest.dropped[row["source"]] = {"row": row, "sidecar": moved}
            if moved:
                messages.append(f"{row['source']} is no longer used; its caption was moved to {moved} "
                                "(it comes back when the photo does)")
    for source, image_file in accepted.items():
        entry = manifest.dropped.pop(source, None)
        if entry and (message := _bring_back(manifest, entry, image_file)):
            messages.append(message)
    write_metadata(out, rows + [r for r in manifest.rows if "source" not in r])

    # Only now, with the new metadata in place, remove our crops that nothing uses any more.
    for name in [n for n in manifest.files if n not in new_files and n.startswith(("images/", "masks/"))]:
        path = manifest.path(name)
        if path is not None and path.is_file() and not manifest.foreign(name):
            path.unlink()
        del manifest.files[name]
    for name, sha in new_files.items():
        manifest.files[name] = [sha]
    manifest.save()
    return messages


def record_reports(manifest: Manifest, names: tuple[str, ...]) -> None:
    """Add the report files just written to the manifest and save it."""
    for name in names:
        path = manifest.folder / name
        if path.is_file():
            manifest.files[name] = [fileio.sha256_file(path)]
    manifest.save()
