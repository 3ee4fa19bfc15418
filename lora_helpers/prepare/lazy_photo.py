"""Large photos without the up-front cost of EXIF rotation.

Rotating a 12-MP phone photo upright costs about as much as finding its face, yet
preparation only needs a reduced copy (for detection) and the few regions under the
crops. :class:`LazyPhoto` keeps the pixels as stored and offers the PIL methods the
pipeline uses (``size``, ``mode``, ``crop``, ``reduce``, ``convert``) in upright
coordinates, rotating only what is asked for. The aligned crop goes further and folds
the rotation into its own transform (:meth:`LazyPhoto.region_array`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from lora_helpers.core.images import load_image

__all__ = ["LazyPhoto", "open_photo"]

_METHODS = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE",
            6: "ROTATE_270", 7: "TRANSVERSE", 8: "ROTATE_90"}
LARGE_PIXELS = 4_000_000


class LazyPhoto:
    """A decoded photo plus its EXIF orientation, seen upright.

    Args:
        raw: the fully loaded RGB image as stored in the file.
        orientation: EXIF orientation tag (1-8).
    """

    def __init__(self, raw: Image.Image, orientation: int = 1):
        self.raw, self.mode = raw, raw.mode
        self.method = getattr(Image.Transpose, _METHODS[orientation]) if orientation in _METHODS else None
        w, h = raw.size
        self.size = (h, w) if orientation in (5, 6, 7, 8) else (w, h)
        self.width, self.height = self.size
        self._edges = self._edge_map()  # raw pixel-edge coordinates -> upright ones (3x3)
        self._to_raw = np.linalg.inv(self._edges)
        self._reduced: dict[int, Image.Image] = {}

    def _edge_map(self) -> np.ndarray:
        if self.method is None:
            return np.eye(3)
        # Transpose a 2x2 probe to see where each raw corner ends up.
        probe = Image.frombytes("L", (2, 2), bytes([0, 1, 2, 3])).transpose(self.method).tobytes()
        where = {value: (i % 2, i // 2) for i, value in enumerate(probe)}
        w, h = self.raw.size
        src = np.array([[0.0, 0.0], [w, 0.0], [0.0, h]])
        dst = np.array([[where[(x > 0) + 2 * (y > 0)][0] * self.width, where[(x > 0) + 2 * (y > 0)][1] * self.height]
                        for x, y in src])
        m = np.linalg.solve(np.hstack([src, np.ones((3, 1))]), dst)  # 3x2: [x y 1] @ m
        return np.vstack([m.T, [0.0, 0.0, 1.0]])

    def _upright(self, image: Image.Image) -> Image.Image:
        return image if self.method is None else image.transpose(self.method)

    def _raw_box(self, box) -> tuple[int, int, int, int]:
        x0, y0, x1, y1 = box
        pts = np.array([[x0, y0, 1], [x1, y0, 1], [x0, y1, 1], [x1, y1, 1]], float) @ self._to_raw.T
        return (round(pts[:, 0].min()), round(pts[:, 1].min()), round(pts[:, 0].max()), round(pts[:, 1].max()))

    def crop(self, box) -> Image.Image:
        """``box`` (upright pixel edges) of the upright photo, like ``Image.crop``."""
        return self._upright(self.raw.crop(self._raw_box(box)))

    def reduce(self, k: int) -> Image.Image:
        """The upright photo shrunk by an integer factor (cached: detection and thumbnails share it)."""
        if k not in self._reduced:
            self._reduced[k] = self._upright(self.raw.reduce(k))
        return self._reduced[k]

    def convert(self, mode: str) -> Image.Image:
        return self._upright(self.raw).convert(mode)

    def region_array(self, box) -> tuple[np.ndarray, np.ndarray]:
        """The stored pixels under an upright ``box`` and where they belong.

        Returns:
            ``(array, matrix)``: the region as stored (not rotated) and the 3x3 affine
            from its pixel centres to upright pixel centres.
        """
        rx0, ry0, rx1, ry1 = self._raw_box(box)
        array = np.asarray(self.raw.crop((rx0, ry0, rx1, ry1)))
        a, t = self._edges[:2, :2], self._edges[:2, 2]
        # centre = edge - 0.5 on both sides of the map
        shift = a @ np.array([rx0 + 0.5, ry0 + 0.5]) + t - 0.5
        return array, np.vstack([np.hstack([a, shift[:, None]]), [0.0, 0.0, 1.0]])


def open_photo(path: str | os.PathLike):
    """Load a photo upright: a :class:`LazyPhoto` for large RGB JPEGs, else :func:`load_image`.

    Raises:
        ImageLoadError: as :func:`lora_helpers.core.images.load_image` does.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            if im.format == "JPEG" and im.mode == "RGB" and LARGE_PIXELS <= im.width * im.height <= 120_000_000:
                orientation = im.getexif().get(0x0112, 1)
                im.load()
                return LazyPhoto(im, orientation if orientation in range(1, 9) else 1)
    except Exception:  # anything odd: the careful loader reports it properly
        pass
    return load_image(path)
