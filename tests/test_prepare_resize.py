"""Resize quality: how much of a training crop's detail is real, on photos built to need
neither enlarging nor padding, only enlarging, and only padding."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_helpers.core import fileio
from lora_helpers.core.run_folder import RESIZE_QUALITY_FIELD
from lora_helpers.prepare import PrepareConfig, prepare_photos
from lora_helpers.prepare.align import Alignment, resize_quality
from lora_helpers.prepare.lazy_photo import open_photo

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
LARGE = SAMPLE / "person" / "astronaut_08_phone_exif_rotated.jpg"  # 4000x3000, face ~440 px wide
WARNING = "resize quality"


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """One run at 1024 px over a large photo, a small one, and one with the face near its corner.

    All three are cut from the 12 MP sample (face about 414 px wide at x 1000-1414, y 953-1370),
    each with another aspect ratio so that none is taken for a near-duplicate of another.
    """
    folder = tmp_path_factory.mktemp("photos")
    photo = open_photo(LARGE).convert("RGB")  # upright, 4000x3000
    photo.save(folder / "large.jpg", quality=95)
    # Portrait head and shoulders shrunk 3x: 600x800, the face ~138 px, so it must be enlarged.
    portrait = photo.crop((300, 400, 2100, 2800))
    portrait.resize((600, 800), Image.Resampling.LANCZOS).save(folder / "small.jpg", quality=95)
    # Cut 300 px left of and 250 px above the face: the aligned crop reaches past those edges.
    photo.crop((700, 700, 3100, 3000)).save(folder / "edge.jpg", quality=95)
    # max_zoom 1: zooming in would trade the padding for enlargement; here each effect stays apart.
    config = PrepareConfig(resolution=1024, max_zoom=1.0)
    return prepare_photos(folder, tmp_path_factory.mktemp("out") / "dataset", config=config, progress=False)


def _warned(rec) -> bool:
    return any(WARNING in reason for reason in rec.reasons)


def test_a_crop_from_a_large_sharp_photo_scores_one(crops):
    rec = crops.record("large.jpg")
    assert rec.accepted and rec.crop["scale"] < 1 and rec.crop["padding"] == 0
    assert rec.resize_quality == 1.0 and not _warned(rec)


def test_enlarging_a_small_photo_lowers_the_score_and_warns(crops):
    rec = crops.record("small.jpg")
    assert rec.accepted and rec.crop["scale"] > 1.2
    assert rec.resize_quality == pytest.approx((1 - rec.crop["padding"]) / rec.crop["scale"], abs=2e-3)
    assert rec.resize_quality < crops.config.quality_threshold and _warned(rec)
    reason = next(r for r in rec.reasons if WARNING in r)
    assert f"{rec.resize_quality:.3f} is below 0.95" in reason and "enlarged" in reason and "larger or closer" in reason


def test_padding_past_the_photo_lowers_the_score_and_warns(crops):
    rec = crops.record("edge.jpg")
    assert rec.accepted and rec.crop["scale"] <= 1 and rec.crop["padding"] > 0.05
    assert rec.resize_quality == pytest.approx(1 - rec.crop["padding"], abs=2e-3)
    reason = next(r for r in rec.reasons if WARNING in r)
    assert "padding" in reason and "enlarged" not in reason


def test_the_score_is_recorded_in_metadata_and_report(crops):
    rows = {r["source"]: r for r in fileio.read_jsonl(crops.out_dir / "metadata.jsonl")}
    with open(crops.out_dir / "report.csv", newline="") as f:
        report = {r["file"]: r for r in csv.DictReader(f)}
    for rec in crops.records:
        assert rows[rec.file][RESIZE_QUALITY_FIELD] == rec.resize_quality
        assert float(report[rec.file]["resize_quality"]) == pytest.approx(rec.resize_quality, abs=1e-3)


def test_a_lower_threshold_drops_the_warning(crops, tmp_path):
    small = crops.record("small.jpg")
    config = PrepareConfig(resolution=1024, max_zoom=1.0, quality_threshold=0.3)
    result = prepare_photos([small.path], tmp_path / "d", config=config, progress=False)
    rec = result.record("small.jpg")
    assert rec.resize_quality == small.resize_quality and not _warned(rec)
    with pytest.raises(ValueError, match="quality_threshold"):
        PrepareConfig(quality_threshold=1.5)


@pytest.mark.parametrize("scale, padding, expected", [(0.5, 0.0, 1.0), (1.0, 0.0, 1.0), (2.0, 0.0, 0.5),
                                                      (1.0, 0.2, 0.8), (1.25, 0.1, 0.72)])
def test_resize_quality_is_real_share_times_source_pixels_per_output_pixel(scale, padding, expected):
    alignment = Alignment(matrix=np.eye(2, 3) * scale, out_size=(64, 64), scale=scale, angle=0.0, padding=padding)
    assert resize_quality(alignment) == pytest.approx(expected)
