"""Several people in one dataset: preparation (subfolders, grouping by face) and one identifier per person.

The two people are the sample astronaut (Eileen Collins) and Grace Hopper; extra Grace Hopper
photos are made here by crops, a mirror and colour changes, as the astronaut ones were.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import warnings
from pathlib import Path

import ipywidgets as widgets
import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

from lora_helpers.caption import CaptionConfig, CaptionError, caption_dataset, caption_table, load_captions
from lora_helpers.caption import load_clip_tokenizer, parse_subject_settings, shared_token_warnings
from lora_helpers.caption.text import count_identifier
from lora_helpers.core import fileio
from lora_helpers.core.run_folder import SUBJECT_FIELD, SUBJECTS_KEY, read_caption_config, read_metadata
from lora_helpers.prepare import (
    PrepareConfig, contact_sheet, prepare_photos, read_subject_overrides, report_rows, write_subject_overrides,
)
from lora_helpers.prepare.faces import SAME_PERSON_COSINE
from lora_helpers.prepare.report import SUBJECT_COLOURS
from lora_helpers.prepare.subjects import find_photos, group_faces
from lora_helpers.ui import override_widgets

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
ASTRONAUT = ["astronaut_01_headshot.jpg", "astronaut_03_tilt_left_dark.jpg", "astronaut_05_mirrored_cool.jpg",
             "astronaut_07_closeup_tilt.jpg"]
GRACE = ["grace_hopper_01.jpg", "grace_hopper_02.jpg", "grace_hopper_03.jpg", "grace_hopper_04.jpg"]
SMALL = PrepareConfig(resolution=64)


def _grace_variants(folder: Path) -> None:
    """Two more Grace Hopper photos: a mirrored, brighter crop and a tilted, paler one (each >= 512 px)."""
    g = Image.open(SAMPLE / "other_person" / "grace_hopper_01.jpg").convert("RGB")
    crop = ImageOps.mirror(g.crop((40, 60, 480, 560))).resize((660, 750), Image.LANCZOS)
    ImageEnhance.Brightness(crop).enhance(1.15).save(folder / "grace_hopper_03.jpg", quality=92)
    tilted = g.crop((0, 0, 512, 512)).rotate(-5, resample=Image.BICUBIC).resize((700, 700), Image.LANCZOS)
    ImageEnhance.Color(tilted).enhance(0.6).save(folder / "grace_hopper_04.jpg", quality=92)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """photos/astronaut/ (4) and photos/grace/ (4), plus a mixed/ folder holding all eight."""
    root = tmp_path_factory.mktemp("people")
    (root / "photos" / "astronaut").mkdir(parents=True)
    (root / "photos" / "grace").mkdir()
    for name in ASTRONAUT:
        shutil.copyfile(SAMPLE / "person" / name, root / "photos" / "astronaut" / name)
    for name in GRACE[:2]:
        shutil.copyfile(SAMPLE / "other_person" / name, root / "photos" / "grace" / name)
    _grace_variants(root / "photos" / "grace")
    (root / "mixed").mkdir()
    for p in sorted((root / "photos").rglob("*.jpg")):
        shutil.copyfile(p, root / "mixed" / p.name)
    return root


@pytest.fixture(scope="module")
def by_folder(photos):
    before = {p: fileio.sha256_file(p) for p in (photos / "photos").rglob("*") if p.is_file()}
    result = prepare_photos(photos / "photos", photos / "ds_folders", config=SMALL, progress=False)
    return result, before


@pytest.fixture(scope="module")
def grouped(photos):
    return prepare_photos(photos / "mixed", photos / "ds_group", config=PrepareConfig(resolution=64, subjects="group"),
                          progress=False)


def _subjects(result) -> dict[str, str | None]:
    return {r.path.name: r.subject for r in result.records}


# --------------------------------------------------------------------------- preparation


def test_subfolders_give_one_subject_each_in_rows_and_report(by_folder):
    result, before = by_folder
    assert result.subjects == ["astronaut", "grace"]
    assert _subjects(result) == {**{n: "astronaut" for n in ASTRONAUT}, **{n: "grace" for n in GRACE}}
    assert all(r.accepted for r in result.records), result.summary()
    rows = read_metadata(result.out_dir)
    assert {Path(row["source"]).name: row[SUBJECT_FIELD] for row in rows} == _subjects(result)
    # crops stay in images/, the person is in the row
    assert all(row["file_name"].startswith("images/") for row in rows)
    report = {row["file"]: row["subject"] for row in report_rows(result)}
    assert report == _subjects(result)
    assert "[grace]" in result.summary() and "[astronaut]" in result.summary()
    # sources untouched
    assert before == {p: fileio.sha256_file(p) for p in before}


def test_grouping_a_mixed_folder_recovers_the_two_people(grouped):
    subjects = _subjects(grouped)
    astronaut, grace = {subjects[n] for n in ASTRONAUT}, {subjects[n] for n in GRACE}
    assert len(astronaut) == 1 and len(grace) == 1 and astronaut != grace, subjects
    # named in order of their first photo: the astronaut's photos sort first
    assert astronaut == {"person_1"} and grace == {"person_2"}
    assert all(r.accepted for r in grouped.records)
    assert {row[SUBJECT_FIELD] for row in read_metadata(grouped.out_dir)} == {"person_1", "person_2"}


def test_contact_sheet_labels_each_photo_with_its_persons_colour(grouped):
    sheet = np.asarray(contact_sheet(grouped, columns=4))
    tile_w, gap = 240, 6

    def label_pixels(index: int, colour) -> int:
        row, col = divmod(index, 4)
        tile_h = (sheet.shape[0] - gap) // 2 - gap
        top, left = gap + row * (tile_h + gap), gap + col * (tile_w + gap)
        corner = sheet[top:top + 30, left + tile_w - 110:left + tile_w]  # the label sits top right
        return int(np.all(corner == colour, axis=-1).sum())

    # ordered by person: four astronaut tiles, then four Grace Hopper tiles
    for i in range(8):
        own, other = (SUBJECT_COLOURS[0], SUBJECT_COLOURS[1]) if i < 4 else (SUBJECT_COLOURS[1], SUBJECT_COLOURS[0])
        assert label_pixels(i, own) > 100 and label_pixels(i, other) == 0, i


def test_override_widgets_save_renames_and_moves(grouped, tmp_path):
    shutil.copytree(grouped.out_dir, tmp_path / "d")
    panel = override_widgets(dataclasses.replace(grouped, out_dir=tmp_path / "d"))
    renames = next(w for w in panel.children if isinstance(w, widgets.HBox) and isinstance(w.children[0], widgets.Text))
    assert [w.value for w in renames.children] == ["person_1", "person_2"]
    renames.children[1].value = "grace"
    row = next(w for w in panel.children if isinstance(w, widgets.HBox) and "grace_hopper_04.jpg" in w.children[-1].value)
    row.children[1].value = "person_1"
    assert read_subject_overrides(tmp_path / "d") == {"photos": {"grace_hopper_04.jpg": "person_1"},
                                                      "names": {"grace_hopper_01.jpg": "grace"}}


def test_overrides_rename_a_group_and_move_a_photo_to_the_other_person(photos, grouped):
    out = photos / "ds_group"
    # a group renamed through one of its photos; a Grace Hopper photo moved to the astronaut
    write_subject_overrides(out, names={"astronaut_01_headshot.jpg": "Eileen", "person_2": "grace"},
                            photos={"grace_hopper_04.jpg": "eileen"})
    result = prepare_photos(photos / "mixed", out, config=PrepareConfig(resolution=64, subjects="group"),
                            progress=False, previous=grouped)
    subjects = _subjects(result)
    assert {subjects[n] for n in ASTRONAUT} == {"eileen"}
    assert [subjects[n] for n in GRACE] == ["grace", "grace", "grace", "eileen"]
    moved = result.record("grace_hopper_04.jpg")
    # checked against the astronaut's photos only: it does not look like her
    assert moved.verdict == "reject" and "eileen's other photos" in moved.reasons[0]
    assert moved.measures["identity_similarity"] < SAME_PERSON_COSINE
    assert all(result.record(n).accepted for n in ASTRONAUT + GRACE[:3])
    assert result.reused == len(result.records)  # only the set-level choices were redone


def test_outliers_are_found_within_each_person(photos, by_folder, tmp_path):
    """A Grace Hopper photo in the astronaut's folder is rejected; Grace's own photos are not compared to the astronaut."""
    folder = tmp_path / "photos"
    shutil.copytree(photos / "photos", folder)
    g = Image.open(SAMPLE / "other_person" / "grace_hopper_02.jpg").convert("RGB")
    ImageOps.mirror(g).save(folder / "astronaut" / "intruder.jpg", quality=92)
    result = prepare_photos(folder, tmp_path / "ds", config=SMALL, progress=False)
    intruder = result.record("intruder.jpg")
    assert intruder.subject == "astronaut"
    assert intruder.verdict == "reject" and "different person from astronaut's other photos" in intruder.reasons[0]
    assert all(result.record(n).accepted for n in ASTRONAUT + GRACE), result.summary()
    assert all(result.record(n).measures["identity_similarity"] >= SAME_PERSON_COSINE for n in GRACE)


def test_auto_reads_subfolders_only_when_the_folder_holds_no_photos_itself(photos, tmp_path):
    files, subject_of, mode, notes = find_photos(photos / "photos", "auto")
    assert mode == "folders" and set(subject_of.values()) == {"astronaut", "grace"} and len(files) == 8
    files, subject_of, mode, notes = find_photos(photos / "mixed", "auto")
    assert mode == "one" and subject_of is None and notes == []
    shutil.copytree(photos / "photos", tmp_path / "p")
    shutil.copyfile(SAMPLE / "person" / ASTRONAUT[0], tmp_path / "p" / "loose.jpg")
    files, subject_of, mode, notes = find_photos(tmp_path / "p", "auto")
    assert mode == "one" and [f.name for f in files] == ["loose.jpg"] and "astronaut/" in notes[0]
    files, subject_of, mode, notes = find_photos(tmp_path / "p", "folders")
    assert len(files) == 9 and subject_of[tmp_path / "p" / "loose.jpg"] == ""
    (tmp_path / "p" / "Grace").mkdir()  # "Grace" and "grace" name the same person
    shutil.copyfile(SAMPLE / "other_person" / GRACE[0], tmp_path / "p" / "Grace" / "g.jpg")
    with pytest.raises(ValueError, match="both give the person's name 'grace'"):
        find_photos(tmp_path / "p", "folders")
    with pytest.raises(ValueError, match="subjects must be"):
        PrepareConfig(subjects="pairs")


def test_grouping_is_average_linkage_not_a_chain():
    """a~b and b~c are each above the limit, a and c far apart: a chain would join all three."""
    a, c = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    b = (a + c) / np.linalg.norm(a + c)  # 0.707 to each
    groups = group_faces([a, b, c, a * 2, c * 3], threshold=0.7)
    assert groups == [[0, 1, 3], [2, 4]] or groups == [[0, 3], [1, 2, 4]]
    assert group_faces([a, a, a], threshold=0.7) == [[0, 1, 2]]
    assert group_faces([a, c], threshold=0.7) == [[0], [1]]


# --------------------------------------------------------------------------- captions


@pytest.fixture(scope="module")
def captioned(by_folder, tiny_models, tmp_path_factory):
    src = by_folder[0].out_dir
    dataset = tmp_path_factory.mktemp("cap") / "dataset"
    shutil.copytree(src, dataset)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = caption_dataset(dataset, config=CaptionConfig(model=str(tiny_models / "blip"), num_beams=1,
                                                               max_new_tokens=8),
                                 tokenizer=None, progress=False)
    return dataset, result, [str(w.message) for w in caught]


def test_each_caption_carries_its_own_persons_identifier_once_and_no_other(captioned):
    dataset, result, _ = captioned
    assert result.subjects == {"astronaut": "TOK1 person", "grace": "TOK2 person"}
    rows = read_metadata(dataset)
    assert len(rows) == 8 and not result.failed
    for row in rows:
        own, other = ("TOK1", "TOK2") if row[SUBJECT_FIELD] == "astronaut" else ("TOK2", "TOK1")
        assert count_identifier(row["text"], own) == 1 and count_identifier(row["text"], other) == 0, row
        sidecar = (dataset / row["file_name"]).with_suffix(".txt").read_text().strip()
        assert sidecar == row["text"]
    config = read_caption_config(dataset)
    assert config[SUBJECTS_KEY] == {"astronaut": {"trigger": "TOK1 person", "token": "TOK1", "class_noun": "person"},
                                    "grace": {"trigger": "TOK2 person", "token": "TOK2", "class_noun": "person"}}
    assert "trigger" not in config  # no single trigger for several people
    assert len(load_captions(dataset)) == 8
    assert {r.subject for r in caption_table(dataset)} == {"astronaut", "grace"}


def test_a_caption_naming_the_other_person_is_refused(captioned, tmp_path):
    dataset = tmp_path / "d"
    shutil.copytree(captioned[0], dataset)
    row = next(r for r in read_metadata(dataset) if r[SUBJECT_FIELD] == "grace")
    sidecar = (dataset / row["file_name"]).with_suffix(".txt")
    sidecar.write_text(row["text"].replace("TOK2", "TOK1") + "\n")
    with pytest.raises(CaptionError, match="must have 'TOK2' exactly once"):
        load_captions(dataset)
    sidecar.write_text(row["text"] + " with TOK1 person\n")
    with pytest.raises(CaptionError, match=r"names another person \(TOK1\)"):
        load_captions(dataset)
    problems = {r.file_name: r.problem for r in caption_table(dataset)}
    assert problems[row["file_name"]] and sum(p is not None for p in problems.values()) == 1


def test_chosen_tokens_per_person_and_numbers_kept_on_rerun(captioned, tmp_path, tiny_models):
    dataset = tmp_path / "d"
    shutil.copytree(captioned[0], dataset)
    config = CaptionConfig(subjects="grace: GRACE woman", overwrite=True, model=None, num_beams=1, max_new_tokens=8)
    result = caption_dataset(dataset, config=config, tokenizer=None, progress=False)
    assert result.subjects == {"astronaut": "TOK1 person", "grace": "GRACE woman"}
    assert all(count_identifier(t, "GRACE") == 1 for f, t in result.captions.items()
               if "grace" in f) and not any("TOK2" in t for t in result.captions.values())
    with pytest.raises(CaptionError, match="the dataset's people are astronaut, grace"):
        caption_dataset(dataset, config=CaptionConfig(subjects={"ada": {"token": "ADA"}}), tokenizer=None, progress=False)
    # new tokens: a block of its own for each person, each caption with its own person's block once
    pivotal = caption_dataset(dataset, config=CaptionConfig(identifier_format="pivotal", overwrite=True, num_beams=1,
                                                            max_new_tokens=8), tokenizer=None, progress=False)
    assert pivotal.subjects == {"astronaut": "<s0><s1> person", "grace": "<s2><s3> person"}
    for f, t in pivotal.captions.items():
        own, other = ("<s2><s3>", "<s0><s1>") if "grace" in f else ("<s0><s1>", "<s2><s3>")
        assert count_identifier(t, own) == 1 and other not in t, t
    assert parse_subject_settings("ada: ADA woman Ada L; grace: GRACE") == {
        "ada": {"token": "ADA", "class_noun": "woman", "name": "Ada L"}, "grace": {"token": "GRACE"}}
    with pytest.raises(ValueError, match="cannot read"):
        parse_subject_settings("ada ADA")


def test_shared_clip_tokens_warn_for_tok1_tok2_and_not_for_distinct_words(captioned, tiny_models):
    _, _, messages = captioned
    assert any("'TOK1' (astronaut) and 'TOK2' (grace) share the CLIP token" in m for m in messages), messages
    tokenizer = load_clip_tokenizer(str(tiny_models / "sdxl"))
    assert tokenizer is not None
    shared = shared_token_warnings({"a": "TOK1", "b": "TOK2"}, tokenizer)
    assert len(shared) == 1 and "'tok</w>'" in shared[0]
    assert shared_token_warnings({"a": "sks", "b": "ohwx"}, tokenizer) == []
    assert shared_token_warnings({"a": "sks", "b": "ohwx", "c": "sks1"}, tokenizer)[0].count("sks") >= 2


def test_one_person_dataset_has_no_subjects_anywhere(tmp_path, tiny_models):
    files = [SAMPLE / "person" / n for n in ASTRONAUT[:2]]
    result = prepare_photos(files, tmp_path / "d", config=SMALL, progress=False)
    assert result.subjects == [] and all(SUBJECT_FIELD not in row for row in read_metadata(tmp_path / "d"))
    assert {row["subject"] for row in report_rows(result)} == {""}
    assert not (tmp_path / "d" / "subjects.json").exists()
    caption_dataset(tmp_path / "d", config=CaptionConfig(model=str(tiny_models / "blip"), num_beams=1, max_new_tokens=8),
                    tokenizer=None, progress=False)
    config = json.loads((tmp_path / "d" / "caption_config.json").read_text())
    assert config["trigger"] == "TOK person" and SUBJECTS_KEY not in config
