"""Held-out photos: chosen by preparation (deterministic, overridable), kept through captioning,
never trained on; and the trainer's resize-quality skip and loss weighting."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from train_helpers import make_dataset

from lora_helpers.core import fileio
from lora_helpers.core.run_folder import HELD_OUT_FIELD, RESIZE_QUALITY_FIELD
from lora_helpers.prepare import PhotoRecord, PrepareConfig, contact_sheet, prepare_photos, write_overrides
from lora_helpers.prepare.holdout import MIN_PHOTOS, TWO_FROM, auto_count, choose_held_out
from lora_helpers.prepare.report import HELD_OUT_COLOUR
from lora_helpers.train import TrainConfig, train
from lora_helpers.train.data import loss_weights, read_training_images

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
PERSON = sorted((SAMPLE / "person").glob("*.jpg"))  # 8 photos of one person, all usable


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    """The 8 sample photos of one person prepared at 64 px (8 usable: one is held out)."""
    out = tmp_path_factory.mktemp("eight") / "dataset"
    return prepare_photos(SAMPLE / "person", out, config=PrepareConfig(resolution=64), progress=False)


def _held(result) -> list[str]:
    return [r.file for r in result.held_out]


def _rows(folder: Path) -> list[dict]:
    return fileio.read_jsonl(folder / "metadata.jsonl")


# --------------------------------------------------------------------------- choosing (preparation)


def test_eight_usable_photos_hold_one_out_recorded_everywhere(eight):
    result = eight
    assert len(result.accepted) == 8 and len(_held(result)) == 1
    held = result.held_out[0]
    rows = {r["source"]: r for r in _rows(result.out_dir)}
    assert rows[held.file][HELD_OUT_FIELD] is True
    assert [s for s, r in rows.items() if r.get(HELD_OUT_FIELD)] == [held.file]  # others carry no flag
    with open(result.out_dir / "report.csv", newline="") as f:
        report = {r["file"]: r for r in csv.DictReader(f)}
    assert {f for f, r in report.items() if r["held_out"] == "true"} == {held.file}
    assert all(report[r.file]["held_out"] == "false" for r in result.accepted if r is not held)
    summary = result.summary()
    assert f"{held.file} [held out]" in summary
    assert f"held out for the likeness score, not trained on: {held.file}" in summary
    # The contact sheet marks it with the blue tag; with nothing held out the colour is absent.
    sheet = np.asarray(contact_sheet(result))
    assert (sheet == HELD_OUT_COLOUR).all(axis=-1).sum() > 100
    held.held_out = False
    assert (np.asarray(contact_sheet(result)) == HELD_OUT_COLOUR).all(axis=-1).sum() == 0
    held.held_out = True


def test_the_choice_follows_the_photos_not_their_names_or_listing_order(eight, tmp_path):
    # Same photos under other names, listed in reverse order: the same picture is held out.
    photos = tmp_path / "renamed"
    photos.mkdir()
    copies = []
    for i, src in enumerate(reversed(PERSON)):
        copies.append(photos / f"IMG_{i:04d}.jpg")
        shutil.copyfile(src, copies[-1])
    again = prepare_photos(list(reversed(copies)), tmp_path / "d", config=PrepareConfig(resolution=64), progress=False)
    assert len(_held(again)) == 1
    assert again.held_out[0].path.read_bytes() == eight.held_out[0].path.read_bytes()


def test_fewer_than_eight_usable_photos_hold_none_and_say_why(eight, tmp_path):
    seven = [p for p in PERSON if p.name != eight.held_out[0].file][:7]
    result = prepare_photos(seven, tmp_path / "d", config=PrepareConfig(resolution=64), progress=False,
                            previous=eight)  # the photos themselves are reused, the set is judged afresh
    assert result.reused == 7 and _held(result) == []
    assert not any(HELD_OUT_FIELD in r for r in _rows(tmp_path / "d"))
    line = result.held_out_message
    assert line in result.summary()
    assert "held-out score not available" in line and "7 usable photos" in line and f"{MIN_PHOTOS} or more" in line


def test_overrides_force_photos_in_and_out_and_switch_holding_out_off(eight, tmp_path):
    out = tmp_path / "d"
    first = eight.held_out[0].file
    config = PrepareConfig(resolution=64)
    # "train" puts the chosen photo back into training; another one takes its place.
    result = prepare_photos(SAMPLE / "person", out, config=config, overrides={first: "train"}, progress=False,
                            previous=eight)
    assert result.reused == 8  # holding out is decided for the set: no photo is processed again
    assert len(_held(result)) == 1 and first not in _held(result)
    # "hold_out" (saved as the widgets save it) picks the photo; it counts towards the one held out.
    forced = next(p.name for p in PERSON if p.name not in (first, _held(result)[0]))
    write_overrides(out, {forced: "hold out"})
    result = prepare_photos(SAMPLE / "person", out, config=config, progress=False, previous=result)
    assert _held(result) == [forced]
    assert [r["source"] for r in _rows(out) if r.get(HELD_OUT_FIELD)] == [forced]
    # hold_out=0 switches the automatic choice off; a forced photo is still held out.
    result = prepare_photos(SAMPLE / "person", out, config=PrepareConfig(resolution=64, hold_out=0), progress=False,
                            previous=result)
    assert _held(result) == [forced]
    write_overrides(out, {})
    result = prepare_photos(SAMPLE / "person", out, config=PrepareConfig(resolution=64, hold_out=0), progress=False,
                            previous=result)
    assert _held(result) == [] and "hold_out=0" in result.held_out_message
    with pytest.raises(ValueError, match="hold_out"):
        PrepareConfig(hold_out=-1)
    with pytest.raises(ValueError, match="override for 'x.jpg'"):
        write_overrides(out, {"x.jpg": "keep"})


def test_override_widgets_save_hold_out_and_train_choices(eight, tmp_path):
    from lora_helpers.prepare import read_overrides
    from lora_helpers.ui import override_widgets

    result = prepare_photos(SAMPLE / "person", tmp_path / "d", config=PrepareConfig(resolution=64), progress=False,
                            previous=eight)
    panel = override_widgets(result)
    rows = panel.children[1:-1]  # header, one row per photo, status
    (held_row, held), (other_row, other) = [next((row, rec) for row, rec in zip(rows, result.records)
                                                 if rec.held_out is flag) for flag in (True, False)]
    assert "held out" in held_row.children[1].value and "held out" not in other_row.children[1].value
    held_row.children[0].value = "train"
    other_row.children[0].value = "hold_out"
    assert read_overrides(tmp_path / "d") == {held.file: "train", other.file: "hold_out"}
    again = prepare_photos(SAMPLE / "person", tmp_path / "d", config=PrepareConfig(resolution=64), progress=False,
                           previous=result)
    assert _held(again) == [other.file]


def _records(folder: Path, n: int) -> list[PhotoRecord]:
    """n usable one-face records over distinct files (content decides the choice)."""
    folder.mkdir(exist_ok=True)
    records = []
    for i in range(n):
        path = folder / f"photo_{i:02d}.jpg"
        path.write_bytes(f"photo {i}".encode())
        records.append(PhotoRecord(file=path.name, path=path, verdict="pass", faces=1, face_clarity_score=1.0))
    return records


@pytest.mark.parametrize("n, expected", [(1, 0), (7, 0), (8, 1), (11, 1), (12, 2), (15, 2)])
def test_one_held_out_from_eight_usable_photos_two_from_twelve(tmp_path, n, expected):
    assert (MIN_PHOTOS, TWO_FROM) == (8, 12) and auto_count(n) == expected
    records = _records(tmp_path / "photos", n)
    choose_held_out(records)
    assert sum(r.held_out for r in records) == expected
    # A photo with two faces, a verdict override, or not usable at all is never chosen.
    for r in records:
        if r.held_out:
            r.faces = 2
    choose_held_out(records)
    assert sum(r.held_out for r in records) == expected and all(r.faces == 1 for r in records if r.held_out)


def test_training_always_keeps_one_photo(tmp_path):
    records = _records(tmp_path / "photos", 3)
    for r in records:
        r.override = "hold_out"
    message = choose_held_out(records)
    assert sum(r.held_out for r in records) == 2 and "at least one must stay in training" in message
    records[0].verdict = "reject"
    choose_held_out(records)
    assert not records[0].held_out and "hold-out override ignored" in records[0].notes[-1]


def test_cli_holds_out_photos_and_names_a_bad_setting(tmp_path, capsys):
    from lora_helpers.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    for p in PERSON[:2]:
        shutil.copyfile(p, photos / p.name)
    args = ["prepare", str(photos), str(tmp_path / "out"), "--resolution", "64", "--no-progress"]
    assert main(args + ["--hold-out-photo", PERSON[1].name]) == 0
    out = capsys.readouterr().out
    assert f"{PERSON[1].name} [held out]" in out
    assert [r["source"] for r in _rows(tmp_path / "out") if r.get(HELD_OUT_FIELD)] == [PERSON[1].name]
    assert main(args + ["--hold-out", "some"]) == 2
    assert "hold_out must be 'auto'" in capsys.readouterr().err



def test_train_cli_flags_set_the_resize_quality_settings():
    from lora_helpers.cli import build_parser
    from lora_helpers.train.stage import _config_from_args

    args = build_parser().parse_args(["train", "d", "r", "--preset", "cpu-smoke", "--min-resize-quality", "0.9",
                                      "--weight-by-resize-quality"])
    config = _config_from_args(args)
    assert config.min_resize_quality == 0.9 and config.weight_by_resize_quality is True
    defaults = _config_from_args(build_parser().parse_args(["train", "d", "r", "--preset", "cpu-smoke"]))
    assert defaults.min_resize_quality == 0.0 and defaults.weight_by_resize_quality is False


# --------------------------------------------------------------------------- captioning and training


def test_held_out_and_resize_quality_survive_captioning(tmp_path, tiny_models):
    from lora_helpers.caption import CaptionConfig, caption_dataset
    from lora_helpers.caption.stage import load_clip_tokenizer

    out = tmp_path / "d"
    prepare_photos(PERSON[:2], out, config=PrepareConfig(resolution=64), overrides={PERSON[0].name: "hold_out"},
                   progress=False)
    before = _rows(out)
    caption_dataset(out, config=CaptionConfig(model=str(tiny_models / "blip"), batch_size=2, num_beams=1,
                                              max_new_tokens=8),
                    tokenizer=load_clip_tokenizer(str(tiny_models / "sdxl")), progress=False)
    after = _rows(out)
    assert all("text" in r for r in after)
    assert [(r.get(HELD_OUT_FIELD), r[RESIZE_QUALITY_FIELD]) for r in after] == \
        [(r.get(HELD_OUT_FIELD), r[RESIZE_QUALITY_FIELD]) for r in before]
    assert [r.get(HELD_OUT_FIELD) for r in after] == [True, None]
    assert [im.file_name for im in read_training_images(out)] == [after[1]["file_name"]]


@pytest.fixture(scope="module")
def flagged(tmp_path_factory):
    """The 6-image training set: image 0 held out, image 1 of resize quality 0.3, the rest 0.5."""
    folder = make_dataset(tmp_path_factory.mktemp("flagged"))
    rows = _rows(folder)
    rows[0][HELD_OUT_FIELD] = True
    for i, row in enumerate(rows[1:], start=1):
        row[RESIZE_QUALITY_FIELD] = 0.3 if i == 1 else 0.5
    fileio.write_jsonl(folder / "metadata.jsonl", rows)
    return folder, [r["file_name"] for r in rows]


def _config(tiny_models, **overrides) -> TrainConfig:
    base = dict(model=str(tiny_models / "sdxl"), checkpointing_steps=1000, validation_steps=0, validation_prompts=(),
                progress=False, max_train_steps=1, fixed_noise=True, snr_gamma=None, min_resize_quality=0.4)
    return TrainConfig.from_preset("cpu-smoke", **{**base, **overrides})


def test_held_out_and_poor_crops_never_reach_training(flagged, tiny_models, tmp_path, capsys):
    folder, names = flagged
    result = train(folder, tmp_path / "run", config=_config(tiny_models))
    printed = capsys.readouterr().out
    assert f"1 photo(s) held out of training for the likeness score: {names[0]}" in printed
    assert f"1 crop(s) skipped, resize quality below min_resize_quality 0.4: {names[1]} (0.30)" in printed
    # What was encoded into the latent cache and what config.json lists are the 4 others.
    cache = json.loads((result.run_dir / "cache" / "cache.json").read_text())
    assert cache["n_images"] == 4
    trained = json.dumps(json.loads(result.config_path.read_text()))
    assert names[0] not in trained and names[1] not in trained and all(n in trained for n in names[2:])


def test_loss_is_scaled_by_resize_quality_when_asked(flagged, tiny_models, tmp_path):
    folder, _ = flagged
    plain = train(folder, tmp_path / "plain", config=_config(tiny_models))
    weighted = train(folder, tmp_path / "weighted", config=_config(tiny_models, weight_by_resize_quality=True))
    loss = [json.loads(r.log_path.read_text().splitlines()[0])["loss"] for r in (plain, weighted)]
    assert loss[1] == pytest.approx(0.5 * loss[0], rel=1e-4)  # every trained crop scores 0.5


def test_datasets_without_the_fields_train_on_everything_at_weight_one(tmp_path):
    folder = make_dataset(tmp_path / "d")
    images = read_training_images(folder, min_resize_quality=0.99)
    assert len(images) == 6 and all(im.resize_quality == 1.0 for im in images)
    assert loss_weights(images, by_resize_quality=True) is None
    rows = _rows(folder)
    rows[2][RESIZE_QUALITY_FIELD] = "high"
    fileio.write_jsonl(folder / "metadata.jsonl", rows)
    with pytest.raises(ValueError, match=f"{rows[2]['file_name']}: resize_quality must be a number"):
        read_training_images(folder)
    for row in rows:
        row[RESIZE_QUALITY_FIELD] = 0.2
    fileio.write_jsonl(folder / "metadata.jsonl", rows)
    with pytest.raises(ValueError, match="6 below min_resize_quality 0.5; lower min_resize_quality"):
        read_training_images(folder, min_resize_quality=0.5)
    with pytest.raises(ValueError, match="min_resize_quality"):
        TrainConfig.from_preset("cpu-smoke", min_resize_quality=1.5)
