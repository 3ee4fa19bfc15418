"""``files.upload`` returns {name: bytes} of the files in $FAKE_COLAB_UPLOADS (as if chosen in the
browser); ``files.download`` appends the path to $FAKE_COLAB_DOWNLOADS/downloads.txt."""

import os
from pathlib import Path


def upload(target_dir=None):
    folder = os.environ.get("FAKE_COLAB_UPLOADS")
    if not folder:
        return {}
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir()) if p.is_file()}


def download(filename):
    if not Path(filename).is_file():
        raise FileNotFoundError(f"Cannot find file: {filename}")
    folder = os.environ.get("FAKE_COLAB_DOWNLOADS")
    if folder:
        with open(Path(folder) / "downloads.txt", "a", encoding="utf-8") as log:
            log.write(str(filename) + "\n")
