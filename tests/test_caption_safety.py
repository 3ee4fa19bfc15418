"""Captions: rows stay inside the dataset, bad files get a sentence, hand edits win wherever made (issue 14)."""

from __future__ import annotations

import json

import pytest
from PIL import Image
from train_helpers import make_dataset

from lora_helpers.caption import CaptionConfig, CaptionError, CaptionWarning, caption_dataset, load_captions, save_caption
from lora_helpers.cli import main
from lora_helpers.core import fileio
from lora_helpers.train.data import read_training_images


def _tree(folder) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): fileio.sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def _caption_cli(capsys, dataset, tiny_models, *extra) -> tuple[int, str, str]:
    code = main(["caption", str(dataset), "--model", str(tiny_models / "blip"), "--num-beams", "1",
                 "--max-new-tokens", "8", *extra])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _append_row(dataset, row: dict) -> int:
    """Add a row to metadata.jsonl; its line number."""
    lines = (dataset / "metadata.jsonl").read_text().splitlines()
    (dataset / "metadata.jsonl").write_text("\n".join(lines + [json.dumps(row)]) + "\n")
    return len(lines) + 1


@pytest.fixture
def dataset(tmp_path):
    """A prepared dataset of 2 images, not captioned yet."""
    return make_dataset(tmp_path / "dataset", n=2, with_captions=False)


@pytest.mark.parametrize("key, name", [("file_name", "../outside.png"), ("file_name", "/tmp/outside.png"),
                                       ("mask_file", "../outside.png")])
def test_a_row_naming_a_file_outside_the_dataset_is_refused(tmp_path, dataset, tiny_models, capsys, key, name):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "outside.png")
    (tmp_path / "outside.txt").write_text("someone else's file\n")
    row = {"file_name": "images/astronaut_00.png", key: name} if key == "mask_file" else {key: name}
    line = _append_row(dataset, row)
    before = {**{f"in/{k}": v for k, v in _tree(dataset).items()}, "outside.txt": fileio.sha256_file(tmp_path / "outside.txt")}

    code, _, err = _caption_cli(capsys, dataset, tiny_models)
    assert code == 1 and f"metadata.jsonl, line {line}: {key} {name!r}" in err
    after = {**{f"in/{k}": v for k, v in _tree(dataset).items()}, "outside.txt": fileio.sha256_file(tmp_path / "outside.txt")}
    assert after == before  # nothing written, inside or out

    with pytest.raises(ValueError, match=f"line {line}: {key}"):  # training refuses it too
        read_training_images(dataset, instance_prompt="a photo of TOK person")


def test_a_broken_json_line_is_named_by_file_and_line(dataset, tiny_models, capsys):
    with open(dataset / "metadata.jsonl", "a") as f:
        f.write('{"file_name": "images/x.png", broken\n')
    before = _tree(dataset)
    code, _, err = _caption_cli(capsys, dataset, tiny_models)
    assert code == 1 and "metadata.jsonl, line 3: not valid JSON" in err
    assert _tree(dataset) == before
    with pytest.raises(ValueError, match="metadata.jsonl, line 3: not valid JSON"):
        read_training_images(dataset)


def test_a_caption_that_is_not_utf8_is_named_and_kept(dataset, tiny_models, capsys):
    latin1 = dataset / "images" / "astronaut_00.txt"
    latin1.write_bytes("a photo of TOK person in a caf\u00e9\n".encode("latin-1"))
    before = fileio.sha256_file(latin1)
    code, out, _ = _caption_cli(capsys, dataset, tiny_models)
    assert code == 1 and "images/astronaut_00.txt is not UTF-8 text" in out
    assert fileio.sha256_file(latin1) == before
    assert (dataset / "images" / "astronaut_01.txt").is_file()  # the other image is captioned
    with pytest.raises(CaptionError, match="astronaut_00.txt is not UTF-8"):
        load_captions(dataset)


def test_an_edit_in_metadata_wins_over_the_sidecar_the_stage_wrote(dataset, tiny_models, capsys):
    assert _caption_cli(capsys, dataset, tiny_models)[0] == 0
    rows = fileio.read_jsonl(dataset / "metadata.jsonl")
    rows[0]["text"] = "a photo of TOK person, edited in metadata.jsonl"
    fileio.write_jsonl(dataset / "metadata.jsonl", rows)
    name = rows[0]["file_name"]

    with pytest.warns(CaptionWarning, match="edited in metadata.jsonl"):  # training reads the edit
        assert load_captions(dataset)[name] == rows[0]["text"]
    with pytest.warns(CaptionWarning):
        assert read_training_images(dataset)[0].caption == rows[0]["text"]

    code, out, _ = _caption_cli(capsys, dataset, tiny_models)  # a re-run keeps it and copies it to the .txt
    assert code == 0 and "0 captioned, 2 kept" in out
    assert fileio.read_jsonl(dataset / "metadata.jsonl")[0]["text"] == rows[0]["text"]
    assert (dataset / name).with_suffix(".txt").read_text().strip() == rows[0]["text"]
    assert load_captions(dataset)[name] == rows[0]["text"]

    # Then an edit in the .txt file wins the same way.
    (dataset / name).with_suffix(".txt").write_text("a photo of TOK person, edited in the txt\n")
    assert _caption_cli(capsys, dataset, tiny_models)[0] == 0
    assert fileio.read_jsonl(dataset / "metadata.jsonl")[0]["text"] == "a photo of TOK person, edited in the txt"


def test_a_caption_edited_differently_in_both_files_changes_neither(dataset, tiny_models, capsys):
    assert _caption_cli(capsys, dataset, tiny_models)[0] == 0
    rows = fileio.read_jsonl(dataset / "metadata.jsonl")
    rows[1]["text"] = "a photo of TOK person, edit one"
    fileio.write_jsonl(dataset / "metadata.jsonl", rows)
    sidecar = (dataset / rows[1]["file_name"]).with_suffix(".txt")
    sidecar.write_text("a photo of TOK person, edit two\n")
    before = {"meta": fileio.sha256_file(dataset / "metadata.jsonl"), "txt": fileio.sha256_file(sidecar)}

    code, out, _ = _caption_cli(capsys, dataset, tiny_models)
    assert code == 1 and "images/astronaut_01.txt" in out and "were both edited and differ" in out
    assert {"meta": fileio.sha256_file(dataset / "metadata.jsonl"), "txt": fileio.sha256_file(sidecar)} == before
    with pytest.raises(CaptionError, match="astronaut_01.txt and the 'text' of its row"):
        load_captions(dataset)
    with pytest.raises(ValueError, match="were both edited"):  # no instance prompt papers over it
        read_training_images(dataset, instance_prompt="a photo of TOK person")


def test_saving_one_caption_keeps_an_edit_of_another_in_metadata(dataset, tiny_models):
    config = CaptionConfig(model=str(tiny_models / "blip"), num_beams=1, max_new_tokens=8)
    caption_dataset(dataset, config=config, progress=False)
    rows = fileio.read_jsonl(dataset / "metadata.jsonl")
    rows[1]["text"] = "a photo of TOK person, edited in metadata.jsonl"
    fileio.write_jsonl(dataset / "metadata.jsonl", rows)
    save_caption(dataset, rows[0]["file_name"], "a photo of TOK person, saved in the editor")
    with pytest.warns(CaptionWarning):
        captions = load_captions(dataset)
    assert list(captions.values()) == ["a photo of TOK person, saved in the editor",
                                       "a photo of TOK person, edited in metadata.jsonl"]
