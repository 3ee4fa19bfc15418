"""What the prepare stage wrote into a dataset folder: ``.lora_helpers_manifest.json``.

The stage deletes or overwrites a file only when the manifest lists it *and* the file
still holds what the stage wrote (same SHA-256). Everything else in the folder, a
person's notes in ``images/``, a crop touched up by hand, a photo kept there by
mistake, is someone else's and is left alone. The manifest looks like::

    {
      "about": "...",
      "files": {"images/IMG_1.png": "<sha256>", "masks/IMG_1.png": "<sha256>",
                "report.csv": "<sha256>", "contact_sheet.png": "<sha256>"},
      "dropped": {"IMG_3.jpg": {"row": {<its metadata.jsonl row, caption included>},
                                "sidecar": "dropped/images/IMG_3.txt"}}
    }

``files`` maps each written file to its hash (a list of hashes only while a run is
writing, so that a crash mid-run still leaves old and new contents recognisable).
``dropped`` keeps what a photo that dropped out (rejected on a re-run, an ``--accept``
not repeated, removed from the photo folder) had: its row with the caption, and where
its ``.txt`` caption was moved (``dropped/``); both come back when the photo does.

A dataset written before the manifest existed has none: the crops, masks and reports
that its ``metadata.jsonl`` rows name (rows carrying ``"source"``, which only this stage
writes) are then taken as the stage's own.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from lora_helpers.core import fileio
from lora_helpers.core.run_folder import METADATA_FILE, read_metadata

__all__ = ["MANIFEST_FILE", "DROPPED_DIR", "REPORT_FILES", "Manifest"]

MANIFEST_FILE = ".lora_helpers_manifest.json"
DROPPED_DIR = "dropped"
REPORT_FILES = ("report.csv", "contact_sheet.png")
_ABOUT = ("files the prepare stage wrote here (path -> SHA-256) and the captions of photos that dropped out; "
          "prepare deletes or overwrites only files listed here that are unchanged")


@dataclass
class Manifest:
    """The dataset folder as the prepare stage found it, and what it owns there.

    Attributes:
        folder: the dataset folder.
        files: relative path -> hashes of the contents the stage wrote there.
        dropped: photo file name -> {"row": metadata row, "sidecar": relative path or None}.
        rows: the ``metadata.jsonl`` rows at the start of the run (empty without the file).
    """

    folder: Path
    files: dict[str, list[str]] = field(default_factory=dict)
    dropped: dict[str, dict] = field(default_factory=dict)
    rows: list[dict] = field(default_factory=list)

    @classmethod
    def read(cls, folder: str | os.PathLike) -> "Manifest":
        """Read the manifest and ``metadata.jsonl`` of ``folder`` (both may be missing).

        Args:
            folder: the dataset folder.

        Returns:
            A :class:`Manifest`; for a dataset without a manifest, one that adopts the
            files its prepare rows name.

        Raises:
            ValueError: naming the file (and line) when the manifest or metadata.jsonl
                cannot be read.
        """
        folder = Path(folder)
        meta = folder / METADATA_FILE
        rows = read_metadata(folder) if meta.is_file() else []
        path = folder / MANIFEST_FILE
        if not path.is_file():
            return cls._adopt(folder, rows, reports=meta.is_file())
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            files = {str(k): [v] if isinstance(v, str) else [str(h) for h in v] for k, v in data.get("files", {}).items()}
            dropped = {str(k): dict(v) for k, v in data.get("dropped", {}).items()}
        except (ValueError, TypeError, AttributeError) as exc:
            raise ValueError(f"{path}: unreadable ({exc}); delete it and run again (prepare then takes the files "
                             f"that {METADATA_FILE} names as its own)") from exc
        return cls(folder, files, dropped, rows)

    @classmethod
    def _adopt(cls, folder: Path, rows: list[dict], reports: bool) -> "Manifest":
        # Earlier versions always wrote metadata.jsonl beside the reports (empty when nothing passed).
        manifest = cls(folder, rows=rows)
        ours = [r for r in rows if "source" in r]
        names = [r.get(k) for r in ours for k in ("file_name", "mask_file")] + (list(REPORT_FILES) if reports else [])
        for name in names:
            path = manifest.path(name)
            if path is not None and path.is_file():
                manifest.files[name] = [fileio.sha256_file(path)]
        return manifest

    def path(self, name) -> Path | None:
        """The file a manifest or row entry names, or None when it would lie outside the folder."""
        try:
            return fileio.path_inside(self.folder, name)
        except ValueError:
            return None

    def foreign(self, name: str) -> bool:
        """True when ``name`` exists but is not (or no longer) what this stage wrote there."""
        path = self.path(name)
        if path is None:
            return True
        if not path.exists():
            return False
        return not path.is_file() or fileio.sha256_file(path) not in self.files.get(name, ())

    def has_dataset(self) -> bool:
        """Whether the folder already holds a prepared dataset (crops, or rows of any kind)."""
        return bool(self.rows) or any(name.startswith("images/") for name in self.files)

    def save(self) -> None:
        """Write the manifest atomically (a single hash is written as a string)."""
        files = {k: v[0] if len(v) == 1 else sorted(set(v)) for k, v in sorted(self.files.items())}
        fileio.write_json(self.folder / MANIFEST_FILE, {"about": _ABOUT, "files": files, "dropped": self.dropped})
