"""The caption files of a dataset folder: ``metadata.jsonl`` rows and ``.txt`` sidecars.

* ``metadata.jsonl``: the Hugging Face ``imagefolder`` format; each row keeps the keys the
  prepare stage wrote and gains ``"text"``.
* ``images/<stem>.txt``: kohya's sidecar format. People edit these by hand, so they win
  over ``metadata.jsonl`` when the two differ.

:func:`load_captions` is the one reader of captions (the trainer uses it);
:func:`caption_table` and :func:`save_caption` serve the notebook's editor. The caption
stage writes both formats through :func:`write_metadata` and the sidecars.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path

from lora_helpers.caption.text import clip_token_count, identifier_pattern
from lora_helpers.core.fileio import read_jsonl, write_jsonl, write_text
from lora_helpers.core.images import list_images
from lora_helpers.core.run_folder import read_caption_config

__all__ = [
    "METADATA",
    "CaptionError",
    "CaptionWarning",
    "CaptionRow",
    "DatasetEntry",
    "dataset_entries",
    "existing_caption",
    "write_metadata",
    "load_captions",
    "caption_table",
    "save_caption",
]

METADATA = "metadata.jsonl"


class CaptionError(ValueError):
    """Captions that cannot be trained on; ``problems`` maps file name to reason."""

    def __init__(self, message: str, problems: dict[str, str] | None = None):
        self.problems = dict(problems or {})
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


@dataclass
class DatasetEntry:
    """One image of the dataset with what its two caption files hold."""

    file_name: str
    path: Path
    row: dict | None  # the metadata.jsonl row (None for folders without one)
    sidecar: str | None  # text of the .txt file (None when there is none)

    @property
    def sidecar_path(self) -> Path:
        return self.path.with_suffix(".txt")


def _read_sidecar(path: Path) -> str | None:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def dataset_entries(dataset_dir: Path) -> tuple[list[DatasetEntry], list[str]]:
    """The dataset's images, from metadata.jsonl rows, images/, or the folder itself.

    Args:
        dataset_dir: the dataset folder.

    Returns:
        ``(entries, notes)``; notes name images that are listed but missing, or present
        but not listed (the prepare stage's metadata.jsonl decides what is trained on).

    Raises:
        FileNotFoundError: the folder does not exist.
        CaptionError: a row without "file_name", or no images at all.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {dataset_dir} (run the prepare stage, or check the path)")
    notes: list[str] = []
    meta = dataset_dir / METADATA
    entries: list[DatasetEntry] = []
    if meta.is_file():
        listed = set()
        for i, row in enumerate(read_jsonl(meta), 1):
            name = row.get("file_name")
            if not isinstance(name, str) or not name:
                raise CaptionError(f"{meta}, line {i}: row without 'file_name'; fix or delete that line")
            path = dataset_dir / name
            listed.add(path.resolve())
            if not path.is_file():
                notes.append(f"{name}: listed in {METADATA} but the file is missing; re-run prepare or remove the row")
            entries.append(DatasetEntry(name, path, row, _read_sidecar(path.with_suffix(".txt"))))
        folder = dataset_dir / "images" if (dataset_dir / "images").is_dir() else dataset_dir
        for path in list_images(folder):
            if path.resolve() not in listed:
                notes.append(f"{path.relative_to(dataset_dir).as_posix()}: not listed in {METADATA}, so not used")
    else:
        folder = dataset_dir / "images" if (dataset_dir / "images").is_dir() else dataset_dir
        for path in list_images(folder):
            name = path.relative_to(dataset_dir).as_posix()
            entries.append(DatasetEntry(name, path, None, _read_sidecar(path.with_suffix(".txt"))))
    if not entries:
        raise CaptionError(
            f"no images in {dataset_dir}: expected {METADATA}, an images/ folder, or image files "
            "(.png, .jpg) in the folder itself; run the prepare stage first"
        )
    return entries, notes


def existing_caption(entry: DatasetEntry) -> str | None:
    """The caption an image already has: its sidecar, else its row's "text"; None when empty."""
    if entry.sidecar:
        return entry.sidecar
    text = (entry.row or {}).get("text")
    return text.strip() if isinstance(text, str) and text.strip() else None


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
    return write_jsonl(Path(dataset_dir) / METADATA, rows)


def _gather(dataset_dir: Path) -> tuple[list[DatasetEntry], list[str], list[str]]:
    """Entries plus the notes and the files whose sidecar and metadata text differ."""
    entries, notes = dataset_entries(dataset_dir)
    differ = []
    for e in entries:
        text = (e.row or {}).get("text")
        if e.sidecar is not None and isinstance(text, str) and text.strip() and text.strip() != e.sidecar:
            differ.append(e.file_name)
    return entries, notes, differ


def _problem(e: DatasetEntry, text: str | None, identifier: str | None) -> str | None:
    if not e.path.is_file():
        return "image file missing"
    if text is None:
        return f"no caption ({e.sidecar_path.name} missing and no 'text' in {METADATA}); run the caption stage"
    if not text:
        return f"empty caption in {e.sidecar_path.name if e.sidecar is not None else METADATA}; write one"
    if identifier and not identifier_pattern(identifier).search(text):
        return f"caption lacks the identifier {identifier!r}: {text!r}; add it (e.g. '{identifier} person')"
    return None


def _text_of(e: DatasetEntry) -> str | None:
    if e.sidecar is not None:
        return e.sidecar
    text = (e.row or {}).get("text")
    return text.strip() if isinstance(text, str) else None


def load_captions(dataset_dir: str | Path, *, require_identifier: str | None = None) -> dict[str, str]:
    """Read the training captions: the one reader every stage uses.

    The ``.txt`` sidecar wins over ``metadata.jsonl``'s "text" (people edit sidecars);
    when both exist and differ, one :class:`CaptionWarning` lists the files.

    Args:
        dataset_dir: the dataset folder.
        require_identifier: a word or phrase (e.g. "TOK" or "TOK person") every caption must
            contain, on word boundaries, case-insensitive; None skips the check.

    Returns:
        ``{file_name: caption}`` in dataset order; file names are relative to ``dataset_dir``.

    Raises:
        CaptionError: naming every file without a caption, with an empty caption or without
            the identifier; or when there are no images at all. Images listed in
            ``metadata.jsonl`` but missing on disk are left out with a warning instead.
    """
    dataset_dir = Path(dataset_dir)
    entries, notes, differ = _gather(dataset_dir)
    for message in notes:
        warnings.warn(message, CaptionWarning, stacklevel=2)
    if differ:
        warnings.warn(f"{len(differ)} caption(s) differ between the .txt files and {METADATA}; using the .txt files: "
                      + ", ".join(differ), CaptionWarning, stacklevel=2)
    captions, problems = {}, {}
    for e in entries:
        if not e.path.is_file():  # already warned about; training skips it
            continue
        text = _text_of(e)
        problem = _problem(e, text, require_identifier)
        if problem:
            problems[e.file_name] = problem
        else:
            captions[e.file_name] = text
    if problems:
        lines = "\n".join(f"  {name}: {why}" for name, why in problems.items())
        raise CaptionError(f"{len(problems)} of {len(entries)} image(s) in {dataset_dir} cannot be trained on:\n{lines}",
                           problems)
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
    rows = []
    for e in dataset_entries(dataset_dir)[0]:
        text = _text_of(e)
        rows.append(CaptionRow(
            file_name=e.file_name, path=e.path, text=text,
            tokens=clip_token_count(text, tokenizer) if text else None,
            has_identifier=bool(text and identifier and identifier_pattern(identifier).search(text)),
            problem=_problem(e, text, identifier),
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
    captions = {e.file_name: t for e in entries if (t := _text_of(e))}
    captions[file_name] = text
    write_metadata(dataset_dir, entries, captions)
    return text
