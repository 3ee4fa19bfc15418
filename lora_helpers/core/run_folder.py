"""The folders between the stages: the one owner of their file names and small JSON files.

A dataset folder (written by prepare and caption) holds ``caption_config.json``; a run folder
(written by training) holds ``config.json``, ``log.jsonl``, the LoRA files and
``checkpoints/checkpoint-<step>/``. Every stage asks this module for those names, the default
trigger phrase and the checkpoint list, so the contract between stages lives in one file.

:func:`check_run_folder` tells, before any long work, whether a run folder can be written;
:mod:`lora_helpers.core.run_lock` holds its lock file (``LOCK_FILE``) while a training writes it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

from lora_helpers.core.fileio import path_inside, read_jsonl, write_json, write_jsonl

__all__ = [
    "DEFAULT_TOKEN",
    "DEFAULT_CLASS_NOUN",
    "DEFAULT_TRIGGER",
    "LORA_WEIGHT_NAME",
    "CONFIG_FILE",
    "LOG_FILE",
    "CAPTION_CONFIG_FILE",
    "METADATA_FILE",
    "HELD_OUT_FIELD",
    "RESIZE_QUALITY_FIELD",
    "SUBJECT_FIELD",
    "SUBJECTS_KEY",
    "CHECKPOINTS_DIR",
    "LOCK_FILE",
    "RunFolderError",
    "kohya_file_name",
    "read_json_object",
    "read_run_config",
    "write_run_config",
    "read_caption_config",
    "write_caption_config",
    "read_metadata",
    "write_metadata",
    "read_log",
    "checkpoint_dir",
    "checkpoint_step",
    "list_checkpoints",
    "find_checkpoints",
    "check_run_folder",
]

DEFAULT_TOKEN = "TOK"
DEFAULT_CLASS_NOUN = "person"
# The phrase that calls the person when nothing else says which: the caption stage writes the
# real one into caption_config.json, training copies it into config.json.
DEFAULT_TRIGGER = f"{DEFAULT_TOKEN} {DEFAULT_CLASS_NOUN}"

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' load_lora_weights looks for
CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
CAPTION_CONFIG_FILE = "caption_config.json"
METADATA_FILE = "metadata.jsonl"  # the dataset's rows: file_name, mask_file, micro-conditioning, text
# Optional metadata.jsonl fields: a photo kept out of training so evaluation can score likeness on a
# face the model never saw, and how much of a crop's 1024 px detail is real (0..1).
HELD_OUT_FIELD = "held_out"
RESIZE_QUALITY_FIELD = "resize_quality"
# Several people in one dataset: each metadata.jsonl row names its person (a slug such as "ada"; absent:
# the dataset's one person), and caption_config.json / a run's config.json map each slug to its trigger
# under "subjects" ({"ada": {"trigger": "TOK1 person", "class_noun": "person", ...}}).
SUBJECT_FIELD = "subject"
SUBJECTS_KEY = "subjects"
CHECKPOINTS_DIR = "checkpoints"
LOCK_FILE = ".lock"  # a dot file: the Hub upload of a run leaves it out
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Present only while a checkpoint can be resumed from (older ones keep just their LoRA).
_RESUME_MARKER = "training_state.pt"


class RunFolderError(ValueError):
    """A file of a dataset or run folder that cannot be read (named, with the line), or a run folder that cannot be written."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def kohya_file_name(output_name: str) -> str:
    """The kohya/A1111/ComfyUI file of a run: ``<output_name>_kohya.safetensors``."""
    return f"{output_name}_kohya.safetensors"


def read_json_object(path: str | os.PathLike, *, what: str) -> dict[str, Any]:
    """A JSON object from ``path``; {} when the file is absent.

    Args:
        path: the file.
        what: what the file holds, for the message ("the trigger phrase").

    Raises:
        RunFolderError: the file is not a JSON object.
    """
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RunFolderError(path, f"not valid JSON ({exc}); fix it or delete it (it holds {what})") from None
    if not isinstance(data, dict):
        raise RunFolderError(path, f"expected a JSON object (it holds {what})")
    return data


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """``run_dir/config.json``: trigger, base_model, resolution, ...; {} when absent."""
    return read_json_object(Path(run_dir) / CONFIG_FILE, what="the trigger phrase and base model")


def write_run_config(run_dir: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``run_dir/config.json`` atomically; later stages read ``trigger``, ``base_model``, ``resolution``."""
    return write_json(Path(run_dir) / CONFIG_FILE, data)


def read_caption_config(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """The last caption run's settings (``caption_config.json``), or {}.

    Keys include "trigger" (the subject phrase, e.g. "TOK person"), "identifier" ("TOK"),
    "template" and "model"; the trainer records the trigger from here.
    """
    return read_json_object(Path(dataset_dir) / CAPTION_CONFIG_FILE, what="the caption settings; run captioning again")


def write_caption_config(dataset_dir: str | os.PathLike, data: dict[str, Any]) -> Path:
    """Write ``dataset_dir/caption_config.json`` atomically."""
    return write_json(Path(dataset_dir) / CAPTION_CONFIG_FILE, data)


def read_metadata(dataset_dir: str | Path) -> list[dict]:
    """The rows of ``metadata.jsonl``, each checked to name files inside the dataset folder.

    Args:
        dataset_dir: the dataset folder (holding ``metadata.jsonl``).

    Returns:
        The rows, in file order (blank lines skipped).

    Raises:
        RunFolderError: naming the file and line of a row that is not a JSON object with a
            "file_name", or whose file_name, mask_file or sidecar lies outside the folder
            (absolute, "..", a link out); or a file that is not UTF-8.
    """
    dataset_dir = Path(dataset_dir)
    meta = dataset_dir / METADATA_FILE
    try:
        lines = meta.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise RunFolderError(meta, f"not UTF-8 text (at byte {exc.start}); save it as UTF-8") from exc
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{meta}, line {i}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise RunFolderError(where, f"not valid JSON ({exc.msg}); fix or delete that line") from exc
        if not isinstance(row, dict) or not isinstance(row.get("file_name"), str) or not row["file_name"]:
            raise RunFolderError(where, "row without 'file_name'; fix or delete that line")
        names = {"file_name": row["file_name"], "mask_file": row.get("mask_file"),
                 "caption file": PurePosixPath(row["file_name"]).with_suffix(".txt").as_posix()}
        for key, name in names.items():
            if name is None:
                continue
            try:
                path_inside(dataset_dir, name)
            except ValueError as exc:
                raise RunFolderError(where, f"{key} {exc}; a row may name only files inside {dataset_dir}, "
                                            "fix or delete that line") from exc
        rows.append(row)
    return rows


def write_metadata(dataset_dir: str | os.PathLike, rows: list[dict]) -> Path:
    """Write ``metadata.jsonl`` atomically (prepare writes the rows, caption adds their text)."""
    return write_jsonl(Path(dataset_dir) / METADATA_FILE, rows)


def read_log(run_dir: str | os.PathLike) -> list[dict]:
    """Rows of ``log.jsonl`` (one per step), or [] when there is none yet."""
    path = Path(run_dir) / LOG_FILE
    return read_jsonl(path) if path.is_file() else []


def checkpoint_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Folder of the checkpoint at ``step``."""
    return Path(run_dir) / CHECKPOINTS_DIR / f"checkpoint-{step}"


def checkpoint_step(folder: str | os.PathLike) -> int | None:
    """The step of a ``checkpoint-<step>`` folder, or None for another name."""
    match = _CHECKPOINT.match(Path(folder).name)
    return int(match.group(1)) if match else None


def list_checkpoints(run_dir: str | os.PathLike, *, resumable: bool = True) -> list[Path]:
    """Checkpoint folders of a run, oldest first (half-written temporary folders are ignored).

    Args:
        run_dir: the run folder.
        resumable: only those that still hold the state to resume from (the newest few);
            False lists every checkpoint that holds LoRA weights.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        step = checkpoint_step(folder)
        if step is None or not folder.is_dir():
            continue
        if (folder / _RESUME_MARKER).is_file() or (not resumable and (folder / LORA_WEIGHT_NAME).is_file()):
            found.append((step, folder))
    return [folder for _, folder in sorted(found)]


def find_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """``(step, LoRA file)`` of every checkpoint that holds LoRA weights, by step."""
    return [(checkpoint_step(folder), folder / LORA_WEIGHT_NAME)
            for folder in list_checkpoints(run_dir, resumable=False) if (folder / LORA_WEIGHT_NAME).is_file()]


def _mb(n_bytes: float) -> str:
    return f"{n_bytes / 1e6:,.0f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:,.0f} kB"


def check_run_folder(run_dir: str | os.PathLike, *, need_bytes: int = 0, what: str = "run folder") -> Path:
    """Make sure ``run_dir`` is a folder we can write with room for ``need_bytes``; create it when missing.

    Run before models load: a read-only folder or a full disk must not cost an hour of training.

    Args:
        run_dir: the run folder.
        need_bytes: what the next writes need (a checkpoint with its margin); 0 skips the space check.
        what: what the folder is, for the message ("run folder", "dataset folder").

    Returns:
        The folder.

    Raises:
        RunFolderError: a file stands where the folder (or a folder above it) should be, it cannot be
            written, or its disk has less than ``need_bytes`` free.
    """
    run_dir = Path(run_dir)
    for folder in (run_dir, *run_dir.parents):
        if folder.exists() or folder.is_symlink():
            if not folder.is_dir():
                raise RunFolderError(folder, f"a file stands where the {what} (or a folder above it) should be; "
                                             f"choose another {what}, or move the file away")
            break
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=run_dir)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise RunFolderError(run_dir, f"cannot be written ({exc.strerror or exc}); choose a folder you can "
                                      "write to") from None
    free = shutil.disk_usage(run_dir).free
    if need_bytes and free < need_bytes:
        raise RunFolderError(run_dir, f"only {_mb(free)} free on its disk, and a checkpoint needs about "
                                      f"{_mb(need_bytes)}; free some space or choose a folder on another disk")
    return run_dir
