"""Atomic file writing: every file we write appears whole or not at all.

A Colab disconnect or a killed process mid-write must never leave a half-written
checkpoint, caption or image behind, so we write to a temporary name in the same
folder and rename (rename is atomic on one filesystem).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator

from lora_helpers.core.png import png_bytes

__all__ = [
    "atomic_path",
    "atomic_dir",
    "write_bytes",
    "write_text",
    "write_json",
    "write_jsonl",
    "read_jsonl",
    "save_image",
    "sha256_file",
    "path_inside",
]


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    Args:
        path: the final file path.
        suffix: suffix for the temporary name (some writers pick the format from it);
            defaults to the final path's suffix.

    Yields:
        The temporary path to write to. On an exception it is removed and ``path``
        is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temp name keeps the real suffix so writers that pick a format from it work.
    fd, tmp = tempfile.mkstemp(
        prefix=f".{path.name}.tmp.", suffix=suffix if suffix is not None else path.suffix, dir=path.parent
    )
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600 files; outputs should be readable like any other
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; move it to ``path`` on success.

    An existing folder at ``path`` is replaced only after the new one is complete.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / "x")
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically and return the path."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically and return the path."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON atomically and return the path."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    """Write one JSON object per line atomically and return the path."""
    return write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read a JSON-lines file; blank lines are skipped.

    Raises:
        ValueError: naming the file and line when a line is not valid JSON.
    """
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {i}: not valid JSON ({exc.msg}); fix or delete that line") from exc
    return rows


def save_image(path: str | os.PathLike, image, **save_kwargs) -> Path:
    """Save a PIL image atomically; the format follows the final suffix.

    A PNG without extra save options goes through :func:`lora_helpers.core.png.png_bytes`
    (several times faster than PIL's encoder, same pixels).
    """
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP"}.get(path.suffix.lower(), None)
    if fmt == "PNG" and not save_kwargs:
        return write_bytes(path, png_bytes(image))
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)
    return path


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Return the hex SHA-256 of a file, read in chunks."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def path_inside(folder: str | os.PathLike, name: str) -> Path:
    """``folder / name``, provided ``name`` is a relative path that stays inside ``folder``.

    Dataset files (metadata.jsonl rows, manifests) name other files; a shared or downloaded
    dataset must not make us read or write outside its folder through them.

    Args:
        folder: the folder the path must stay in.
        name: a relative path such as "images/a.png".

    Returns:
        ``Path(folder) / name``.

    Raises:
        ValueError: ``name`` is empty, absolute, holds "..", or leads outside through a link;
            the message says which (the caller adds the file and line).
    """
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{name!r} is not a file name")
    # Both flavours: a row written on Windows ("..\\x.png", "C:x.png") must not slip through.
    for flavour in (PurePosixPath(name), PureWindowsPath(name)):
        if flavour.is_absolute() or flavour.anchor or ".." in flavour.parts:
            raise ValueError(f"{name!r} is not a path inside the folder (absolute, or with '..')")
    path = Path(folder) / name
    if not path.resolve().is_relative_to(Path(folder).resolve()):
        raise ValueError(f"{name!r} leads outside the folder through a link")
    return path
