"""Stage 1: check photos and turn them into aligned training crops, masks and a report.

``prepare_photos(photos_dir, out_dir)`` reads every file in ``photos_dir`` (never
modifying it) and writes, per the folder contract in DESIGN.md::

    out_dir/images/<stem>.png    face-centred, eye-levelled crops at SDXL bucket sizes
    out_dir/masks/<stem>.png     soft face masks (255 face, 0 background)
    out_dir/metadata.jsonl       one row per accepted photo (SDXL micro-conditioning)
    out_dir/report.csv           one row per input file: verdict, reasons, every measure
    out_dir/contact_sheet.png    every photo with its verdict colour and reasons
    out_dir/.lora_helpers_manifest.json   what the stage wrote (it touches nothing else)
    out_dir/dropped/             captions of photos no longer used, until they come back

Each photo gets a verdict: ``pass``, ``warn`` (used, with a caveat), ``reject`` (not
used, with the reason) or ``skip`` (not used, nothing wrong with it: a near-duplicate,
or a file that is not a photo). Checks that need the whole set run after every photo
has been measured: sharpness against the set's median, near-duplicates, and identity
outliers (a friend's photo mixed in). A verdict can be overridden with ``overrides=``
or an ``overrides.json`` in ``out_dir`` (``{"IMG_1.jpg": "accept" | "reject"}``).

With 8 or more usable photos, 1 or 2 are held out: marked ``"held_out": true`` in
``metadata.jsonl`` and left out of training, so evaluation can score likeness on faces the
LoRA never saw (:mod:`~lora_helpers.prepare.holdout`; the overrides "hold_out" and "train"
choose by hand). Every crop's ``resize_quality`` (how much of its detail is real, see
:func:`~lora_helpers.prepare.align.resize_quality`) is recorded too, with a warning below
``quality_threshold``.

Background normalisation (replacing or evening out backgrounds) is deliberately left
out: doing it well needs a segmentation model, and a poor cut-out teaches the LoRA
halo artefacts. The face masks let the trainer down-weight the background instead.

This module runs the stage and writes the folder; the steps live beside it:
:mod:`~lora_helpers.prepare.config` (settings), :mod:`~lora_helpers.prepare.photo` (one
photo), :mod:`~lora_helpers.prepare.judge` (set-level checks and verdicts) and
:mod:`~lora_helpers.prepare.report` (report.csv and the contact sheet),
:mod:`~lora_helpers.prepare.manifest` (what the stage owns in the dataset folder) and
:mod:`~lora_helpers.prepare.outputs` (writing it without touching anything else).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from lora_helpers.core import fileio
from lora_helpers.core.config import default_resolution
from lora_helpers.core.run_folder import check_run_folder
from lora_helpers.prepare import photo, report
from lora_helpers.prepare.config import PrepareConfig
from lora_helpers.prepare.faces import SAME_PERSON_COSINE, get_backend
from lora_helpers.prepare.holdout import HOLD_OUT, TRAIN, choose_held_out
from lora_helpers.prepare.judge import finalise, judge_set
from lora_helpers.prepare.manifest import REPORT_FILES, Manifest
from lora_helpers.prepare.outputs import name_outputs, record_reports, write_outputs
from lora_helpers.prepare.records import NoPhotosAcceptedError, PhotoRecord, PrepareResult
from lora_helpers.prepare.subjects import (
    assign_subjects, find_photos, merge_subject_overrides, read_subject_overrides, settle_subjects,
)

__all__ = [
    "prepare_photos",
    "read_overrides",
    "write_overrides",
    "add_cli_arguments",
    "run_cli",
]

log = logging.getLogger(__name__)

OVERRIDES_FILE = "overrides.json"
VERDICT_OVERRIDES = ("accept", "reject")
OVERRIDES = (*VERDICT_OVERRIDES, HOLD_OUT, TRAIN)


# ---------------------------------------------------------------------------------------
# Overrides


def read_overrides(out_dir: str | os.PathLike) -> dict[str, str]:
    """Verdict overrides saved in ``out_dir/overrides.json``.

    Args:
        out_dir: the dataset folder.

    Returns:
        ``{"file name": "accept" | "reject" | "hold_out" | "train"}``; empty when there is no file.

    Raises:
        ValueError: the file is not valid JSON or holds another value.
    """
    path = Path(out_dir) / OVERRIDES_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}); fix or delete the file") from exc
    return _check_overrides(data, str(path))


def write_overrides(out_dir: str | os.PathLike, overrides: dict[str, str]) -> Path:
    """Save verdict overrides for the next run, replacing earlier ones.

    Args:
        out_dir: the dataset folder.
        overrides: ``{"file name": "accept" | "reject" | "hold_out" | "train"}`` ("hold_out": keep the
            photo out of training for the held-out score; "train": never hold it out); "auto", "" and
            "none" drop a file's override.

    Returns:
        The path of ``overrides.json``.
    """
    clean = _check_overrides(overrides, "overrides")
    return fileio.write_json(Path(out_dir) / OVERRIDES_FILE, dict(sorted(clean.items())))


def _check_overrides(data, where: str) -> dict[str, str]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of file name to 'accept', 'reject', 'hold_out' or 'train'")
    out = {}
    for name, value in data.items():
        value = str(value).strip().lower().replace(" ", "_").replace("-", "_")
        if value in ("auto", "", "none"):
            continue
        if value not in OVERRIDES:
            raise ValueError(f"{where}: override for {name!r} must be 'accept' or 'reject' (the verdict), or "
                             f"'hold_out' or 'train' (held out of training or not), got {value!r}")
        out[str(name)] = value
    return out


# ---------------------------------------------------------------------------------------
# The stage


def _folders(photos, files: list[Path]) -> list[Path]:
    """The folders the photos come from (the one given, or each listed file's)."""
    if isinstance(photos, (str, os.PathLike)):
        return [Path(photos).resolve()]
    return sorted({p.parent.resolve() for p in files})


def _check_apart(out_dir: Path, folders: list[Path]) -> None:
    """Refuse a dataset folder that is, holds or sits inside a photo folder, before touching anything.

    The stage rewrites images/ and removes its stale crops there; with the photos in
    the same tree, a person's photos and notes would be at stake.
    """
    out = out_dir.resolve()
    for folder in folders:
        how = ("is" if out == folder else "lies inside" if out.is_relative_to(folder)
               else "contains" if folder.is_relative_to(out) else None)
        if how:
            raise ValueError(f"the dataset folder {out_dir} {how} the photo folder {folder}; choose a dataset "
                             "folder apart from the photos (for example a 'dataset' folder beside them)")


def _shown(name: str) -> str:
    """A file name as UTF-8 text: undecodable bytes (a name from another system) become U+FFFD."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def prepare_photos(
    photos_dir,
    out_dir: str | os.PathLike,
    *,
    config: PrepareConfig | None = None,
    overrides: dict[str, str] | None = None,
    progress: bool = True,
    backend=None,
    previous: PrepareResult | None = None,
    subject_overrides: dict | None = None,
) -> PrepareResult:
    """Check every photo and write the training crops, masks, metadata and report.

    Args:
        photos_dir: a folder (every file in it is reported on; with several people, one
            subfolder per person, see ``config.subjects``) or a list of photo files. Sources are only read.
        out_dir: the dataset folder to (re)write; must neither be, hold, nor lie inside a
            photo folder. Re-running into the same folder gives the same files. The stage
            overwrites or removes only files it wrote (listed, with their hashes, in
            ``.lora_helpers_manifest.json``, see :mod:`~lora_helpers.prepare.manifest`);
            crops of photos no longer accepted are removed and their ``.txt`` captions
            moved to ``dropped/`` until the photo comes back.
        config: :class:`PrepareConfig`; default settings when None.
        overrides: ``{"file name": "accept" | "reject" | "hold_out" | "train"}``; merged over
            ``overrides.json`` in ``out_dir`` (what the notebook widgets save).
        progress: show a progress bar.
        backend: a face backend; default ``get_backend(config.backend)``.
        previous: the result of an earlier run on the same photos: photos whose file,
            settings and override are unchanged are not processed again (applying an
            override redoes only that photo; the set-level checks are always redone).
        subject_overrides: with several people, ``{"photos": {file: person}, "names": {group or
            file: name}}`` merged over ``subjects.json`` in ``out_dir`` (see
            :mod:`~lora_helpers.prepare.subjects`).

    Returns:
        :class:`PrepareResult` with one :class:`PhotoRecord` per input file.

    Raises:
        FileNotFoundError: the photo folder does not exist.
        ValueError: ``out_dir`` and a photo folder overlap, an override is malformed, or a
            file of the dataset folder cannot be read (named).
        NoPhotosAcceptedError: no photo can be used. A folder that already holds a
            dataset is left exactly as it was; otherwise ``report.csv`` and
            ``contact_sheet.png`` are written first, to explain why.
    """
    config = config or PrepareConfig()
    out_dir = Path(out_dir)
    files, folder_subjects, mode, notes = find_photos(photos_dir, config.subjects)
    folders = _folders(photos_dir, files)
    _check_apart(out_dir, folders)
    check_run_folder(out_dir, what="dataset folder")  # a file in its place, or no write access: say so before the work
    manifest = Manifest.read(out_dir)
    for name in REPORT_FILES:
        # Rewritten every run, so listed is enough (no hash): only a stranger's report.csv is refused.
        if (out_dir / name).exists() and name not in manifest.files:
            raise ValueError(f"{out_dir / name} was not written by prepare; move it away or choose another dataset folder")
    merged = {**read_overrides(out_dir), **_check_overrides(overrides or {}, "overrides")}
    people = merge_subject_overrides(read_subject_overrides(out_dir), subject_overrides)
    backend = backend or get_backend(config.backend)

    records: list[PhotoRecord] = []
    # Report files by name; only when two folders hold the same name add the folder.
    names = [_shown(p.name) for p in files]
    if len(set(names)) < len(names):
        names = [f"{_shown(p.parent.name)}/{_shown(p.name)}" for p in files]
    processed, reused = {}, 0
    for path, name in tqdm(list(zip(files, names)), desc="preparing photos", unit="photo", disable=not progress):
        override = merged.get(name) or merged.get(path.name)
        # Only a verdict override changes how a photo is processed; holding out is decided for the set.
        verdict_override = override if override in VERDICT_OVERRIDES else None
        key = _photo_key(path, config, verdict_override)
        earlier = previous.processed.get(name) if previous is not None else None
        if earlier is not None and earlier[0] == key:
            rec, reused = copy.deepcopy(earlier[1]), reused + 1
        else:
            try:
                rec = photo.process_photo(path, name, config, backend, verdict_override)
            except Exception as exc:  # one bad photo never stops the batch
                log.exception("unexpected error while preparing %s", path)
                rec = PhotoRecord(file=name, path=path, override=verdict_override)
                rec.add("reject", f"unexpected error while processing ({type(exc).__name__}: {exc})")
            if _shown(path.name) != path.name:
                rec.add("warn", f"file name {os.fsencode(path.name)!r} is not UTF-8 text; renaming the photo keeps "
                                "names readable")
        processed[name] = (key, copy.deepcopy(rec))  # before judge_set adds set-level findings
        rec.override = override
        records.append(rec)

    notes += assign_subjects(records, mode=mode, overrides=people,
                             folder_subjects={n: folder_subjects[p] for p, n in zip(files, names)} if folder_subjects else None,
                             threshold=config.identity_threshold or SAME_PERSON_COSINE)
    judge_set(records, config)
    for rec in records:
        finalise(rec)
    notes += settle_subjects(records)
    held_out_message = choose_held_out(records, hold_out=config.hold_out)
    result = PrepareResult(out_dir=out_dir, records=records, config=config, processed=processed, reused=reused,
                           held_out_message=held_out_message)
    if not result.accepted:
        # An earlier dataset stays whole: an empty or mistaken photo folder must not wipe it.
        if manifest.has_dataset():
            raise NoPhotosAcceptedError(result, unchanged=True)
        report.write_report(result)
        record_reports(manifest, REPORT_FILES)
        raise NoPhotosAcceptedError(result)
    result.messages = notes + name_outputs(records, manifest)
    result.messages += write_outputs(result, manifest)
    report.write_report(result)
    record_reports(manifest, REPORT_FILES)
    return result


def _photo_key(path: Path, config: PrepareConfig, override: str | None) -> tuple:
    try:
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        stamp = None
    # hold_out and subjects are choices over the set: changing them must not redo every photo
    return (str(path.resolve()), stamp, repr(dataclasses.replace(config, hold_out=None, subjects="auto")), override)


# ---------------------------------------------------------------------------------------
# Command line


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``python -m lora_helpers prepare`` to ``parser``."""
    parser.add_argument("photos_dir", help="folder with the photos (only read)")
    parser.add_argument("out_dir", help="dataset folder to write (images/, masks/, metadata.jsonl, report.csv)")
    parser.add_argument("--resolution", type=int, default=None, help="square bucket side (default 1024; 64 in smoke mode)")
    parser.add_argument("--square", action="store_true", help="crop every photo 1:1 instead of the nearest SDXL aspect bucket")
    parser.add_argument("--normalise", action="store_true", help="gentle white balance and contrast (CLAHE) on the crops")
    parser.add_argument("--background-weight", type=float, default=0.0, help="mask value outside the face, 0..1 (default 0)")
    parser.add_argument("--clarity-pass", type=float, default=0.9, help="minimum face clarity score (default 0.9)")
    parser.add_argument("--face-fraction", type=float, default=0.35, help="face size as a share of the short side (default 0.35)")
    parser.add_argument("--accept", action="append", default=[], metavar="FILE", help="accept this photo whatever the checks say (repeatable)")
    parser.add_argument("--reject", action="append", default=[], metavar="FILE", help="reject this photo (repeatable)")
    parser.add_argument("--hold-out", default="auto", metavar="N",
                        help="photos kept out of training for the held-out likeness score: 'auto' (none below 8 "
                             "usable photos, 1 from 8, 2 from 12), 0 for none, or a number")
    parser.add_argument("--hold-out-photo", action="append", default=[], metavar="FILE",
                        help="hold this photo out of training (repeatable)")
    parser.add_argument("--train-photo", action="append", default=[], metavar="FILE",
                        help="never hold this photo out: always train on it (repeatable)")
    parser.add_argument("--quality-threshold", type=float, default=0.95,
                        help="warn about crops whose resize quality (share of real detail) is below this (default 0.95)")
    parser.add_argument("--subjects", choices=("auto", "one", "folders", "group"), default="auto",
                        help="several people: 'folders' (a subfolder per person), 'group' (group a mixed folder by "
                             "face), 'one', or 'auto' (subfolders when the folder holds only subfolders); corrections "
                             "go in subjects.json in the dataset folder")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    """Run the stage from parsed arguments and print the summary.

    Args:
        args: arguments parsed with the flags of :func:`add_cli_arguments`.

    Returns:
        The exit code: 0 done, 1 no photo is usable, 2 a missing folder, a bad override or setting.
    """
    try:
        config = PrepareConfig(
            resolution=args.resolution or default_resolution(),
            square_only=args.square,
            normalise=args.normalise,
            background_weight=args.background_weight,
            clarity_pass=args.clarity_pass,
            face_fraction=args.face_fraction,
            quality_threshold=args.quality_threshold,
            hold_out=args.hold_out,
            subjects=getattr(args, "subjects", "auto"),
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    overrides = {**{f: "accept" for f in args.accept}, **{f: "reject" for f in args.reject},
                 **{f: HOLD_OUT for f in args.hold_out_photo}, **{f: TRAIN for f in args.train_photo}}
    try:
        result = prepare_photos(args.photos_dir, args.out_dir, config=config, overrides=overrides, progress=not args.no_progress)
    except NoPhotosAcceptedError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"report: {result.out_dir / 'report.csv'}; contact sheet: {result.out_dir / 'contact_sheet.png'}")
    return 0
