"""Photo measurements for preparation: sharpness, exposure, colour, duplicates.

Every check yields a number a person can compare across photos; :func:`ramp` turns a
number into a score in [0, 1] that is 1.0 where the photo is good, 0.9 exactly at
the rejection threshold and falls to 0 beyond it. ``face_clarity_score`` is the lowest
of these scores, so the default pass line 0.9 coincides with the individual limits
and the score says which measurement limits the photo.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from lora_helpers.prepare.align import AlignSpec, face_mask, plan_alignment, warp
from lora_helpers.prepare.face_geometry import Face

__all__ = [
    "FACE_CROP_SIZE",
    "FaceMeasures",
    "ramp",
    "measure_face",
    "is_grayscale",
    "perceptual_hash",
    "hash_distance",
    "normalise_colours",
]

FACE_CROP_SIZE = 128
"""Side of the aligned face crop that sharpness and exposure are measured on.

A fixed size makes numbers comparable between a 12-MP phone photo and a 600-px scan:
the face is resampled to the same number of pixels first.
"""

_CROP_SPEC = AlignSpec(eye_x=0.5, eye_y=0.4, face_fraction=0.75, max_upscale=1e6, max_zoom=1.0, max_padding=1.0)
_CONTRAST_STD = 50.0  # grey levels; crops are brought to this contrast before the Laplacian


def ramp(value: float, zero: float, reject: float, good: float, *, log: bool = False) -> float:
    """Map a measurement to a score: 0 at ``zero``, 0.9 at ``reject``, 1.0 at ``good``.

    Works in either direction (``good`` may be below ``zero``). With ``log=True`` the
    interpolation is on the logarithm (for quantities such as sharpness that vary by
    orders of magnitude).
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return 0.0
    f = (lambda x: math.log(max(x, 1e-12))) if log else (lambda x: x)
    v, z, r, g = f(value), f(zero), f(reject), f(good)
    sign = 1.0 if g >= z else -1.0
    v, z, r, g = v * sign, z * sign, r * sign, g * sign
    if v >= g:
        return 1.0
    if v >= r:
        return 0.9 + 0.1 * (v - r) / max(g - r, 1e-12)
    if v <= z:
        return 0.0
    return 0.9 * (v - z) / max(r - z, 1e-12)


@dataclass
class FaceMeasures:
    """Measurements on the aligned face crop.

    Attributes:
        sharpness: variance of the Laplacian of the face crop at
            :data:`FACE_CROP_SIZE` px after scaling its contrast to a fixed standard
            deviation (so a dark photo is not mistaken for a blurry one).
        brightness: mean grey level of the face (0-255).
        clipped: share of face pixels whose grey level is blown out (>= 250) or
            crushed (<= 5).
        crop: the aligned face crop (RGB ``uint8``), for thumbnails and debugging.
    """

    sharpness: float
    brightness: float
    clipped: float
    crop: np.ndarray


def measure_face(image, face: Face) -> FaceMeasures:
    """Measure sharpness and exposure on an aligned, fixed-size crop of ``face``.

    Args:
        image: the upright photo (PIL image or RGB ``uint8`` array).
        face: a face in that photo.

    Returns:
        :class:`FaceMeasures`.
    """
    import cv2

    size = (FACE_CROP_SIZE, FACE_CROP_SIZE)
    iw, ih = (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size
    alignment = plan_alignment(face, (iw, ih), size, _CROP_SPEC)
    crop = warp(image, alignment, resample="linear", pad="reflect")
    # Inner face only: hair and background edges would make any photo look sharp.
    inner = cv2.erode((face_mask(face, alignment) > 200).astype(np.uint8), np.ones((5, 5), np.uint8)) > 0
    if inner.sum() < 50:
        inner = np.ones(size[::-1], bool)
    gray = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(np.float64)
    values = gray[inner]
    std = float(values.std())
    # Light smoothing first: JPEG block edges and sensor noise are not detail.
    lap = cv2.Laplacian(cv2.GaussianBlur(gray, (0, 0), 0.8), cv2.CV_64F, ksize=3)
    sharpness = float(lap[inner].var()) * (_CONTRAST_STD / max(std, 1.0)) ** 2
    # Luminance, not single channels: a rosy cheek legitimately maxes out red.
    clipped = float(np.mean((values >= 250) | (values <= 5)))
    return FaceMeasures(sharpness=sharpness, brightness=float(values.mean()), clipped=clipped, crop=crop)


def is_grayscale(image, *, tolerance: float = 2.0) -> bool:
    """True when the photo has (almost) no colour: a black-and-white photo or scan."""
    arr = np.asarray(image.resize((64, 64)) if not isinstance(image, np.ndarray) else image[:: max(1, image.shape[0] // 64), :: max(1, image.shape[1] // 64)])
    arr = arr.astype(np.int16)
    if arr.ndim == 2:
        return True
    spread = np.abs(arr[..., 0] - arr[..., 1]) + np.abs(arr[..., 1] - arr[..., 2])
    return float(spread.mean()) < tolerance


def perceptual_hash(image) -> int:
    """64-bit DCT perceptual hash (pHash) of the whole photo.

    Robust to resizing, recompression and small exposure changes; different framing
    or a different moment gives a distant hash.
    """
    import cv2

    small = image.convert("L").resize((32, 32), resample=4) if not isinstance(image, np.ndarray) else cv2.resize(
        cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image, (32, 32), interpolation=cv2.INTER_AREA
    )
    low = cv2.dct(np.asarray(small, dtype=np.float32))[:8, :8].ravel()
    bits = low > np.median(low[1:])  # the DC term (overall brightness) stays out of the median
    return int(sum(1 << i for i, b in enumerate(bits) if b))


def hash_distance(a: int, b: int) -> int:
    """Number of differing bits between two perceptual hashes (0-64)."""
    return int(bin(a ^ b).count("1"))


def normalise_colours(image: np.ndarray, *, white_balance: float = 0.5, clahe_clip: float = 1.5) -> np.ndarray:
    """Gentle white balance and local contrast, for sets shot under mixed light.

    Gray-world white balance moves the average colour part of the way to neutral
    (``white_balance``: 0 none, 1 full; gains are limited to 0.8-1.25 so a red sweater
    does not turn the face cyan). CLAHE then evens contrast on the lightness channel
    only, so colours do not shift.

    Args:
        image: RGB ``uint8`` array.
        white_balance: strength of the gray-world correction.
        clahe_clip: CLAHE clip limit (0 disables it).

    Returns:
        A new RGB ``uint8`` array.
    """
    import cv2

    out = image.astype(np.float32)
    if white_balance > 0:
        means = out.reshape(-1, 3).mean(axis=0)
        gains = np.clip(means.mean() / np.maximum(means, 1.0), 0.8, 1.25)
        out *= 1.0 + white_balance * (gains - 1.0)
    out = np.clip(out + 0.5, 0, 255).astype(np.uint8)
    if clahe_clip > 0:
        lab = cv2.cvtColor(out, cv2.COLOR_RGB2LAB)
        tiles = max(2, min(8, min(image.shape[:2]) // 64))
        lab[..., 0] = cv2.createCLAHE(clipLimit=clahe_clip, tileGridSize=(tiles, tiles)).apply(lab[..., 0])
        out = cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)
    return out
