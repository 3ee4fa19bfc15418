"""Photo preparation on the real sample photos: verdicts, alignment, outputs, safety."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_helpers.core import fileio
from lora_helpers.core.buckets import bucket_sizes, nearest_bucket
from lora_helpers.prepare.align import AlignSpec, plan_alignment, transform_points
from lora_helpers.prepare.faces import SAME_PERSON_COSINE, Face, detect_faces, get_backend
from lora_helpers.prepare.stage import (
    NoPhotosAcceptedError,
    PrepareConfig,
    prepare_photos,
    read_overrides,
    write_overrides,
)
from lora_helpers.prepare.lazy_photo import LazyPhoto
from lora_helpers.prepare.quality import hash_distance, normalise_colours, perceptual_hash, ramp

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
MANIFEST = json.loads((SAMPLE / "manifest.json").read_text())["files"]
SUBJECTS = sorted(k for k, v in MANIFEST.items() if v["role"] == "subject")
PROBLEMS = sorted(k for k, v in MANIFEST.items() if v["role"] == "problem")

# What each problem's reason must mention (the manifest gives verdict and a prose reason).
REASON_WORDS = {
    "blurry": "blurry",
    "cmyk": None,
    "empty": "empty file",
    "grayscale": "grayscale",
    "near_duplicate": "near-duplicate of astronaut_04_tilt_right_warm.jpg",
    "no_face": "no face found",
    "not_an_image": "not an image",
    "not_image_suffix": "not a photo",
    "rgba": None,
    "sixteen_bit": "grayscale",
    "too_small": "too small",
    "truncated": "truncated",
    "two_faces": "2 large faces",
}
EXPECTED_MODE = {"cmyk": "CMYK", "rgba": "RGBA", "sixteen_bit": "I;16", "grayscale": "L"}


def _hashes() -> dict[str, str]:
    return {str(p.relative_to(SAMPLE)): fileio.sha256_file(p) for p in sorted(SAMPLE.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """One run over every subject photo, every problem file and one photo of someone else."""
    files = [SAMPLE / k for k in SUBJECTS + PROBLEMS] + [SAMPLE / "other_person" / "grace_hopper_01.jpg"]
    before = _hashes()
    out = tmp_path_factory.mktemp("mixed") / "dataset"
    result = prepare_photos(files, out, progress=False)
    return result, before, _hashes()


def _rec(result, key: str):
    return result.record(Path(key).name)


# --------------------------------------------------------------------------- whole-run tests


def test_every_subject_photo_is_accepted(mixed):
    result, _, _ = mixed
    for key in SUBJECTS:
        rec = _rec(result, key)
        assert rec.accepted, f"{key}: {rec.verdict} {rec.reasons}"
        assert rec.face_clarity_score >= 0.9
        with Image.open(result.out_dir / rec.image_file) as im:
            assert im.size in bucket_sizes(1024) and im.mode == "RGB"
            # the bucket keeps the photo's orientation: landscape stays landscape
            w, h = rec.original_size
            assert (im.width >= im.height) == (w >= h) or abs(w / h - 1) < 0.1


def test_eyes_land_on_target_and_level_after_alignment(mixed):
    result, _, _ = mixed
    backend = get_backend()
    for key in SUBJECTS:  # includes the EXIF-rotated, off-centre and tilted photos
        rec = _rec(result, key)
        image = Image.open(result.out_dir / rec.image_file).convert("RGB")
        found = detect_faces(image, backend=backend)  # measured afresh on the written crop
        assert len(found) == 1, key
        w, h = image.size
        ex, ey = found[0].eye_center
        assert abs(ex / w - 0.5) <= 0.03, (key, ex / w)
        assert abs(ey / h - result.config.eye_y) <= 0.03, (key, ey / h)
        assert abs(found[0].roll_degrees) <= 2.0, (key, found[0].roll_degrees)
    # Rotation really was applied where the head was tilted in the photo.
    assert abs(_rec(result, "person/astronaut_07_closeup_tilt.jpg").crop["rotation"]) > 8


@pytest.mark.parametrize("key", PROBLEMS)
def test_problem_file_gets_expected_verdict_and_reason(mixed, key):
    result, _, _ = mixed
    info = MANIFEST[key]
    rec = _rec(result, key)
    reasons = "; ".join(rec.reasons).lower()
    expected = info["verdict"]
    if expected == "ok":
        assert rec.accepted, (key, rec.verdict, rec.reasons)
    else:
        assert rec.verdict == expected, (key, rec.verdict, rec.reasons)
    word = REASON_WORDS[info["problem"]]
    if word:
        assert word.lower() in reasons, (key, rec.reasons)
    if info["problem"] in EXPECTED_MODE:
        assert rec.mode == EXPECTED_MODE[info["problem"]]
    if info["loads"]:
        assert tuple(rec.original_size) == tuple(info["size"])


def test_someone_else_in_the_set_is_flagged(mixed):
    result, _, _ = mixed
    rec = result.record("grace_hopper_01.jpg")
    assert rec.verdict == "reject" and "different person" in rec.reasons[0]
    assert rec.measures["identity_similarity"] < SAME_PERSON_COSINE
    assert all(_rec(result, k).measures["identity_similarity"] >= SAME_PERSON_COSINE for k in SUBJECTS)


def test_blurry_face_scores_low_clarity_relative_and_absolute(mixed):
    result, _, _ = mixed
    blurry = result.record("blurry.jpg")
    sharp = [_rec(result, k).measures["sharpness"] for k in SUBJECTS]
    assert blurry.measures["sharpness"] < 0.2 * min(sharp)
    assert blurry.measures["sharpness_rel"] < result.config.min_relative_sharpness
    assert blurry.face_clarity_score < result.config.clarity_pass
    assert 0.0 <= blurry.face_clarity_score <= 1.0


def test_sources_are_byte_identical_after_the_run(mixed):
    _, before, after = mixed
    assert before == after


def test_outputs_follow_the_folder_contract(mixed):
    result, _, _ = mixed
    out = result.out_dir
    rows = fileio.read_jsonl(out / "metadata.jsonl")
    assert [r["source"] for r in rows] == [r.file for r in result.accepted]
    for row in rows:
        with Image.open(out / row["file_name"]) as im, Image.open(out / row["mask_file"]) as mask:
            assert mask.mode == "L" and mask.size == im.size
            m = np.asarray(mask)
            assert m.max() == 255 and m[0, 0] == 0 and m[-1, -1] == 0  # face on, corners off
            assert 0.03 < (m > 127).mean() < 0.6
            oh, ow = row["original_size"]
            top, left = row["crop_top_left"]
            assert 0 <= top <= max(oh - im.height, 0) and 0 <= left <= max(ow - im.width, 0)
        assert 0.9 <= row["face_clarity_score"] <= 1.0
    assert sorted(p.name for p in (out / "images").iterdir()) == sorted(Path(r["file_name"]).name for r in rows)
    with open(out / "report.csv", newline="") as f:
        report = list(csv.DictReader(f))
    assert [r["file"] for r in report] == [r.file for r in result.records]  # one row per input
    by_file = {r["file"]: r for r in report}
    assert by_file["two_faces.jpg"]["faces"] == "2"
    assert by_file["astronaut_08_phone_exif_rotated.jpg"]["original_width"] == "4000"
    assert float(by_file["astronaut_08_phone_exif_rotated.jpg"]["sharpness"]) > 0
    assert by_file["cmyk.jpg"]["padding"] and by_file["cmyk.jpg"]["crop_box"]
    with Image.open(out / "contact_sheet.png") as sheet:
        assert sheet.width > 1000 and sheet.height > 500


def test_twelve_usable_photos_hold_two_out(mixed):
    result, _, _ = mixed
    assert len(result.accepted) == 12
    held = [r.file for r in result.held_out]
    assert len(held) == 2 and all(result.record(f).faces == 1 for f in held)
    rows = fileio.read_jsonl(result.out_dir / "metadata.jsonl")
    assert sorted(r["source"] for r in rows if r.get("held_out")) == sorted(held)
    assert "held out for the likeness score" in result.summary()


# --------------------------------------------------------------------------- re-runs and overrides


def test_rerun_is_idempotent_and_overrides_apply(tmp_path):
    files = [SAMPLE / "person" / n for n in ("astronaut_01_headshot.jpg", "astronaut_03_tilt_left_dark.jpg")]
    out = tmp_path / "dataset"
    config = PrepareConfig(resolution=256)
    prepare_photos(files, out, config=config, progress=False)
    snapshot = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}
    # A caption stage adds text; a re-run must keep it.
    rows = fileio.read_jsonl(out / "metadata.jsonl")
    fileio.write_jsonl(out / "metadata.jsonl", [dict(r, text=f"photo of TOK person {i}") for i, r in enumerate(rows)])
    prepare_photos(files, out, config=config, progress=False)
    again = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}
    assert again.keys() == snapshot.keys()
    for p in snapshot:
        if p.name != "metadata.jsonl":
            assert again[p][0] == snapshot[p][0], p
    for p in (out / "images").iterdir():  # unchanged crops are not even rewritten
        assert again[p][1] == snapshot[p][1]
    assert [r.get("text") for r in fileio.read_jsonl(out / "metadata.jsonl")] == [f"photo of TOK person {i}" for i in range(2)]

    # Reject one by override (as the notebook widgets save it): its crop disappears.
    write_overrides(out, {"astronaut_03_tilt_left_dark.jpg": "reject"})
    assert read_overrides(out) == {"astronaut_03_tilt_left_dark.jpg": "reject"}
    result = prepare_photos(files, out, config=config, progress=False)
    assert result.record("astronaut_03_tilt_left_dark.jpg").verdict == "reject"
    assert not (out / "images" / "astronaut_03_tilt_left_dark.png").exists()
    assert not (out / "masks" / "astronaut_03_tilt_left_dark.png").exists()
    assert [r["source"] for r in fileio.read_jsonl(out / "metadata.jsonl")] == ["astronaut_01_headshot.jpg"]


def test_override_accepts_a_photo_without_a_face(tmp_path):
    files = [SAMPLE / "problems" / "no_face.jpg", SAMPLE / "person" / "astronaut_05_mirrored_cool.jpg"]
    result = prepare_photos(files, tmp_path / "d", config=PrepareConfig(resolution=64), overrides={"no_face.jpg": "accept"}, progress=False)
    rec = result.record("no_face.jpg")
    assert rec.verdict == "warn" and rec.reasons[0] == "accepted by override"
    assert (tmp_path / "d" / rec.image_file).exists()
    with pytest.raises(ValueError, match="accept' or 'reject"):
        prepare_photos(files, tmp_path / "d", overrides={"no_face.jpg": "maybe"}, progress=False)


def test_no_usable_photo_raises_with_every_reason(tmp_path):
    files = [SAMPLE / "problems" / n for n in ("empty.jpg", "no_face.jpg", "notes.txt", "truncated.jpg")]
    with pytest.raises(NoPhotosAcceptedError) as info:
        prepare_photos(files, tmp_path / "d", progress=False)
    message = str(info.value)
    for name, word in (("empty.jpg", "empty file"), ("no_face.jpg", "no face"), ("notes.txt", "not a photo"), ("truncated.jpg", "truncated")):
        assert name in message and word in message
    assert (tmp_path / "d" / "report.csv").exists()  # the report explains it too


def test_one_failing_photo_does_not_stop_the_batch(tmp_path, monkeypatch):
    from lora_helpers.prepare import quality

    real = quality.measure_face

    def flaky(image, face):
        if image.size == (800, 800):
            raise RuntimeError("simulated failure")
        return real(image, face)

    monkeypatch.setattr(quality, "measure_face", flaky)
    files = [SAMPLE / "person" / n for n in ("astronaut_05_mirrored_cool.jpg", "astronaut_01_headshot.jpg")]
    result = prepare_photos(files, tmp_path / "d", config=PrepareConfig(resolution=64), progress=False)
    bad = result.record("astronaut_05_mirrored_cool.jpg")
    assert bad.verdict == "reject" and "simulated failure" in bad.reasons[0]
    assert result.record("astronaut_01_headshot.jpg").accepted


def test_out_dir_must_not_be_the_photo_folder(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    with pytest.raises(ValueError, match="photo folder"):
        prepare_photos(photos, photos, progress=False)


def test_cli_prepare(tmp_path, capsys):
    from lora_helpers.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for n in ("astronaut_01_headshot.jpg", "astronaut_07_closeup_tilt.jpg"):
        (photos / n).write_bytes((SAMPLE / "person" / n).read_bytes())
    assert main(["prepare", str(photos), str(tmp_path / "out"), "--resolution", "64", "--square", "--no-progress"]) == 0
    assert "2 of 2 files accepted" in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "images" / "astronaut_01_headshot.png") as im:
        assert im.size == (64, 64)
    (photos / "astronaut_01_headshot.jpg").unlink()
    (photos / "astronaut_07_closeup_tilt.jpg").unlink()
    (photos / "notes.txt").write_text("not a photo")
    assert main(["prepare", str(photos), str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "notes.txt" in err and "left as it was" in err
    assert len(list((tmp_path / "out" / "images").glob("*.png"))) == 2  # an unusable folder wipes nothing


# --------------------------------------------------------------------------- building blocks (no models)


def test_buckets_scale_with_resolution():
    assert bucket_sizes(1024)[:3] == [(1024, 1024), (1152, 896), (896, 1152)]
    small = bucket_sizes(64)
    assert (64, 64) in small and (56, 72) in small and (72, 56) in small
    assert all(w % 8 == 0 and h % 8 == 0 for w, h in small)
    assert nearest_bucket(4000, 3000) == (1152, 896)
    assert nearest_bucket(3000, 4000) == (896, 1152)
    assert nearest_bucket(1000, 2400) == (640, 1536)
    assert nearest_bucket(4000, 3000, square_only=True) == (1024, 1024)
    assert nearest_bucket(4000, 3000, resolution=64) == (72, 56)


def _face(eye_left, eye_right, mouth) -> Face:
    pts = np.zeros((68, 2))
    pts[36:42], pts[42:48] = eye_left, eye_right
    pts[48] = pts[54] = mouth
    pts[0:17] = np.linspace(np.array(eye_left) + [-20, 0], np.array(eye_right) + [20, 0], 17)
    pts[17:27] = np.linspace(np.array(eye_left) + [-10, -15], np.array(eye_right) + [10, -15], 10)
    xs, ys = pts[:, 0], pts[:, 1]
    return Face(box=(xs.min(), ys.min(), xs.max(), ys.max() + 20), landmarks=pts, score=1.0)


@pytest.mark.parametrize("image_size, eyes", [((4000, 3000), ((900, 1000), (1100, 1060))), ((600, 600), ((250, 240), (330, 228)))])
def test_plan_alignment_levels_eyes_and_respects_limits(image_size, eyes):
    face = _face(eyes[0], eyes[1], ((eyes[0][0] + eyes[1][0]) / 2, eyes[0][1] + 110))
    out = nearest_bucket(*image_size)
    spec = AlignSpec()
    al = plan_alignment(face, image_size, out, spec)
    mapped = transform_points(al.matrix, np.stack([face.left_eye, face.right_eye]))
    assert abs(mapped[0, 1] - mapped[1, 1]) < 1e-6  # level
    mid = mapped.mean(axis=0)
    np.testing.assert_allclose(mid, (0.5 * out[0] - 0.5, spec.eye_y * out[1] - 0.5), atol=1e-6)
    assert al.scale <= spec.max_upscale + 1e-9
    assert 0.0 <= al.padding <= 1.0
    if image_size == (4000, 3000):  # plenty of photo around: no padding, face at target size
        assert al.padding == 0 and al.zoom == pytest.approx(1.0)
        assert face.size * al.scale == pytest.approx(spec.face_fraction * min(out))


def test_lazy_photo_matches_exif_transpose():
    from lora_helpers.prepare.align import Alignment, warp

    rng = np.random.default_rng(1)
    raw = Image.fromarray(rng.integers(0, 255, (31, 47, 3), dtype=np.uint8))
    for orientation in range(1, 9):
        lazy = LazyPhoto(raw, orientation)
        upright = raw if orientation == 1 else raw.transpose(lazy.method)
        assert lazy.size == upright.size
        for box in [(0, 0, 5, 7), (3, 4, upright.width, upright.height), (1, 2, 9, 11)]:
            np.testing.assert_array_equal(np.asarray(lazy.crop(box)), np.asarray(upright.crop(box)))
        # The crop folds the rotation into its transform: same pixels as from the rotated photo.
        shift = Alignment(matrix=np.array([[1.0, 0, -2], [0, 1.0, -3]]), out_size=(20, 16), scale=1.0, angle=0.0)
        np.testing.assert_array_equal(warp(lazy, shift, pad="black"), warp(upright, shift, pad="black"))


def test_quality_helpers():
    assert ramp(5, 0, 10, 20) == pytest.approx(0.45)
    assert ramp(10, 0, 10, 20) == pytest.approx(0.9)
    assert ramp(30, 0, 10, 20) == 1.0
    assert ramp(0.3, 0.6, 0.25, 0.05) == pytest.approx(0.9 * 0.3 / 0.35)  # decreasing direction
    image = np.asarray(Image.open(SAMPLE / "person" / "astronaut_01_headshot.jpg"))
    resized = np.asarray(Image.fromarray(image).resize((500, 625)))
    assert hash_distance(perceptual_hash(image), perceptual_hash(resized)) <= 4
    flipped = image[:, ::-1]
    assert hash_distance(perceptual_hash(image), perceptual_hash(flipped)) > 10
    warm = np.clip(image.astype(int) * [1.2, 1.0, 0.8], 0, 255).astype(np.uint8)
    fixed = normalise_colours(warm, white_balance=1.0, clahe_clip=0)
    cast = lambda a: np.ptp(a.reshape(-1, 3).mean(axis=0))  # noqa: E731
    assert cast(fixed) < 0.5 * cast(warm)


def test_clarity_pass_line_is_applied(tmp_path):
    files = [SAMPLE / "person" / "astronaut_01_headshot.jpg"]
    with pytest.raises(NoPhotosAcceptedError, match="face clarity 1.00 is below 1.50"):
        prepare_photos(files, tmp_path / "d", config=PrepareConfig(resolution=64, clarity_pass=1.5), progress=False)
