"""Faces offline: detect, landmark and embed with one backend interface.

Preparation (crop, align, checks) and evaluation (identity likeness of generated
images) both go through :class:`FaceBackend`, so a better detector can replace dlib in
one place. This module is where callers get faces from: :func:`get_backend`,
:func:`detect_faces` (fast on 12-MP photos), :func:`face_embedding` and the identity
rule. :class:`~lora_helpers.prepare.face_geometry.Face` and its conventions live in
:mod:`lora_helpers.prepare.face_geometry`, the dlib backend in
:mod:`lora_helpers.prepare.dlib_backend`; both names are importable from here too.

Identity: dlib's rule is "same person when the Euclidean distance of the raw 128-d
vectors is below 0.6". Its vectors are not unit length (norm about 1.4), so the
cosine equivalent is ``1 - 0.6**2 / (2 * 1.4**2) ~= 0.91``: :data:`SAME_PERSON_COSINE`.
Same-person pairs typically score 0.94-0.99, different people 0.75-0.89.
"""

from __future__ import annotations

import math
import threading
from typing import Protocol, runtime_checkable

import numpy as np

from lora_helpers.prepare.dlib_backend import DlibBackend, face_models_dir
from lora_helpers.prepare.face_geometry import Face, image_size, region_around, rgb_array

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


@runtime_checkable
class FaceBackend(Protocol):
    """What a face backend provides; both prepare and evaluate use only this."""

    def detect(self, image: np.ndarray) -> list[Face]:
        """Faces in an RGB uint8 ``H x W x 3`` image, sorted largest first."""
        ...

    def embed(self, image, face: Face) -> np.ndarray:
        """Identity embedding (float32 vector) of ``face`` in ``image``."""
        ...


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


def _reduced(image, k: int) -> np.ndarray:
    """``image`` shrunk by the integer factor ``k`` (box average), as an RGB array.

    Pixel ``i`` of the result covers source pixels ``[i*k, (i+1)*k)``, so
    ``x_source = k * x_small + (k - 1) / 2`` for both PIL and arrays.
    """
    if k == 1:
        return rgb_array(image)
    if isinstance(image, np.ndarray):
        import cv2

        h, w = image.shape[:2]
        # Pad to a multiple of k by edge replication so cv2's area average matches PIL's reduce.
        arr = rgb_array(image)
        ph, pw = -h % k, -w % k
        if ph or pw:
            arr = np.pad(arr, ((0, ph), (0, pw), (0, 0)), mode="edge")
        return cv2.resize(arr, (arr.shape[1] // k, arr.shape[0] // k), interpolation=cv2.INTER_AREA)
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return rgb_array(rgb.reduce(k))


def _upsampled(image, factor: int) -> np.ndarray:
    import cv2

    arr = rgb_array(image)
    return cv2.resize(arr, (arr.shape[1] * factor, arr.shape[0] * factor), interpolation=cv2.INTER_LINEAR)


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
    longest = max(image_size(image))
    k1 = max(1, math.ceil(longest / max_side))
    # (shrink factor, enlarge factor) per pass
    passes = [(k1, 1), (max(1, math.ceil(longest / (2 * max_side))), 1) if k1 > 1 else (1, 2)]
    faces: list[Face] = []
    for k, up in passes:
        small = _reduced(image, k) if up == 1 else _upsampled(image, up)
        # dlib's landmarks on a shrunk copy would be recomputed at full size below: skip them.
        skip = {"landmarks": False} if k > 1 and up == 1 and isinstance(backend, DlibBackend) else {}
        faces = backend.detect(small, **skip, **detect_kwargs)
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
                region, (x0, y0) = region_around(image, f.box, 0.25)
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
        image = rgb_array(image)
    return np.asarray(backend.embed(image, face), dtype=np.float32)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine similarity of two vectors (0.0 when either is all zeros)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    denom = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / denom) if denom > 0 else 0.0
