"""Faces offline: detect, landmark and embed with one backend interface.

Preparation (crop, align, checks) and evaluation (identity likeness of generated
images) both go through :class:`FaceBackend`, so a better detector can replace dlib in
one place. The dlib backend needs no network: the HOG detector ships with dlib and the
landmark and embedding models with the ``face_recognition_models`` package.

Conventions used throughout:

* images are RGB ``uint8`` arrays ``H x W x 3`` (PIL images are accepted by the
  convenience functions);
* boxes are ``(left, top, right, bottom)`` in image pixels, landmarks ``N x 2`` ``(x, y)``;
* ``left_eye`` is the eye on the image's left (the subject's right eye), so for an
  upright face ``left_eye[0] < right_eye[0]``;
* ``roll_degrees`` is the angle of the line from ``left_eye`` to ``right_eye``; positive
  when the right-hand eye sits lower in the image (head tilted clockwise as seen).

Identity: dlib's rule is "same person when the Euclidean distance of the raw 128-d
vectors is below 0.6". Its vectors are not unit length (norm about 1.4), so the
cosine equivalent is ``1 - 0.6**2 / (2 * 1.4**2) ~= 0.91``: :data:`SAME_PERSON_COSINE`.
Same-person pairs typically score 0.94-0.99, different people 0.75-0.89.
"""

from __future__ import annotations

import importlib.util
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

__all__ = [
    "Face",
    "FaceBackend",
    "DlibBackend",
    "SAME_PERSON_COSINE",
    "DLIB_SAME_PERSON_DISTANCE",
    "get_backend",
    "detect_faces",
    "face_embedding",
    "cosine_similarity",
    "face_models_dir",
]

DLIB_SAME_PERSON_DISTANCE = 0.6
"""dlib's own rule: raw 128-d vectors closer than this (Euclidean) are the same person."""

SAME_PERSON_COSINE = 0.91
"""Cosine similarity above which two dlib embeddings are taken to be the same person."""


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


@runtime_checkable
class FaceBackend(Protocol):
    """What a face backend provides; both prepare and evaluate use only this."""

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 ``H x W x 3`` image, sorted largest first."""
        ...

    def embed(self, image, face: Face) -> np.ndarray:
        """Identity embedding (float32 vector) of ``face`` in ``image``."""
        ...


def face_models_dir() -> Path:
    """Folder holding the dlib model files from the ``face_recognition_models`` package.

    The package's ``__init__`` imports ``pkg_resources``, which new setuptools no longer
    ships, so we locate the folder without importing it.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "face_recognition_models is not installed; `pip install face-recognition-models==0.3.0`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


def _to_array(image) -> np.ndarray:
    """RGB uint8 contiguous array from a PIL image or array (gray and RGBA accepted)."""
    if not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB") if getattr(image, "mode", "RGB") != "RGB" else image)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    elif image.shape[2] == 4:
        image = image[..., :3]
    if image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {image.dtype}; convert with lora_helpers.core.images.to_rgb")
    return np.ascontiguousarray(image)


class DlibBackend:
    """dlib HOG detector, 68- or 5-point landmarks and the 128-d ResNet embedding.

    Weak detections (score below ``verify_below``) must also be found by OpenCV's Haar
    cascade, an independent detector: HOG alone fires on badges and patterns on clothing.

    Args:
        landmarks: 68 (eyes, brows, jaw, mouth: used for alignment and masks) or 5.
        min_score: HOG detections below this score are dropped.
        verify_below: detections scoring below this need Haar confirmation.
    """

    def __init__(self, *, landmarks: int = 68, min_score: float = 0.0, verify_below: float = 0.5):
        import dlib  # imported here so `import lora_helpers.prepare.faces` stays light

        if landmarks not in (5, 68):
            raise ValueError(f"landmarks must be 5 or 68, got {landmarks}")
        models = face_models_dir()
        self.n_landmarks = landmarks
        self.min_score = min_score
        self.verify_below = verify_below
        self._dlib = dlib
        self._detector = dlib.get_frontal_face_detector()
        self._shape5 = dlib.shape_predictor(str(models / "shape_predictor_5_face_landmarks.dat"))
        self._shape = (
            self._shape5 if landmarks == 5 else dlib.shape_predictor(str(models / "shape_predictor_68_face_landmarks.dat"))
        )
        self._recognizer = dlib.face_recognition_model_v1(str(models / "dlib_face_recognition_resnet_model_v1.dat"))
        self._haar = None
        self._lock = threading.Lock()  # dlib objects are not documented as thread-safe

    # -- detection -------------------------------------------------------------------
    def detect(self, image: np.ndarray, *, upsample: int = 0, min_score: float | None = None, verify: bool = True) -> list[Face]:
        """Faces in ``image``, largest first (see :class:`FaceBackend`).

        Args:
            image: RGB uint8 array.
            upsample: times to double the image inside the detector (finds smaller
                faces, about 4x slower each).
            min_score: override the backend's score threshold (negative values find
                faint faces, e.g. heavily blurred ones, and more false ones).
            verify: confirm weak detections with the Haar cascade.
        """
        import cv2

        image = _to_array(image)
        # HOG on grey is ~30 % faster than on colour and finds the same faces.
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        min_score = self.min_score if min_score is None else min_score
        with self._lock:
            rects, scores, _ = self._detector.run(gray, upsample, min(min_score, 0.0))
        faces = []
        for rect, score in zip(rects, scores):
            if score < min_score:
                continue
            box = (float(rect.left()), float(rect.top()), float(rect.right()), float(rect.bottom()))
            if verify and score < self.verify_below and not self._haar_confirms(gray, box):
                continue
            faces.append(Face(box=box, landmarks=self.landmarks(gray, box), score=float(score)))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def landmarks(self, image: np.ndarray, box: tuple[float, float, float, float], *, points: int | None = None) -> np.ndarray:
        """Landmarks (``N x 2``) for the face in ``box``; works at any image size."""
        predictor = self._shape5 if (points or self.n_landmarks) == 5 else self._shape
        if not isinstance(image, np.ndarray) or image.ndim == 3:
            image = _to_array(image)
        with self._lock:
            shape = predictor(np.ascontiguousarray(image), self._rect(box))
        return np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)

    def _rect(self, box):
        l, t, r, b = (int(round(v)) for v in box)
        return self._dlib.rectangle(l, t, r, b)

    def _haar_confirms(self, gray: np.ndarray, box) -> bool:
        import cv2

        if self._haar is None:
            self._haar = cv2.CascadeClassifier(os.path.join(cv2.data.haarcascades, "haarcascade_frontalface_alt2.xml"))
        l, t, r, b = box
        w = r - l
        # Look at the box with a margin, scaled so the face is ~100 px (Haar works from 20 px).
        x0, y0 = int(max(0, l - 0.5 * w)), int(max(0, t - 0.5 * w))
        x1, y1 = int(min(gray.shape[1], r + 0.5 * w)), int(min(gray.shape[0], b + 0.5 * w))
        crop = gray[y0:y1, x0:x1]
        if crop.size == 0:
            return False
        k = 100.0 / max(w, 1.0)
        crop = cv2.resize(crop, None, fx=k, fy=k, interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_LINEAR)
        found = self._haar.detectMultiScale(crop, scaleFactor=1.1, minNeighbors=3, minSize=(40, 40))
        for fx, fy, fw, fh in found:
            hx0, hy0 = x0 + fx / k, y0 + fy / k
            hx1, hy1 = hx0 + fw / k, hy0 + fh / k
            inter = max(0.0, min(r, hx1) - max(l, hx0)) * max(0.0, min(b, hy1) - max(t, hy0))
            union = (r - l) * (b - t) + (hx1 - hx0) * (hy1 - hy0) - inter
            if union > 0 and inter / union > 0.3:
                return True
        return False

    # -- identity ----------------------------------------------------------------------
    def embed(self, image, face: Face) -> np.ndarray:
        """128-d float32 dlib embedding of ``face``.

        The recogniser was trained on chips aligned with the 5-point model, so the
        5 points are recomputed from the box whatever landmarks ``face`` carries.
        """
        # Work on a crop around the face: cheaper than handing dlib a 12-MP frame.
        crop, (x0, y0) = _region(image, face.box, 0.6)
        l, t, r, b = face.box
        box = (l - x0, t - y0, r - x0, b - y0)
        with self._lock:
            rect = self._rect(box)
            shape = self._shape5(crop, rect)
            vec = self._recognizer.compute_face_descriptor(crop, shape, 0)
        return np.asarray(vec, dtype=np.float32)


_BACKENDS: dict[str, FaceBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def get_backend(name: str = "dlib") -> FaceBackend:
    """Return a cached face backend.

    Args:
        name: ``"dlib"`` (68-point landmarks; loading takes ~1.5 s once) or ``"dlib5"``
            (5-point landmarks: faster to load, no jaw/mouth points for masks).

    Returns:
        An object implementing :class:`FaceBackend`.
    """
    with _BACKENDS_LOCK:
        if name not in _BACKENDS:
            if name == "dlib":
                _BACKENDS[name] = DlibBackend(landmarks=68)
            elif name == "dlib5":
                _BACKENDS[name] = DlibBackend(landmarks=5)
            else:
                raise ValueError(f"unknown face backend {name!r}; choose 'dlib' or 'dlib5'")
        return _BACKENDS[name]


def _image_size(image) -> tuple[int, int]:
    return (image.shape[1], image.shape[0]) if isinstance(image, np.ndarray) else image.size


def _reduced(image, k: int) -> np.ndarray:
    """``image`` shrunk by the integer factor ``k`` (box average), as an RGB array.

    Pixel ``i`` of the result covers source pixels ``[i*k, (i+1)*k)``, so
    ``x_source = k * x_small + (k - 1) / 2`` for both PIL and arrays.
    """
    if k == 1:
        return _to_array(image)
    if isinstance(image, np.ndarray):
        import cv2

        h, w = image.shape[:2]
        # Pad to a multiple of k by edge replication so cv2's area average matches PIL's reduce.
        arr = _to_array(image)
        ph, pw = -h % k, -w % k
        if ph or pw:
            arr = np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="edge")
        return cv2.resize(arr, (arr.shape[1] // k, arr.shape[0] // k), interpolation=cv2.INTER_AREA)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return _to_array(rgb.reduce(k))


def _upsampled(image, factor: int) -> np.ndarray:
    import cv2

    arr = _to_array(image)
    return cv2.resize(arr, (arr.shape[1] * factor, arr.shape[0] * factor), interpolation=cv2.INTER_LINEAR)


def _region(image, box, margin: float) -> tuple[np.ndarray, tuple[int, int]]:
    """Array of the area around ``box`` (``margin`` x its size on each side) and its offset."""
    w, h = _image_size(image)
    l, t, r, b = box
    m = margin * max(r - l, b - t)
    x0, y0 = int(max(0, l - m)), int(max(0, t - m))
    x1, y1 = int(min(w, r + m + 1)), int(min(h, b + m + 1))
    if isinstance(image, np.ndarray):
        return _to_array(image[y0:y1, x0:x1]), (x0, y0)
    return _to_array(image.crop((x0, y0, x1, y1))), (x0, y0)


def detect_faces(image, *, backend: FaceBackend | None = None, max_side: int = 1024, **detect_kwargs) -> list[Face]:
    """Detect faces quickly in an image of any size.

    Detection runs on a copy shrunk by a whole factor to at most ``max_side`` (HOG
    cost grows with pixels); when nothing is found it tries once more at twice that
    size (or enlarged 2x for small images), which finds a face a tenth of the width
    of a 12-MP frame. Boxes and landmarks are mapped back to the full image and the
    landmarks recomputed there on a crop around each face, when the backend can.

    Args:
        image: PIL image or RGB uint8 array (PIL avoids converting a 12-MP frame).
        backend: a :class:`FaceBackend`; default :func:`get_backend`.
        max_side: longest side used for the first detection pass.
        **detect_kwargs: passed to ``backend.detect`` (dlib: ``min_score``, ``verify``).

    Returns:
        Faces in full-image pixels, largest first (empty when there are none).
    """
    backend = backend or get_backend()
    if not isinstance(image, np.ndarray) and image.mode != "RGB":
        image = image.convert("RGB")
    longest = max(_image_size(image))
    k1 = max(1, math.ceil(longest / max_side))
    # (shrink factor, enlarge factor) per pass
    passes = [(k1, 1), (max(1, math.ceil(longest / (2 * max_side))), 1) if k1 > 1 else (1, 2)]
    faces: list[Face] = []
    for k, up in passes:
        small = _reduced(image, k) if up == 1 else _upsampled(image, up)
        faces = backend.detect(small, **detect_kwargs)
        if faces:
            break
    if not faces:
        return []
    if up > 1:
        faces = [f.scaled(1.0 / up, (0.5 / up - 0.5, 0.5 / up - 0.5)) for f in faces]
    elif k > 1:
        faces = [f.scaled(float(k), ((k - 1) / 2.0, (k - 1) / 2.0)) for f in faces]
        refine = getattr(backend, "landmarks", None)
        if refine is not None:
            refined = []
            for f in faces:
                region, (x0, y0) = _region(image, f.box, 0.25)
                box = (f.box[0] - x0, f.box[1] - y0, f.box[2] - x0, f.box[3] - y0)
                refined.append(Face(box=f.box, landmarks=refine(region, box) + np.array([x0, y0]), score=f.score))
            faces = refined
    faces.sort(key=lambda f: f.area, reverse=True)
    return faces


def face_embedding(image, face: Face | None = None, *, backend: FaceBackend | None = None) -> np.ndarray | None:
    """Identity embedding of ``face`` (default: the largest face) in ``image``.

    Args:
        image: PIL image or RGB uint8 array.
        face: a face found in this image; None detects and takes the largest.
        backend: a :class:`FaceBackend`; default :func:`get_backend`.

    Returns:
        A float32 vector, or None when the image has no face.
    """
    backend = backend or get_backend()
    if face is None:
        faces = detect_faces(image, backend=backend)
        if not faces:
            return None
        face = faces[0]
    if not isinstance(backend, DlibBackend):
        image = _to_array(image)
    return np.asarray(backend.embed(image, face), dtype=np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0.0 when either is all zeros)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else 0.0
