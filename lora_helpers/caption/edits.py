"""Which caption of an image is current, when its ``.txt`` sidecar and ``metadata.jsonl`` disagree.

A person may edit a caption in either file (the notebook's editor writes both). The
caption stage records the caption it wrote for each image (``"written"`` in
``caption_config.json``), so a file that differs from that record holds a hand edit,
and the hand edit wins, whichever file it was made in. When both files were edited
and differ, nobody can tell which one is meant: both stay as they are and the image
is named until a person makes them agree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from lora_helpers.core.run_folder import read_caption_config

__all__ = ["WRITTEN_KEY", "CurrentCaption", "written_captions", "current_caption"]

WRITTEN_KEY = "written"  # caption_config.json: {file_name: the caption the stage last wrote}


@dataclass
class CurrentCaption:
    """The caption an image has now.

    Attributes:
        text: the caption to use ("" for an emptied file); None when there is none.
        problem: why no caption can be used (both files edited differently, an unreadable
            sidecar); None when there is no problem.
        edited: "sidecar" or "metadata" when a hand edit in that file wins over the other.
    """

    text: str | None
    problem: str | None = None
    edited: str | None = None


def written_captions(dataset_dir: str | os.PathLike) -> dict[str, str]:
    """What the caption stage last wrote per image, from ``caption_config.json``.

    Args:
        dataset_dir: the dataset folder.

    Returns:
        ``{file_name: caption}``; empty for a dataset captioned before this was recorded.
    """
    written = read_caption_config(dataset_dir).get(WRITTEN_KEY)
    if not isinstance(written, dict):
        return {}
    return {str(k): v for k, v in written.items() if isinstance(v, str)}


def current_caption(sidecar_name: str, sidecar: str | None, sidecar_problem: str | None, row_text,
                    written: str | None) -> CurrentCaption:
    """Decide which caption of one image is current.

    Args:
        sidecar_name: the sidecar's path relative to the dataset (for messages).
        sidecar: the stripped text of the ``.txt`` file; None when there is none.
        sidecar_problem: why the ``.txt`` file cannot be read, or None.
        row_text: the row's "text" in ``metadata.jsonl`` (None when absent).
        written: what the caption stage last wrote for this image; None when unknown.

    Returns:
        A :class:`CurrentCaption`.
    """
    if sidecar_problem:
        return CurrentCaption(None, sidecar_problem)
    meta = row_text.strip() if isinstance(row_text, str) and row_text.strip() else None
    if sidecar is None or meta is None or sidecar == meta:
        return CurrentCaption(sidecar if sidecar is not None else meta)
    if written is not None and meta == written.strip():
        return CurrentCaption(sidecar, edited="sidecar")
    if written is not None and sidecar == written.strip():
        return CurrentCaption(meta, edited="metadata")
    how = "were both edited and differ" if written is not None else "differ and nothing records which was edited"
    return CurrentCaption(None, f"{sidecar_name} and the 'text' of its row in metadata.jsonl {how}; make them "
                                "the same (or delete the .txt file), then run again")

