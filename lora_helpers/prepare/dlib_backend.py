"""The dlib face backend: HOG detection, 68- or 5-point landmarks, the 128-d ResNet embedding.

It needs no network: the HOG detector ships with dlib, the landmark and embedding models
with the ``face_recognition_models`` package (:func:`face_models_dir`). Weak detections are
confirmed by OpenCV's Haar cascade. The embedding network runs in numpy
(:mod:`lora_helpers.prepare.face_net`, 7x faster than dlib's BLAS-less build) once it has
given dlib's own vector on a test chip. Callers go through :mod:`lora_helpers.prepare.faces`
(``get_backend``, ``detect_faces``), which works with any backend of that interface.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import threading
from pathlib import Path

import numpy as np

from lora_helpers.prepare.face_geometry import Face, region_around, rgb_array
from lora_helpers.prepare.face_net import CHIP_SIZE, FaceNet, load_face_net

__all__ = ["DlibBackend", "face_models_dir"]

log = logging.getLogger(__name__)
RECOGNIZER_FILE = "dlib_face_recognition_resnet_model_v1.dat"


def face_models_dir() -> Path:
    """Folder holding the dlib model files from the ``face_recognition_models`` package.

    The package's ``__init__`` imports ``pkg_resources``, which new setuptools no longer
    ships, so we locate the folder without importing it.

    Returns:
        The package's ``models`` folder.

    Raises:
        ModuleNotFoundError: the package is not installed.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "face_recognition_models is not installed; `pip install face-recognition-models==0.3.0`"
        )
    return Path(list(spec.submodule_search_locations)[0]) / "models"


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
        self._recognizer = dlib.face_recognition_model_v1(str(models / RECOGNIZER_FILE))
        self._net: FaceNet | None | bool = False  # False: not tried yet; None: dlib's own forward pass
        self._haar = None
        self._lock = threading.Lock()  # dlib objects are not documented as thread-safe

    # -- detection -------------------------------------------------------------------
    def detect(self, image: np.ndarray, *, upsample: int = 0, min_score: float | None = None, verify: bool = True,
               landmarks: bool = True) -> list[Face]:
        """Faces in ``image``, largest first (see :class:`lora_helpers.prepare.faces.FaceBackend`).

        Args:
            image: RGB uint8 array.
            upsample: times to double the image inside the detector (finds smaller
                faces, about 4x slower each).
            min_score: override the backend's score threshold (negative values find
                faint faces, e.g. heavily blurred ones, and more false ones).
            verify: confirm weak detections with the Haar cascade.
            landmarks: False leaves each face's landmarks empty, for a caller that
                computes them itself (on a larger copy of the image).
        """
        import cv2

        image = rgb_array(image)
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
            points = self.landmarks(gray, box) if landmarks else np.empty((0, 2))
            faces.append(Face(box=box, landmarks=points, score=float(score)))
        faces.sort(key=lambda f: f.area, reverse=True)
        return faces

    def landmarks(self, image: np.ndarray, box: tuple[float, float, float, float], *, points: int | None = None) -> np.ndarray:
        """Landmarks (``N x 2``) for the face in ``box``; works at any image size."""
        predictor = self._shape5 if (points or self.n_landmarks) == 5 else self._shape
        if not isinstance(image, np.ndarray) or image.ndim == 3:
            image = rgb_array(image)
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
        crop, (x0, y0) = region_around(image, face.box, 0.6)
        l, t, r, b = face.box
        box = (l - x0, t - y0, r - x0, b - y0)
        with self._lock:
            shape = self._shape5(crop, self._rect(box))
            net = self._face_net()
            if net is None:
                return np.asarray(self._recognizer.compute_face_descriptor(crop, shape, 0), dtype=np.float32)
            # dlib's compute_face_descriptor cuts this same chip (size 150, padding 0.25)
            chip = self._dlib.get_face_chip(crop, shape, CHIP_SIZE, 0.25)
        return net(chip)

    def _face_net(self) -> FaceNet | None:
        """The numpy embedding network once it matches dlib's on a test chip, else None (call under the lock)."""
        if self._net is False:
            self._net = None
            try:
                net = load_face_net(face_models_dir() / RECOGNIZER_FILE)
                # A smooth random chip: any difference in layers or weights shows in the vector.
                noise = np.random.default_rng(0).integers(0, 256, (CHIP_SIZE // 10, CHIP_SIZE // 10, 3), dtype=np.uint8)
                chip = np.ascontiguousarray(np.kron(noise, np.ones((10, 10, 1), np.uint8)))
                expected = np.asarray(self._recognizer.compute_face_descriptor(chip), dtype=np.float32)
                if np.abs(net(chip) - expected).max() < 1e-4:
                    self._net = net
                else:
                    log.warning("the numpy face embedding differs from dlib's; using dlib's (slower)")
            except (OSError, ValueError) as exc:
                log.warning("cannot run the face embedding in numpy (%s); using dlib's (slower)", exc)
        return self._net
