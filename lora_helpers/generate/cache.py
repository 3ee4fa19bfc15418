"""A size-bounded disk cache of generated images.

People re-run notebook cells and re-open the same grids many times; on a T4 every SDXL
image costs 10-30 s. The cache key is a hash of everything that changes the pixels
(base model, VAE, dtype, device, LoRA file hash and scale, prompt, negative prompt,
seed, size, steps, guidance, scheduler class and config), so a repeated request returns
the stored PNG without running the model, and any change of those misses.

Files are PNGs (lossless: a hit gives exactly the pixels that were generated) holding
their parameters as text, written atomically; the least recently used are removed when
the folder grows past ``max_bytes``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from lora_helpers.core.fileio import write_bytes
from lora_helpers.core.png import png_bytes

__all__ = ["CACHE_FORMAT_VERSION", "ImageCache", "cache_key"]

# Bump when the meaning of a key changes (e.g. a new pixel-changing parameter).
CACHE_FORMAT_VERSION = 1


def _canonical(value: Any) -> Any:
    """Make values hash the same however they were spelled (tuples/lists, 7 / 7.0)."""
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_canonical(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def cache_key(params: dict[str, Any]) -> str:
    """Return the hex SHA-256 of ``params`` (order of keys does not matter).

    Args:
        params: every parameter that changes the pixels; values must be JSON-like
            (other objects are hashed by ``str``).
    """
    payload = {"cache_format": CACHE_FORMAT_VERSION, **_canonical(params)}
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class ImageCache:
    """Generated images on disk, keyed by :func:`cache_key`, least-recently-used eviction.

    Args:
        folder: where the PNGs live (created when missing). Several processes may share it.
        max_bytes: size bound of the folder; after each ``put`` the least recently used
            files are deleted until the total fits.

    Example:
        >>> cache = ImageCache("outputs/cache", max_bytes=500_000_000)   # doctest: +SKIP
        >>> generate_images(pipe, prompts, seeds, config=cfg, cache=cache)  # doctest: +SKIP
    """

    def __init__(self, folder: str | os.PathLike, *, max_bytes: int = 1 << 30):
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.misses = 0

    def __repr__(self) -> str:
        return f"ImageCache({str(self.folder)!r}, {len(self)} images, {self.total_bytes() / 1e6:.1f} of {self.max_bytes / 1e6:.0f} MB)"

    key = staticmethod(cache_key)

    def path(self, key: str) -> Path:
        """File that holds (or would hold) the image for ``key``."""
        if len(key) < 8 or not all(c in "0123456789abcdef" for c in key):
            raise ValueError(f"not a cache key: {key!r} (use ImageCache.key(params))")
        return self.folder / key[:2] / f"{key}.png"

    def _files(self) -> list[Path]:
        return [p for p in self.folder.glob("??/*.png") if not p.name.startswith(".")]

    def __contains__(self, key: str) -> bool:
        return self.path(key).exists()

    def __len__(self) -> int:
        return len(self._files())

    def total_bytes(self) -> int:
        """Bytes used by cached images."""
        total = 0
        for p in self._files():
            try:
                total += p.stat().st_size
            except FileNotFoundError:  # evicted by another process meanwhile
                pass
        return total

    def get_bytes(self, key: str) -> bytes | None:
        """The stored PNG bytes for ``key``, or None; a hit counts as a use for eviction."""
        path = self.path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.misses += 1
            return None
        try:
            os.utime(path)  # mark as recently used
        except FileNotFoundError:
            pass
        self.hits += 1
        return data

    def get(self, key: str) -> Image.Image | None:
        """The stored image for ``key`` (fully loaded, RGB, PNG text in ``.text``), or None.

        A damaged file (a disk that filled up, a partial copy) is deleted and counts as a miss.
        """
        data = self.get_bytes(key)
        if data is None:
            return None
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
            return image
        except Exception as exc:  # noqa: BLE001 - any decode error means: regenerate
            warnings.warn(f"cache file {self.path(key)} is unreadable ({exc}); deleting it and generating again")
            self.path(key).unlink(missing_ok=True)
            self.hits -= 1
            self.misses += 1
            return None

    def put(self, key: str, image: Image.Image, params: dict[str, Any] | None = None) -> Path | None:
        """Store ``image`` under ``key`` (atomically), then evict down to ``max_bytes``.

        Args:
            key: from :func:`cache_key`.
            image: the generated picture.
            params: written into the PNG as text, so a cache file explains itself.

        Returns:
            The cache file, or None when the image alone is larger than ``max_bytes``.
        """
        text = {str(k): v if isinstance(v, str) else json.dumps(v, default=str, ensure_ascii=False)
                for k, v in (params or {}).items()}
        data = png_bytes(image, text=text)
        if len(data) > self.max_bytes:
            warnings.warn(f"image of {len(data)} bytes is larger than the cache limit ({self.max_bytes}); not cached")
            return None
        path = write_bytes(self.path(key), data)
        self.evict(keep=path)
        return path

    def evict(self, *, keep: Path | None = None) -> int:
        """Delete least recently used files until the folder fits ``max_bytes``.

        Args:
            keep: a file never to delete (the one just written).

        Returns:
            Number of files deleted.
        """
        entries = []
        for p in self._files():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_mtime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        deleted = 0
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if keep is not None and p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            deleted += 1
        return deleted

    def clear(self) -> None:
        """Delete every cached image."""
        for p in self._files():
            p.unlink(missing_ok=True)

    def touch(self, key: str, when: float | None = None) -> None:
        """Set the last-use time of ``key`` (eviction order); mostly for tests and tools."""
        when = time.time() if when is None else when
        os.utime(self.path(key), (when, when))
