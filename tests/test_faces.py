"""Face backend: detection (small faces, no false faces on clothing), landmarks, identity."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_helpers.prepare import faces
from lora_helpers.prepare.faces import (
    SAME_PERSON_COSINE,
    Face,
    FaceBackend,
    cosine_similarity,
    detect_faces,
    face_embedding,
    get_backend,
)
from lora_helpers.core.images import load_image

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"


@pytest.fixture(scope="module")
def backend():
    return get_backend()


@pytest.fixture(scope="module")
def manifest():
    return json.loads((SAMPLE / "manifest.json").read_text())["files"]


def _iou(a, b):
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _synthetic_face(angle_deg: float, centre=(200.0, 150.0), eye_distance=60.0) -> Face:
    """A 68-point face whose eye line is rotated by ``angle_deg``."""
    rng = np.random.default_rng(0)
    pts = rng.normal(0, 1, (68, 2))
    pts[36:42] = [-eye_distance / 2, 0]  # image-left eye
    pts[42:48] = [eye_distance / 2, 0]
    pts[48], pts[54] = [-25, 60], [25, 60]  # mouth corners
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    pts = pts @ rot.T + np.array(centre)
    return Face(box=(centre[0] - 80, centre[1] - 80, centre[0] + 80, centre[1] + 100), landmarks=pts, score=1.0)


def test_face_geometry_from_landmarks():
    face = _synthetic_face(12.0)
    assert face.width == 160 and face.height == 180 and face.area == 160 * 180
    assert face.roll_degrees == pytest.approx(12.0, abs=1e-6)  # right-hand eye lower: positive
    assert _synthetic_face(-7.0).roll_degrees == pytest.approx(-7.0, abs=1e-6)
    assert face.left_eye[0] < face.right_eye[0]
    np.testing.assert_allclose(face.eye_center, (200, 150), atol=1e-9)
    # size = max(2 x eye distance, 1.8 x eye-to-mouth): here the eye distance dominates
    assert face.size == pytest.approx(120.0)
    moved = face.scaled(2.0, (10.0, -5.0))
    np.testing.assert_allclose(moved.eye_center, (410, 295))
    assert moved.size == pytest.approx(240.0)


def test_backend_is_cached_and_follows_the_protocol(backend):
    assert get_backend() is backend
    assert isinstance(backend, FaceBackend)
    with pytest.raises(ValueError, match="unknown face backend"):
        get_backend("nope")


def test_astronaut_has_one_face_and_the_suit_badge_is_not_a_face(backend):
    from skimage import data

    image = data.astronaut()
    found = detect_faces(image, backend=backend)
    assert len(found) == 1
    face = found[0]
    assert len(face.landmarks) == 68
    l, t, r, b = face.box
    for eye in (face.left_eye, face.right_eye):
        assert l < eye[0] < r and t < eye[1] < b
    assert abs(face.roll_degrees) < 10
    # Enlarged 2x, HOG alone also fires on the badge on the suit (lower left);
    # detection must still report only the face.
    big = np.asarray(Image.fromarray(image).resize((1024, 1024), Image.Resampling.BICUBIC))
    raw = backend._detector.run(big[..., 1].copy(), 0, 0.0)[0]
    assert len(raw) >= 1
    found_big = backend.detect(big)
    assert len(found_big) == 1
    assert _iou(found_big[0].box, [2 * v for v in face.box]) > 0.5


def test_small_face_in_a_12_megapixel_exif_rotated_photo(backend, manifest):
    name = "person/astronaut_08_phone_exif_rotated.jpg"
    image = load_image(SAMPLE / name)
    assert image.size == tuple(manifest[name]["size"])  # EXIF applied
    found = detect_faces(image, backend=backend)
    assert len(found) == 1
    assert _iou(found[0].box, manifest[name]["face_box"]) > 0.5
    # Landmarks refined at full resolution land on the face, not on a 4x grid.
    assert found[0].size > 300


def test_same_person_close_different_people_far(backend):
    person = [face_embedding(load_image(SAMPLE / "person" / n), backend=backend)
              for n in ("astronaut_01_headshot.jpg", "astronaut_05_mirrored_cool.jpg", "astronaut_08_phone_exif_rotated.jpg")]
    other = [face_embedding(load_image(SAMPLE / "other_person" / n), backend=backend)
             for n in ("grace_hopper_01.jpg", "grace_hopper_02.jpg")]
    assert all(e is not None and e.dtype == np.float32 and e.shape == (128,) for e in person + other)
    for i in range(len(person)):
        for j in range(i + 1, len(person)):
            assert cosine_similarity(person[i], person[j]) >= SAME_PERSON_COSINE
    assert cosine_similarity(other[0], other[1]) >= SAME_PERSON_COSINE
    for a in person:
        for b in other:
            assert cosine_similarity(a, b) < SAME_PERSON_COSINE
    # The cosine rule agrees with dlib's own Euclidean rule on these vectors.
    assert np.linalg.norm(person[0] - person[1]) < faces.DLIB_SAME_PERSON_DISTANCE
    assert np.linalg.norm(person[0] - other[0]) > faces.DLIB_SAME_PERSON_DISTANCE


def test_no_face_gives_no_embedding(backend):
    coffee = load_image(SAMPLE / "problems" / "no_face.jpg")
    assert detect_faces(coffee, backend=backend) == []
    assert face_embedding(coffee, backend=backend) is None


def test_cosine_similarity_edge_cases():
    assert cosine_similarity(np.zeros(3), np.ones(3)) == 0.0
    assert cosine_similarity(np.array([1.0, 0]), np.array([0, 2.0])) == pytest.approx(0.0)
    assert cosine_similarity(np.array([1.0, 1]), np.array([2.0, 2])) == pytest.approx(1.0)
