"""The face embedding in numpy gives dlib's vectors, refuses other files, and falls back to dlib."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from lora_helpers.core.images import load_image
from lora_helpers.prepare import dlib_backend
from lora_helpers.prepare.dlib_backend import RECOGNIZER_FILE, DlibBackend, face_models_dir
from lora_helpers.prepare.face_geometry import region_around
from lora_helpers.prepare.face_net import CHIP_SIZE, load_face_net
from lora_helpers.prepare.faces import detect_faces, get_backend

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
PHOTOS = ["person/astronaut_01_headshot.jpg", "person/astronaut_08_phone_exif_rotated.jpg",
          "other_person/grace_hopper_01.jpg"]


@pytest.fixture(scope="module")
def backend():
    return get_backend()


def _dlib_vector(backend, image, face) -> np.ndarray:
    """dlib's own forward pass, the way embed() called it before the numpy network."""
    crop, (x0, y0) = region_around(image, face.box, 0.6)
    l, t, r, b = face.box
    shape = backend._shape5(crop, backend._rect((l - x0, t - y0, r - x0, b - y0)))
    return np.asarray(backend._recognizer.compute_face_descriptor(crop, shape, 0), dtype=np.float32)


@pytest.mark.parametrize("name", PHOTOS)
def test_numpy_embedding_equals_dlibs_on_real_faces(backend, name):
    image = load_image(SAMPLE / name)
    face = detect_faces(image, backend=backend)[0]
    vector = backend.embed(image, face)
    assert backend._face_net() is not None  # the numpy network is the one in use
    expected = _dlib_vector(backend, image, face)
    assert vector.dtype == np.float32 and vector.shape == (128,)
    # float32 rounding apart: the vectors are ~0.1 per entry, identity is decided at distances ~0.6
    assert np.abs(vector - expected).max() < 1e-5


def test_a_file_that_is_not_the_resnet_is_refused_by_name():
    with pytest.raises(ValueError, match="shape_predictor_5_face_landmarks.dat is not dlib's face-recognition ResNet"):
        load_face_net(face_models_dir() / "shape_predictor_5_face_landmarks.dat")


def test_chip_of_the_wrong_size_is_refused():
    net = load_face_net(face_models_dir() / RECOGNIZER_FILE)
    with pytest.raises(ValueError, match="150x150"):
        net(np.zeros((CHIP_SIZE, CHIP_SIZE - 1, 3), np.uint8))


def test_backend_keeps_dlibs_forward_pass_when_the_numpy_one_disagrees(monkeypatch, caplog, backend):
    real = dlib_backend.load_face_net

    def off_by_a_little(path):
        net = real(path)
        net.fc = net.fc * 1.01  # a wrong weight somewhere: the check must notice
        return net

    monkeypatch.setattr(dlib_backend, "load_face_net", off_by_a_little)
    fresh = DlibBackend(landmarks=5)
    image = load_image(SAMPLE / PHOTOS[0])
    face = detect_faces(image, backend=backend)[0]
    with caplog.at_level(logging.WARNING):
        vector = fresh.embed(image, face)
    assert fresh._face_net() is None
    assert "differs from dlib's" in caplog.text
    np.testing.assert_allclose(vector, _dlib_vector(fresh, image, face), atol=1e-6)
