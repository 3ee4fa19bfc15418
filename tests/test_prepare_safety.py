"""Preparation owns only what it wrote, inside the folders it was given (issue 14, data loss).

Every case runs the command line as a person would, checks the exit code and that the
message names the folder or file without a traceback, and hashes every input and
hand-made file before and after: they must be byte-identical.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from PIL import Image

from lora_helpers.cli import main
from lora_helpers.core import fileio

SAMPLE = Path(__file__).resolve().parents[1] / "sample_data"
HEADSHOT = SAMPLE / "person" / "astronaut_01_headshot.jpg"
MIRRORED = SAMPLE / "person" / "astronaut_05_mirrored_cool.jpg"
NO_FACE = SAMPLE / "problems" / "no_face.jpg"


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (hidden ones too) -> its SHA-256."""
    return {p.relative_to(folder).as_posix(): fileio.sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _photos(folder: Path, *sources: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for src in sources:
        (folder / src.name).write_bytes(src.read_bytes())
    return folder


def _prepare(capsys, photos, dataset, *extra) -> tuple[int, str, str]:
    code = main(["prepare", str(photos), str(dataset), "--resolution", "64", "--no-progress", *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def test_a_dataset_folder_that_holds_the_photos_is_refused_before_anything(tmp_path, capsys):
    out = tmp_path / "OUT"
    photos = _photos(out / "images", HEADSHOT, NO_FACE)
    (photos / "astronaut_01_headshot.txt").write_text("my notes on this photo\n")
    (photos / "no_face.png").write_bytes(NO_FACE.read_bytes())  # an original a crop would replace
    before = _tree(tmp_path)

    code, _, err = _prepare(capsys, photos, out)
    assert code == 2
    assert f"dataset folder {out} contains the photo folder {photos.resolve()}" in err
    assert _tree(tmp_path) == before

    code, _, err = _prepare(capsys, photos, photos / "dataset")  # the other way round
    assert code == 2 and "lies inside the photo folder" in err and str(photos.resolve()) in err
    code, _, err = _prepare(capsys, photos, photos)
    assert code == 2 and "is the photo folder" in err
    assert _tree(tmp_path) == before


def test_files_prepare_did_not_write_are_never_deleted_or_overwritten(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", HEADSHOT, MIRRORED)
    dataset = tmp_path / "dataset"
    (dataset / "images").mkdir(parents=True)
    # A person's own file where a crop would go, and notes beside the crops.
    (dataset / "images" / "astronaut_01_headshot.png").write_bytes(NO_FACE.read_bytes())
    (dataset / "images" / "my_notes.txt").write_text("notes\n")
    mine = _tree(dataset)
    inputs = _tree(photos)

    code, out, _ = _prepare(capsys, photos, dataset)
    assert code == 0
    assert "images/astronaut_01_headshot.png" in out and "images/astronaut_01_headshot_2.png" in out
    rows = fileio.read_jsonl(dataset / "metadata.jsonl")
    assert [r["file_name"] for r in rows] == ["images/astronaut_01_headshot_2.png", "images/astronaut_05_mirrored_cool.png"]
    manifest = json.loads((dataset / ".lora_helpers_manifest.json").read_text())
    assert "images/astronaut_01_headshot_2.png" in manifest["files"]
    assert "images/astronaut_01_headshot.png" not in manifest["files"]

    # A crop touched up by hand is no longer the stage's: a re-run that drops its photo keeps it.
    touched = dataset / "images" / "astronaut_05_mirrored_cool.png"
    touched.write_bytes(touched.read_bytes() + b"edited")
    mine[touched.relative_to(dataset).as_posix()] = fileio.sha256_file(touched)
    (photos / MIRRORED.name).unlink()
    inputs = _tree(photos)
    code, _, _ = _prepare(capsys, photos, dataset)
    assert code == 0
    after = _tree(dataset)
    assert {k: after.get(k) for k in mine} == mine
    assert _tree(photos) == inputs
    assert not (dataset / "masks" / "astronaut_05_mirrored_cool.png").exists()  # its own mask goes


def test_a_rerun_without_usable_photos_changes_nothing(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", HEADSHOT)
    dataset = tmp_path / "dataset"
    assert _prepare(capsys, photos, dataset)[0] == 0
    row = fileio.read_jsonl(dataset / "metadata.jsonl")[0]
    fileio.write_jsonl(dataset / "metadata.jsonl", [dict(row, text="a photo of TOK person, by hand")])
    (dataset / "images" / "astronaut_01_headshot.txt").write_text("a photo of TOK person, by hand\n")
    before = _tree(dataset)

    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = _prepare(capsys, empty, dataset)
    assert code == 1 and "photo folder is empty" in err and f"the dataset in {dataset} was left as it was" in err
    assert _tree(dataset) == before

    unusable = _photos(tmp_path / "unusable", NO_FACE)
    (unusable / "notes.txt").write_text("not a photo")
    code, _, err = _prepare(capsys, unusable, dataset)
    assert code == 1 and "no_face.jpg" in err and "notes.txt" in err and "left as it was" in err
    assert _tree(dataset) == before


def test_captions_of_photos_that_drop_out_are_kept_aside_and_come_back(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", HEADSHOT, NO_FACE)
    dataset = tmp_path / "dataset"
    assert _prepare(capsys, photos, dataset, "--accept", "no_face.jpg")[0] == 0
    rows = fileio.read_jsonl(dataset / "metadata.jsonl")
    fileio.write_jsonl(dataset / "metadata.jsonl", [dict(r, text=f"a photo of TOK person, {r['source']}") for r in rows])
    caption = dataset / "images" / "no_face.txt"
    caption.write_text("a photo of TOK person, written by hand\n")
    (dataset / "images" / "my_notes.txt").write_text("notes\n")
    kept = {"caption": fileio.sha256_file(caption), "notes": fileio.sha256_file(dataset / "images" / "my_notes.txt")}

    code, out, _ = _prepare(capsys, photos, dataset)  # the --accept is not repeated
    assert code == 0 and "no_face.jpg" in out and "dropped/images/no_face.txt" in out
    assert not caption.exists() and not (dataset / "images" / "no_face.png").exists()
    assert fileio.sha256_file(dataset / "dropped" / "images" / "no_face.txt") == kept["caption"]
    assert fileio.sha256_file(dataset / "images" / "my_notes.txt") == kept["notes"]
    assert [r["source"] for r in fileio.read_jsonl(dataset / "metadata.jsonl")] == ["astronaut_01_headshot.jpg"]

    assert _prepare(capsys, photos, dataset, "--accept", "no_face.jpg")[0] == 0  # the photo comes back
    assert fileio.sha256_file(caption) == kept["caption"]
    assert not (dataset / "dropped" / "images" / "no_face.txt").exists()
    texts = {r["source"]: r.get("text") for r in fileio.read_jsonl(dataset / "metadata.jsonl")}
    assert texts == {"astronaut_01_headshot.jpg": "a photo of TOK person, astronaut_01_headshot.jpg",
                     "no_face.jpg": "a photo of TOK person, no_face.jpg"}
    assert fileio.sha256_file(dataset / "images" / "my_notes.txt") == kept["notes"]


def test_a_photo_keeps_its_crop_name_and_caption_file_when_a_photo_of_the_same_name_arrives(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(HEADSHOT).save(photos / "x.png")
    dataset = tmp_path / "dataset"
    assert _prepare(capsys, photos, dataset)[0] == 0
    caption = dataset / "images" / "x.txt"
    caption.write_text("a photo of TOK person, the PNG photo\n")
    crop = fileio.sha256_file(dataset / "images" / "x.png")

    (photos / "x.jpg").write_bytes(MIRRORED.read_bytes())  # listed before x.png
    assert _prepare(capsys, photos, dataset)[0] == 0
    sources = {r["file_name"]: r["source"] for r in fileio.read_jsonl(dataset / "metadata.jsonl")}
    assert sources == {"images/x.png": "x.png", "images/x_jpg.png": "x.jpg"}  # x.png's caption stays beside it
    assert fileio.sha256_file(dataset / "images" / "x.png") == crop
    assert caption.read_text() == "a photo of TOK person, the PNG photo\n"

    (photos / "x.png").unlink()  # the first photo goes: the second keeps its name, the caption goes aside
    assert _prepare(capsys, photos, dataset)[0] == 0
    assert [r["file_name"] for r in fileio.read_jsonl(dataset / "metadata.jsonl")] == ["images/x_jpg.png"]
    assert not caption.exists() and (dataset / "dropped" / "images" / "x.txt").is_file()


def test_a_photo_name_that_is_not_utf8_is_named_and_prepared(tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    odd = Path(os.fsdecode(os.fsencode(photos) + b"/caf\xe9.jpg"))  # as a Windows zip unpacks it
    odd.write_bytes(HEADSHOT.read_bytes())
    before = _tree(photos)

    code, out, _ = _prepare(capsys, photos, tmp_path / "dataset")
    assert code == 0 and "b'caf\\xe9.jpg' is not UTF-8" in out
    rows = fileio.read_jsonl(tmp_path / "dataset" / "metadata.jsonl")  # whole, and valid UTF-8 JSON
    assert [r["file_name"] for r in rows] == ["images/caf_.png"] and rows[0]["source"] == "caf\ufffd.jpg"
    assert (tmp_path / "dataset" / "images" / "caf_.png").is_file()
    assert _tree(photos) == before


def test_a_dataset_from_before_the_manifest_is_taken_over_without_renaming(tmp_path, capsys):
    photos = _photos(tmp_path / "photos", HEADSHOT)
    dataset = tmp_path / "dataset"
    assert _prepare(capsys, photos, dataset)[0] == 0
    (dataset / ".lora_helpers_manifest.json").unlink()  # as an earlier version left the folder
    before = _tree(dataset)
    code, out, _ = _prepare(capsys, photos, dataset)
    assert code == 0 and "note:" not in out
    after = _tree(dataset)
    assert {k: v for k, v in after.items() if k != ".lora_helpers_manifest.json"} == before
    files = json.loads((dataset / ".lora_helpers_manifest.json").read_text())["files"]
    assert files["images/astronaut_01_headshot.png"] == before["images/astronaut_01_headshot.png"]


def test_settings_and_a_file_in_the_folders_place_are_refused_before_any_photo_is_read(tmp_path, sample_data,
                                                                                        capsys, monkeypatch):
    from lora_helpers.cli import main
    from lora_helpers.prepare import photo

    calls = []
    monkeypatch.setattr(photo, "process_photo", lambda *a, **k: calls.append(a) or None)
    (tmp_path / "afile").write_text("not a folder")
    code = main(["prepare", str(sample_data / "person"), str(tmp_path / "afile"), "--resolution", "64"])
    err = capsys.readouterr().err
    assert code != 0 and "afile: a file stands where the dataset folder" in err and "Traceback" not in err
    code = main(["prepare", str(sample_data / "person"), str(tmp_path / "ds"), "--face-fraction", "0"])
    err = capsys.readouterr().err
    assert code != 0 and "face_fraction must be above 0" in err and "Traceback" not in err
    assert calls == [] and (tmp_path / "afile").read_text() == "not a folder"
