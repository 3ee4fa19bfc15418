"""The caption files of a dataset folder: ``metadata.jsonl`` rows and ``.txt`` sidecars.

* ``metadata.jsonl``: the Hugging Face ``imagefolder`` format; each row keeps the keys the
  prepare stage wrote and gains ``"text"``.
* ``images/<stem>.txt``: kohya's sidecar format.

People edit captions by hand in either file; a hand edit wins over the file the caption
stage wrote, and two different edits stop with a message (:mod:`~lora_helpers.caption.edits`).
Every path a row names must stay inside the dataset folder: a shared or downloaded dataset
must not make us read or write elsewhere.

:func:`load_captions` is the one reader of captions (the trainer uses it);
:func:`caption_table` and :func:`save_caption` serve the notebook's editor. The caption
stage writes both formats through :func:`write_metadata` and the sidecars.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from lora_helpers.caption.edits import CurrentCaption, current_caption, written_captions
from lora_helpers.caption.text import clip_token_count, count_identifier, identifier_of, identifier_pattern
from lora_helpers.core.fileio import write_text
from lora_helpers.core.images import list_images
from lora_helpers.core import run_folder
from lora_helpers.core.run_folder import METADATA_FILE as METADATA
from lora_helpers.core.run_folder import SUBJECT_FIELD, SUBJECTS_KEY, RunFolderError, read_caption_config

__all__ = [
    "METADATA",
    "CaptionError",
    "CaptionWarning",
    "CaptionRow",
    "DatasetEntry",
    "dataset_entries",
    "read_metadata",
    "write_metadata",
    "load_captions",
    "caption_table",
    "save_caption",
    "subject_triggers",
]



class CaptionError(ValueError):
    """Captions that cannot be trained on; ``problems`` maps file name to reason.

    ``undecided`` names the files whose caption exists but cannot be used as it is (edited
    differently in both files, or an unreadable ``.txt``): a person has to look at those,
    so no fallback (one instance prompt for all) may replace them.
    """

    def __init__(self, message: str, problems: dict[str, str] | None = None, undecided: list[str] | None = None):
        self.problems = dict(problems or {})
        self.undecided = list(undecided or [])
        super().__init__(message)


class CaptionWarning(UserWarning):
    """Something a person should look at in the captions (it does not stop training)."""


@dataclass
class CaptionRow:
    """One image and its caption as a person sees it (for tables and the editor)."""

    file_name: str
    path: Path
    text: str | None
    tokens: int | None
    has_identifier: bool
    problem: str | None
    subject: str | None = None  # the person, in a dataset of several


@dataclass
class DatasetEntry:
    """One image of the dataset with what its two caption files hold."""

    file_name: str
    path: Path
    row: dict | None  # the metadata.jsonl row (None for folders without one)
    sidecar: str | None  # text of the .txt file (None when there is none)
    sidecar_problem: str | None = None  # why the .txt file cannot be read

    @property
    def sidecar_path(self) -> Path:
        return self.path.with_suffix(".txt")

    @property
    def sidecar_name(self) -> str:
        return PurePosixPath(self.file_name).with_suffix(".txt").as_posix()

    def current(self, written: dict[str, str]) -> CurrentCaption:
        """The caption this image has now.

        Args:
            written: ``{file_name: caption}`` the caption stage last wrote (:func:`written_captions`).

        Returns:
            A :class:`~lora_helpers.caption.edits.CurrentCaption`.
        """
        return current_caption(self.sidecar_name, self.sidecar, self.sidecar_problem, (self.row or {}).get("text"),
                               written.get(self.file_name))


def _entry(dataset_dir: Path, name: str, row: dict | None) -> DatasetEntry:
    path = dataset_dir / name
    sidecar = path.with_suffix(".txt")
    text, problem = None, None
    if sidecar.is_file():
        try:
            text = sidecar.read_text(encoding="utf-8").strip()
        except UnicodeDecodeError as exc:
            problem = (f"{sidecar.relative_to(dataset_dir).as_posix()} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} "
                       f"at position {exc.start}); save it as UTF-8")
    return DatasetEntry(name, path, row, text, problem)


def read_metadata(dataset_dir: str | Path) -> list[dict]:
    """The checked rows of ``metadata.jsonl`` (:func:`lora_helpers.core.run_folder.read_metadata`).

    Raises:
        CaptionError: naming the file and line of a row that cannot be used.
    """
    try:
        return run_folder.read_metadata(dataset_dir)
    except RunFolderError as exc:
        raise CaptionError(str(exc)) from exc


def dataset_entries(dataset_dir: Path) -> tuple[list[DatasetEntry], list[str]]:
    """The dataset's images, from metadata.jsonl rows, images/, or the folder itself.

    Args:
        dataset_dir: the dataset folder.

    Returns:
        ``(entries, notes)``; notes name images that are listed but missing, or present
        but not listed (the prepare stage's metadata.jsonl decides what is trained on).

    Raises:
        FileNotFoundError: the folder does not exist.
        CaptionError: a row that cannot be used (see :func:`read_metadata`), or no images at all.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {dataset_dir} (run the prepare stage, or check the path)")
    notes: list[str] = []
    meta = dataset_dir / METADATA
    entries: list[DatasetEntry] = []
    if meta.is_file():
        listed = set()
        for row in read_metadata(dataset_dir):
            name = row["file_name"]
            entry = _entry(dataset_dir, name, row)
            listed.add(entry.path.resolve())
            if not entry.path.is_file():
                notes.append(f"{name}: listed in {METADATA} but the file is missing; re-run prepare or remove the row")
            entries.append(entry)
        folder = dataset_dir / "images" if (dataset_dir / "images").is_dir() else dataset_dir
        for path in list_images(folder):
            if path.resolve() not in listed:
                notes.append(f"{path.relative_to(dataset_dir).as_posix()}: not listed in {METADATA}, so not used")
    else:
        folder = dataset_dir / "images" if (dataset_dir / "images").is_dir() else dataset_dir
        for path in list_images(folder):
            entries.append(_entry(dataset_dir, path.relative_to(dataset_dir).as_posix(), None))
    if not entries:
        raise CaptionError(
            f"no images in {dataset_dir}: expected {METADATA}, an images/ folder, or image files "
            "(.png, .jpg) in the folder itself; run the prepare stage first"
        )
    return entries, notes


def write_metadata(dataset_dir: Path, entries: list[DatasetEntry], captions: dict[str, str]) -> Path:
    """Rewrite ``metadata.jsonl`` with the captions, keeping every other key of each row.

    Args:
        dataset_dir: the dataset folder.
        entries: the images, in dataset order (from :func:`dataset_entries`).
        captions: ``{file_name: caption}``; images without one keep their row as it is.

    Returns:
        The path of ``metadata.jsonl``.
    """
    rows = []
    for e in entries:
        row = dict(e.row) if e.row is not None else {"file_name": e.file_name}
        if e.file_name in captions:
            row["text"] = captions[e.file_name]
        rows.append(row)
    return run_folder.write_metadata(dataset_dir, rows)


def subject_triggers(dataset_dir: str | Path) -> dict[str, str]:
    """Each person's trigger in a dataset of several people (``{"ada": "TOK1 person"}``), from
    ``caption_config.json``; {} for a one-person dataset or one not captioned yet."""
    subjects = read_caption_config(dataset_dir).get(SUBJECTS_KEY)
    if not isinstance(subjects, dict):
        return {}
    return {str(who): s["trigger"] for who, s in subjects.items() if isinstance(s, dict) and s.get("trigger")}


def _subject_problem(e: DatasetEntry, text: str | None, triggers: dict[str, str]) -> str | None:
    """In a dataset of several people: the caption must name its own person once and nobody else."""
    who = (e.row or {}).get(SUBJECT_FIELD)
    if not triggers or not who or not text:
        return None
    if who not in triggers:
        return f"its person {who!r} has no identifier in caption_config.json; run the caption stage"
    own = identifier_of(triggers[who])
    others = [identifier_of(t) for w, t in triggers.items() if w != who and count_identifier(text, identifier_of(t))]
    if count_identifier(text, own) != 1:
        return f"caption of {who} must have {own!r} exactly once, has it {count_identifier(text, own)} times: {text!r}"
    if others:
        return f"caption of {who} names another person ({', '.join(others)}): {text!r}; keep only {own!r}"
    return None


def _problem(e: DatasetEntry, current: CurrentCaption, identifier: str | None,
             triggers: dict[str, str] | None = None) -> str | None:
    text = current.text
    if not e.path.is_file():
        return "image file missing"
    if current.problem:
        return current.problem
    if text is None:
        return f"no caption ({e.sidecar_path.name} missing and no 'text' in {METADATA}); run the caption stage"
    if not text:
        return f"empty caption in {e.sidecar_path.name if e.sidecar is not None else METADATA}; write one"
    if identifier and not identifier_pattern(identifier).search(text):
        return f"caption lacks the identifier {identifier!r}: {text!r}; add it (e.g. '{identifier} person')"
    return _subject_problem(e, text, triggers or {})


def load_captions(dataset_dir: str | Path, *, require_identifier: str | None = None) -> dict[str, str]:
    """Read the training captions: the one reader every stage uses.

    In a dataset of several people (``caption_config.json`` maps each to a trigger) every
    caption must name its own person's identifier exactly once and no other person's.

    A caption edited by hand wins, whether the edit was made in the ``.txt`` sidecar or
    in ``metadata.jsonl`` (the file that still holds what the caption stage wrote is the
    stale one); one :class:`CaptionWarning` lists the files where the two differ. When
    both were edited and differ, the image is named as a problem.

    Args:
        dataset_dir: the dataset folder.
        require_identifier: a word or phrase (e.g. "TOK" or "TOK person") every caption must
            contain, on word boundaries, case-insensitive; None skips the check.

    Returns:
        ``{file_name: caption}`` in dataset order; file names are relative to ``dataset_dir``.

    Raises:
        CaptionError: naming every file without a caption, with an empty, unreadable or
            doubly edited caption, or without the identifier; a row naming a file outside
            the folder; or no images at all. Images listed in ``metadata.jsonl`` but
            missing on disk are left out with a warning instead.
    """
    dataset_dir = Path(dataset_dir)
    entries, notes = dataset_entries(dataset_dir)
    written = written_captions(dataset_dir)
    triggers = subject_triggers(dataset_dir)
    for message in notes:
        warnings.warn(message, CaptionWarning, stacklevel=2)
    captions, problems, edited, undecided = {}, {}, [], []
    for e in entries:
        if not e.path.is_file():  # already warned about; training skips it
            continue
        current = e.current(written)
        if current.problem:
            undecided.append(e.file_name)
        if current.edited:
            edited.append(f"{e.file_name} (edited in {e.sidecar_name if current.edited == 'sidecar' else METADATA})")
        problem = _problem(e, current, require_identifier, triggers)
        if problem:
            problems[e.file_name] = problem
        else:
            captions[e.file_name] = current.text
    if edited:
        warnings.warn(f"{len(edited)} caption(s) differ between the .txt files and {METADATA}; using the hand edit: "
                      + ", ".join(edited) + "; run the caption stage to write it to both", CaptionWarning, stacklevel=2)
    if problems:
        lines = "\n".join(f"  {name}: {why}" for name, why in problems.items())
        raise CaptionError(f"{len(problems)} of {len(entries)} image(s) in {dataset_dir} cannot be trained on:\n{lines}",
                           problems, undecided)
    if not captions:
        raise CaptionError(f"no images in {dataset_dir}: every file listed in {METADATA} is missing; run prepare again")
    return captions


def caption_table(dataset_dir: str | Path, *, identifier: str | None = None, tokenizer=None) -> list[CaptionRow]:
    """Every image with its caption, token count and problem; never raises for bad captions.

    Args:
        dataset_dir: the dataset folder.
        identifier: the word every caption needs; None reads it from ``caption_config.json``.
        tokenizer: CLIP tokenizer; None uses the rough estimate.

    Returns:
        One :class:`CaptionRow` per image, in dataset order.
    """
    dataset_dir = Path(dataset_dir)
    if identifier is None:
        identifier = read_caption_config(dataset_dir).get("identifier")
    triggers = subject_triggers(dataset_dir)
    rows = []
    written = written_captions(dataset_dir)
    for e in dataset_entries(dataset_dir)[0]:
        current = e.current(written)
        text = current.text
        # Several people: each row needs its own person's identifier.
        own = identifier_of(triggers[who]) if (who := (e.row or {}).get(SUBJECT_FIELD)) in triggers else identifier
        rows.append(CaptionRow(
            file_name=e.file_name, path=e.path, text=text,
            tokens=clip_token_count(text, tokenizer) if text else None,
            has_identifier=bool(text and own and identifier_pattern(own).search(text)),
            problem=_problem(e, current, own, triggers),
            subject=who if triggers else None,
        ))
    return rows


def save_caption(dataset_dir: str | Path, file_name: str, text: str) -> str:
    """Save a hand-edited caption to both formats (sidecar and metadata.jsonl), atomically.

    Args:
        dataset_dir: the dataset folder.
        file_name: the image, relative to ``dataset_dir`` (as in :func:`load_captions`).
        text: the caption; surrounding whitespace and line breaks are collapsed.

    Returns:
        The caption as saved.

    Raises:
        CaptionError: for an empty caption or an image not in the dataset.
    """
    dataset_dir = Path(dataset_dir)
    text = re.sub(r"\s+", " ", text or "").strip()
    if not text:
        raise CaptionError(f"{file_name}: empty caption not saved; write a caption", {file_name: "empty caption"})
    entries, _ = dataset_entries(dataset_dir)
    match = [e for e in entries if e.file_name == file_name]
    if not match:
        raise CaptionError(f"{file_name}: not an image of {dataset_dir}", {file_name: "unknown image"})
    write_text(match[0].sidecar_path, text + "\n")
    # Only this image's row changes: another image's edit in metadata.jsonl must survive.
    write_metadata(dataset_dir, entries, {file_name: text})
    return text
