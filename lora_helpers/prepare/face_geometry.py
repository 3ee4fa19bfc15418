"""One detected face and the pixel geometry around it.

:class:`Face` holds a detection (box, landmarks, score) and derives what alignment and the
checks need from it: eye and mouth centres, roll, a size robust to turning and nodding.
The array helpers give backends one way to turn a PIL image or array into the RGB
``uint8`` array they work on, whole or around a face.

Conventions used throughout:

* images are RGB ``uint8`` arrays ``H x W x 3`` (PIL images are accepted by the
  convenience functions);
* boxes are ``(left, top, right, bottom)`` in image pixels, landmarks ``N x 2`` ``(x, y)``;
* ``left_eye`` is the eye on the image's left (the subject's right eye), so for an
  upright face ``left_eye[0] < right_eye[0]``;
* ``roll_degrees`` is the angle of the line from ``left_eye`` to ``right_eye``; positive
  when the right-hand eye sits lower in the image (head tilted clockwise as seen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

__all__ = ["Face", "rgb_array", "image_size", "region_around"]


@dataclass
class Face:
    """One detected face.

    Attributes:
        box: ``(left, top, right, bottom)`` in image pixels.
        landmarks: ``N x 2`` float array of ``(x, y)`` in image pixels, 68-point
            (iBUG 300-W order) or 5-point (dlib order) landmarks.
        score: detector confidence (dlib HOG: about 0 at the detection threshold,
            1-3 for clear frontal faces).
    """

    box: tuple[float, float, float, float]
    landmarks: np.ndarray = field(repr=False)
    score: float = 0.0

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return max(self.width, 0.0) * max(self.height, 0.0)

    @property
    def left_eye(self) -> np.ndarray:
        """Centre of the eye on the image's left (the subject's right eye)."""
        pts = np.asarray(self.landmarks, dtype=np.float64)
        if len(pts) >= 68:
            return pts[36:42].mean(axis=0)
        return pts[2:4].mean(axis=0)  # dlib 5-point: 2,3 = outer/inner corner of that eye

    @property
    def right_eye(self) -> np.ndarray:
        """Centre of the eye on the image's right (the subject's left eye)."""
        pts = np.asarray(self.landmarks, dtype=np.float64)
        if len(pts) >= 68:
            return pts[42:48].mean(axis=0)
        return pts[0:2].mean(axis=0)

    @property
    def eye_center(self) -> np.ndarray:
        """Midpoint between the two eye centres."""
        return (self.left_eye + self.right_eye) / 2.0

    @property
    def mouth_center(self) -> np.ndarray:
        """Centre of the mouth; estimated from the nose tip for 5-point landmarks."""
        pts = np.asarray(self.landmarks, dtype=np.float64)
        if len(pts) >= 68:
            return (pts[48] + pts[54]) / 2.0
        # Eye-to-nose-tip is about 0.6 of eye-to-mouth on an average face.
        return self.eye_center + (pts[4] - self.eye_center) / 0.6

    @property
    def roll_degrees(self) -> float:
        """Angle of the eye line in degrees; positive when the right-hand eye is lower."""
        d = self.right_eye - self.left_eye
        return math.degrees(math.atan2(d[1], d[0]))

    @property
    def size(self) -> float:
        """Face scale in pixels, robust to turning and nodding (FFHQ-style).

        ``max(2 x eye distance, 1.8 x eye-to-mouth distance)``: about the width of the
        face; the eye distance shrinks when the head turns, eye-to-mouth when it nods.
        """
        e2e = float(np.linalg.norm(self.right_eye - self.left_eye))
        e2m = float(np.linalg.norm(self.mouth_center - self.eye_center))
        return max(2.0 * e2e, 1.8 * e2m)

    def scaled(self, factor: float, offset: tuple[float, float] = (0.0, 0.0)) -> "Face":
        """Return this face in another frame: ``x' = x * factor + offset``."""
        ox, oy = offset
        l, t, r, b = self.box
        box = (l * factor + ox, t * factor + oy, r * factor + ox, b * factor + oy)
        lm = np.asarray(self.landmarks, dtype=np.float64) * factor + np.array([ox, oy])
        return Face(box=box, landmarks=lm, score=self.score)


def rgb_array(image) -> np.ndarray:
    """RGB uint8 contiguous array from a PIL image or array.

    Args:
        image: PIL image (any mode) or ``uint8`` array (grey, RGB or RGBA).

    Returns:
        A C-contiguous ``H x W x 3`` ``uint8`` array.

    Raises:
        ValueError: for an array of another dtype.
    """
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    elif image.shape[2] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}; convert with lora_helpers.core.images.to_rgb")
    return np.ascontiguousarray(image)


def image_size(image) -> tuple[int, int]:
    """``(width, height)`` of a PIL image or an array."""
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def region_around(image, box: tuple[float, float, float, float], margin: float) -> tuple[np.ndarray, tuple[int, int]]:
    """The area around a box, cut out as an RGB array.

    Args:
        image: PIL image or RGB array.
        box: ``(left, top, right, bottom)`` in image pixels.
        margin: added on each side, as a share of the box's larger side; clipped at the edges.

    Returns:
        ``(array, (x0, y0))``: the region and its top-left corner in the image.
    """
    w, h = image_size(image)
    l, t, r, b = box
    m = margin * max(r - l, b - t)
    x0, y0 = int(max(0, l - m)), int(max(0, t - m))
    x1, y1 = int(min(w, r + m + 1)), int(min(h, b + m + 1))
    if isinstance(image, np.ndarray):
        return rgb_array(image[y0:y1, x0:x1]), (x0, y0)
    return rgb_array(image.crop((x0, y0, x1, y1))), (x0, y0)
