"""Memorisation: is a generated image a near-copy of one training photo?

A face embedding cannot tell: a good likeness and a copy both score high against the
person, which is the goal. What gives a copy away is the picture itself, the same
framing, pose, clothes and background. So each image is reduced to a small structural
fingerprint and compared with every training photo, mirrored too (training may flip):

1. grayscale, shrunk to 32 x 32 px (box filter: the mean of each cell), so the
   generator's fine detail, JPEG blocks and resizing do not matter;
2. minus its own Gaussian blur (sigma 4 px), so what remains are edges and shapes, not
   the plain backdrop and lighting that every studio portrait shares;
3. zero mean and unit length: the score is the normalised correlation of two such
   fingerprints (1 = the same picture, about 0 = unrelated), blind to brightness and
   contrast.

No learned weights take part, so it works as well on the tests' tiny random models as on
real ones. :data:`COPY_THRESHOLD` was calibrated with ``benchmarks/bench_evaluate.py`` on
``sample_data/`` and on the prepared crops of its photos: copies that keep the framing
(resized, JPEG quality 60-85, mirrored, squeezed to another aspect ratio, 64 px, blurred,
brightened) score 0.99 or more; different photos 0.44 or less, and 0.85 or less among the
prepared crops, which are all re-crops of one picture (two of them, aligned, are the same
crop and score 0.999: a real duplicate). Re-framed copies sit near the threshold: shifted
by 2 % 0.88-0.93, zoomed by 5 % or turned by 3 degrees 0.77-0.89. The flag is for images
that reproduce a training photo's framing, not for every image that resembles one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from PIL import Image, ImageFilter

__all__ = ["COPY_THRESHOLD", "THUMBNAIL_SIDE", "CopyIndex", "CopyMatch", "fingerprint", "fingerprint_pair", "copy_index"]

THUMBNAIL_SIDE = 32
"""Side of the grayscale thumbnail a fingerprint is made from, in px."""

COPY_THRESHOLD = 0.90
"""Correlation at or above which a generated image is flagged as a near-copy of a training photo."""

_BLUR_SIGMA = THUMBNAIL_SIDE / 8  # removes the backdrop and light, keeps the face's and clothes' shapes


def _grid(image: Image.Image) -> np.ndarray:
    gray = image.convert("L").resize((THUMBNAIL_SIDE, THUMBNAIL_SIDE), Image.BOX)
    low = gray.filter(ImageFilter.GaussianBlur(_BLUR_SIGMA))
    return np.asarray(gray, dtype=np.float64) - np.asarray(low, dtype=np.float64)


def _normalise(grid: np.ndarray) -> np.ndarray:
    v = (grid - grid.mean()).ravel()
    n = float(np.linalg.norm(v))
    return v / n if n > 0 else v  # a flat image matches nothing (correlation 0)


def fingerprint(image: Image.Image) -> np.ndarray:
    """The structural fingerprint of an image: a unit vector of ``THUMBNAIL_SIDE**2`` numbers.

    Args:
        image: a PIL image (any mode and size).

    Returns:
        The fingerprint; the dot product of two is their correlation, from -1 to 1.
    """
    return _normalise(_grid(image))


@dataclass
class CopyMatch:
    """The training photo most like one image.

    Attributes:
        photo: that photo's name (None when there are no training photos).
        similarity: the correlation of their fingerprints, the better of plain and mirrored.
        memorised: ``similarity >= threshold``: the image is a near-copy of that photo.
    """

    photo: str | None
    similarity: float
    memorised: bool


def fingerprint_pair(image: Image.Image) -> np.ndarray:
    """The fingerprints of an image and of its mirror image, as a ``2 x D`` array.

    Args:
        image: a PIL image (any mode and size).

    Returns:
        Row 0: :func:`fingerprint` of ``image``; row 1: that of ``image`` mirrored.
    """
    grid = _grid(image)
    # The box filter and the blur are symmetric, so mirroring the grid equals fingerprinting the mirror.
    return np.stack([_normalise(grid), _normalise(np.fliplr(grid))])


@dataclass
class CopyIndex:
    """Fingerprints of the training photos, each also mirrored.

    Attributes:
        names: the photos, in order.
        vectors: ``N x 2 x D``: each photo's :func:`fingerprint_pair`.
        threshold: correlation at or above which an image counts as a copy.
    """

    names: list[str]
    vectors: np.ndarray = field(repr=False)
    threshold: float = COPY_THRESHOLD

    def match(self, image: Image.Image) -> CopyMatch:
        """The nearest training photo to ``image`` and whether ``image`` is a near-copy of it.

        Args:
            image: a generated image (PIL).

        Returns:
            A :class:`CopyMatch`; with no training photos, photo None and similarity NaN.
        """
        if not self.names:
            return CopyMatch(None, float("nan"), False)
        best = (self.vectors @ fingerprint(image)).max(axis=1)  # plain or mirrored, whichever is closer
        k = int(np.argmax(best))
        sim = float(best[k])
        return CopyMatch(self.names[k], sim, sim >= self.threshold)


def copy_index(photos: Sequence[tuple[str, Image.Image | np.ndarray]], *, threshold: float = COPY_THRESHOLD) -> CopyIndex:
    """Fingerprint the training photos (and their mirror images) once, for :meth:`CopyIndex.match`.

    Args:
        photos: ``(name, photo)`` of every training photo; a photo is a PIL image or its
            :func:`fingerprint_pair` (made while a large original was loaded anyway).
        threshold: correlation at or above which an image counts as a copy.

    Returns:
        A :class:`CopyIndex`.
    """
    pairs = [p if isinstance(p, np.ndarray) else fingerprint_pair(p) for _, p in photos]
    dim = THUMBNAIL_SIDE * THUMBNAIL_SIDE
    return CopyIndex(names=[name for name, _ in photos],
                     vectors=np.stack(pairs) if pairs else np.zeros((0, 2, dim)), threshold=threshold)
