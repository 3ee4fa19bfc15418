"""The sample photos in sample_data/ are what the pipeline's tests and notebooks rely on.

These tests check that each file is what manifest.json says it is: subject photos load
upright through ``lora_helpers.core.images.load_image`` with exactly one face where the
manifest expects it, and each problem file trips the loader the way it should.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_helpers.core.images import ImageLoadError, list_images, load_image

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
MANIFEST = json.loads((SAMPLE / "manifest.json").read_text(encoding="utf-8"))["files"]
NOT_LISTED = {"make_sample_data.py", "README.md", "manifest.json"}

FACE_PHOTOS = sorted(k for k, v in MANIFEST.items() if v["role"] in ("subject", "other"))
UNREADABLE = ["problems/truncated.jpg", "problems/empty.jpg", "problems/not_an_image.jpg", "problems/notes.txt"]


@pytest.fixture(scope="module")
def hog():
    dlib = pytest.importorskip("dlib")
    return dlib.get_frontal_face_detector()


def _faces(detector, image: Image.Image, upsample: int = 0) -> list[tuple[float, float, float, float]]:
    """dlib HOG boxes (left, top, right, bottom) in ``image`` pixels, found on a <=1024 px copy."""
    scale = min(1.0, 1024 / max(image.size))
    small = image
    if scale < 1.0:
        small = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
    dets = detector(np.asarray(small), upsample)
    return [(d.left() / scale, d.top() / scale, d.right() / scale, d.bottom() / scale) for d in dets]


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def _dhash(image: Image.Image) -> np.ndarray:
    g = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BOX), np.int16)
    return (g[:, 1:] > g[:, :-1]).flatten()


def test_manifest_lists_every_file_and_nothing_else():
    on_disk = {
        p.relative_to(SAMPLE).as_posix()
        for p in SAMPLE.rglob("*")
        if p.is_file() and p.name not in NOT_LISTED and "__pycache__" not in p.parts
    }
    assert on_disk == set(MANIFEST)
    roles = {v["role"] for v in MANIFEST.values()}
    assert roles == {"subject", "other", "problem"}
    assert 6 <= sum(v["role"] == "subject" for v in MANIFEST.values()) <= 8


def test_sample_data_stays_small():
    total = sum(p.stat().st_size for p in SAMPLE.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert total < 5_000_000, f"sample_data/ is {total / 1e6:.2f} MB"


@pytest.mark.parametrize("rel", FACE_PHOTOS)
def test_face_photo_loads_upright_with_exactly_one_face(rel, hog):
    entry = MANIFEST[rel]
    image = load_image(SAMPLE / rel)
    assert image.mode == "RGB"
    assert list(image.size) == entry["size"]
    faces = _faces(hog, image)
    assert len(faces) == 1, f"{rel}: dlib HOG found {len(faces)} faces"
    # The detector's box lands where the manifest says: proves the photo is upright.
    assert _iou(faces[0], entry["face_box"]) > 0.4


def test_exif_rotated_phone_photo_needs_exif_to_be_upright(hog):
    rel = next(k for k, v in MANIFEST.items() if v.get("exif_orientation"))
    entry = MANIFEST[rel]
    with Image.open(SAMPLE / rel) as raw:
        assert raw.getexif().get(0x0112) == entry["exif_orientation"] == 6
        assert list(raw.size) == entry["stored_size"] == [3000, 4000]
        sideways = raw.convert("RGB")
    upright = load_image(SAMPLE / rel)
    assert upright.size == (4000, 3000)  # landscape only once EXIF is applied
    assert max(upright.size) * min(upright.size) >= 11_000_000
    face = entry["face_box"]
    assert 0.08 <= (face[2] - face[0]) / upright.width <= 0.13
    assert (face[0] + face[2]) / 2 < 0.4 * upright.width  # off-centre
    assert _faces(hog, sideways) == []  # ignoring EXIF loses the face


@pytest.mark.parametrize("rel", UNREADABLE[:3])
def test_unreadable_files_raise_image_load_error(rel):
    with pytest.raises(ImageLoadError) as info:
        load_image(SAMPLE / rel)
    assert Path(rel).name in str(info.value)
    assert MANIFEST[rel]["loads"] is False


def test_list_images_skips_the_text_file_but_not_the_fake_jpeg():
    names = {p.name for p in list_images(SAMPLE / "problems")}
    assert "notes.txt" not in names and "not_an_image.jpg" in names
    assert "notes.txt" in {p.name for p in list_images(SAMPLE / "problems", include_all_files=True)}


@pytest.mark.parametrize("kind", ["grayscale", "cmyk", "sixteen_bit", "rgba"])
def test_odd_colour_modes_load_as_8_bit_rgb(kind):
    rel = next(k for k, v in MANIFEST.items() if v["problem"] == kind)
    with Image.open(SAMPLE / rel) as raw:
        assert raw.mode == MANIFEST[rel]["mode"]
    image = load_image(SAMPLE / rel)
    arr = np.asarray(image)
    assert image.mode == "RGB" and arr.dtype == np.uint8
    assert list(image.size) == MANIFEST[rel]["size"]
    assert 20 < arr.std() and 60 < arr.mean() < 200, "washed out or crushed: bad bit-depth/colour conversion"
    if kind in ("grayscale", "sixteen_bit"):
        assert (arr[..., 0] == arr[..., 1]).all() and (arr[..., 1] == arr[..., 2]).all()
    if kind == "sixteen_bit":
        assert arr.max() >= 250 and arr.min() <= 5  # the full 16-bit range maps to the full 8-bit range
    if kind == "rgba":
        assert (arr[0, 0] == 255).all() and (arr[-1, -1] == 255).all()  # transparent corners -> white
    if kind == "cmyk":
        cv2 = pytest.importorskip("cv2")
        reference = cv2.imread(str(SAMPLE / rel))[..., ::-1]  # an independent decoder
        assert np.abs(arr.astype(int) - reference).mean() < 4  # not inverted, not channel-swapped


def test_astronaut_photos_are_big_enough_except_too_small():
    for rel, entry in MANIFEST.items():
        if entry.get("person") == "eileen_collins" and entry["loads"]:
            with Image.open(SAMPLE / rel) as im:  # header only; rotation keeps the short side
                short = min(im.size)
            if entry["problem"] == "too_small":
                assert short < 256
            else:
                assert short >= 512, rel


def test_face_count_problems(hog):
    assert _faces(hog, load_image(SAMPLE / "problems/no_face.jpg")) == []
    assert len(_faces(hog, load_image(SAMPLE / "problems/two_faces.jpg"))) == 2


def test_near_duplicate_is_close_to_its_original_only():
    dup = load_image(SAMPLE / "problems/near_duplicate.jpg")
    original = MANIFEST["problems/near_duplicate.jpg"]["duplicate_of"]
    distances = {
        rel: int((_dhash(dup) != _dhash(load_image(SAMPLE / rel))).sum())
        for rel, v in MANIFEST.items()
        if v["loads"] and rel != "problems/near_duplicate.jpg" and not rel.endswith("08_phone_exif_rotated.jpg")
    }
    assert distances[original] <= 4
    assert min(d for rel, d in distances.items() if rel != original) >= 12


def test_blurry_photo_is_much_softer_than_subject_photos():
    cv2 = pytest.importorskip("cv2")

    def face_sharpness(rel: str) -> float:
        l, t, r, b = MANIFEST[rel]["face_box"]
        gray = np.asarray(load_image(SAMPLE / rel).convert("L"), np.float32)[max(t, 0) : b, max(l, 0) : r]
        return float(cv2.Laplacian(cv2.resize(gray, (128, 128), interpolation=cv2.INTER_AREA), cv2.CV_32F).var())

    blurry = face_sharpness("problems/blurry.jpg")
    sharpest_subjects = [face_sharpness(rel) for rel in FACE_PHOTOS if rel.startswith("person/") and "08_" not in rel]
    assert blurry * 5 < min(sharpest_subjects)
