"""Caption stage: BLIP captions with one identifier, both file formats, hand edits kept."""

from __future__ import annotations

import argparse
import json
import random

import pytest
from PIL import Image

from lora_helpers.caption import stage as cap
from lora_helpers.caption import (
    CaptionConfig,
    CaptionError,
    CaptionWarning,
    caption_dataset,
    caption_table,
    check_identifier,
    count_identifier,
    load_captions,
    save_caption,
    standardise_caption,
    subject_phrase,
)
from lora_helpers.core.fileio import read_jsonl, write_jsonl

# Crops of the astronaut photo: different content per image, like a person's photo set.
BOXES = [(120, 20, 320, 220), (160, 70, 290, 200), (80, 10, 380, 310), (0, 200, 250, 450)]


def _write_images(folder, n=len(BOXES), size=64):
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photo = Image.fromarray(data.astronaut())
    names = []
    for i, box in enumerate(BOXES[:n]):
        name = f"astronaut_{i:02d}.png"
        photo.crop(box).resize((size, size), Image.Resampling.LANCZOS).save(folder / name)
        names.append(name)
    return names


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread is several times faster than two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def dataset(tmp_path):
    """A folder shaped like the prepare stage's output (images/, metadata.jsonl with extra keys)."""
    root = tmp_path / "dataset"
    names = _write_images(root / "images")
    rows = [{"file_name": f"images/{n}", "mask_file": f"masks/{n}", "original_size": [512, 512],
             "source": n.replace(".png", ".jpg"), "face_clarity_score": 0.9} for n in names]
    write_jsonl(root / "metadata.jsonl", rows)
    return root


@pytest.fixture(scope="session")
def clip_tokenizer(tiny_models):
    return cap.load_clip_tokenizer(str(tiny_models / "sdxl"))


@pytest.fixture
def config(tiny_models):
    return CaptionConfig(model=str(tiny_models / "blip"), batch_size=3, num_beams=2, max_new_tokens=12)


# --------------------------------------------------------------------------- standardisation

REALISTIC = [
    ("arafed man in a suit standing in front of a building", "a photo of TOK person in a suit standing in front of a building"),
    ("a woman with long hair smiling", "a photo of TOK person with long hair smiling"),
    ("there is a young boy that is standing in front of a wall", "a photo of TOK person standing in front of a wall"),
    ("araffe woman sitting on a bench with her legs crossed", "a photo of TOK person sitting on a bench with her legs crossed"),
    ("a man man in a suit and tie tie", "a photo of TOK person in a suit and tie"),
    ("a close up of a woman's face with blue eyes", "a photo of a close up of TOK person's face with blue eyes"),
    ("a dog sitting next to a woman in a park", "a photo of a dog sitting next to TOK person in a park"),
    ("a view of a city street at night", "a photo of TOK person, a view of a city street at night"),
    ("an old man wearing a hat and glasses in front of a", "a photo of TOK person wearing a hat and glasses in front"),
]


@pytest.mark.parametrize("raw, expected", REALISTIC)
def test_standardise_realistic_blip_sentences(raw, expected):
    out = standardise_caption(raw, subject="TOK person")
    assert out == expected
    assert count_identifier(out, "TOK") == 1
    assert "araf" not in out and "there is" not in out


def test_substitution_is_on_word_boundaries_only():
    out = standardise_caption("a man standing on a street in tokyo", subject="TOK person")
    assert "tokyo" in out and count_identifier(out, "TOK") == 1
    # BLIP's own copy of the identifier ("sks" is also a rifle) must not make a second one.
    out = standardise_caption("a man holding an sks rifle", subject="sks person")
    assert count_identifier(out, "sks") == 1 and "rifle" in out
    # A word-like identifier cannot eat the phrase it replaces.
    out = standardise_caption("a man in a suit next to a man", subject="man person")
    assert count_identifier(out, "man") == 1 and out.startswith("a photo of man person in a suit")


def test_identifier_exactly_once_for_any_blip_output():
    words = "a man woman tok TOK tokyo sks person there is arafed in front of the photo with hair boy's".split()
    rng = random.Random(0)
    for _ in range(300):
        raw = " ".join(rng.choice(words) for _ in range(rng.randint(0, 14)))
        for subject in ("TOK person", "TOK person Ada", "@ada", "sks woman"):
            out = standardise_caption(raw, subject=subject)
            assert count_identifier(out, subject.split()[0]) == 1, (raw, subject, out)
            assert subject in out


def test_identifier_formats_and_templates():
    assert subject_phrase(CaptionConfig()) == "TOK person"
    assert subject_phrase(CaptionConfig(name="Ada")) == "TOK person Ada"
    assert subject_phrase(CaptionConfig(name="Ada Lovelace", identifier_format="at")) == "@ada_lovelace"
    assert subject_phrase(CaptionConfig(identifier_format="at")) == "@tok"
    out = standardise_caption("a woman with long hair smiling", subject="@ada")
    assert out == "a photo of @ada with long hair smiling"
    assert count_identifier("email me at x@ada.org or @adam", "@ada") == 0
    out = standardise_caption("a view of a city", subject="TOK person", template="{caption}, {subject}")
    assert out == "a view of a city, TOK person"
    with pytest.raises(ValueError, match="subject"):
        CaptionConfig(template="a photo of {caption}")
    with pytest.raises(ValueError, match="identifier"):
        standardise_caption("a man", subject="TOK person", template="tok style, {subject}")
    with pytest.raises(ValueError, match="token"):
        CaptionConfig(token="two words")


def test_check_identifier_warns_for_common_and_long_words(clip_tokenizer):
    assert check_identifier("TOK person", clip_tokenizer) == []
    assert any("common word" in m for m in check_identifier("man person", clip_tokenizer))
    assert any("common word" in m for m in check_identifier("@photo"))
    long = check_identifier("zqxvwkjqzpf person", clip_tokenizer)
    assert long and "CLIP tokens" in long[0]
    assert any("estimated" in m for m in check_identifier("zqxvwkjqzpfhq person"))  # no tokenizer: rough count
    assert cap.clip_token_count("a photo of TOK person", clip_tokenizer) == 7  # 5 words + begin/end


# --------------------------------------------------------------------------- BLIP


def test_blip_captions_are_deterministic_and_batching_does_not_change_them(tiny_models):
    from skimage import data

    model, processor = cap.load_blip(str(tiny_models / "blip"))
    photo = Image.fromarray(data.astronaut())
    images = [photo.crop(b) for b in BOXES[:3]]
    kw = dict(model=model, processor=processor, num_beams=2, max_new_tokens=10, progress=False)
    first = cap.generate_captions(images, batch_size=3, **kw)
    assert len(first) == 3 and all(isinstance(c, str) and c.strip() for c in first)
    assert cap.generate_captions(images, batch_size=3, **kw) == first
    assert cap.generate_captions(images, batch_size=1, **kw) == first
    assert next(model.parameters()).dtype.is_floating_point and not model.training


def test_batched_captions_equal_one_by_one_and_transformers_own(tiny_models):
    import torch
    from skimage import data

    model, processor = cap.load_blip(str(tiny_models / "blip"))
    # The tiny model's weights (std 0.02) give every image the same caption; drawn larger, the captions
    # follow the image, so a batch that mixed up its images would show.
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 2 and "embeddings" not in name:
                param.normal_(0, 0.1)
    photo = Image.fromarray(data.astronaut())
    images = [photo.crop(b) for b in BOXES]
    for num_beams, prompt in ((3, None), (1, None), (3, "a picture of")):
        kw = dict(model=model, processor=processor, num_beams=num_beams, max_new_tokens=8, prompt=prompt,
                  progress=False)
        batched = cap.generate_captions(images, batch_size=len(images), **kw)
        assert len(set(batched)) == len(images), batched
        assert cap.generate_captions(images, batch_size=1, **kw) == batched
        assert cap.generate_captions(images, batch_size=3, **kw) == batched  # and a shorter last batch
        if prompt is None:  # what BlipForConditionalGeneration.generate itself says
            inputs = processor(images=images, return_tensors="pt")
            with torch.inference_mode():
                ids = model.generate(**inputs, do_sample=False, num_beams=num_beams, max_new_tokens=8,
                                     min_new_tokens=5, repetition_penalty=1.3)
            assert [c.strip() for c in processor.batch_decode(ids, skip_special_tokens=True)] == batched
    # the decoder's own attention modules are back in place
    assert {type(layer.crossattention.self).__name__ for layer in model.text_decoder.bert.encoder.layer} == {
        "BlipTextSelfAttention"}


def test_image_attention_is_blips_cross_attention_with_keys_once_per_image(tiny_models):
    import torch

    from lora_helpers.caption.blip import _ImageAttention

    model, _ = cap.load_blip(str(tiny_models / "blip"))
    attention = model.text_decoder.bert.encoder.layer[0].crossattention.self
    torch.manual_seed(0)
    images = torch.randn(3, 17, model.config.text_config.encoder_hidden_size)
    hidden = torch.randn(3 * 2, 4, model.config.text_config.hidden_size)  # 3 images x 2 beams, 4 tokens
    with torch.no_grad():
        attention.query.weight.mul_(300)  # sharp attention: a beam paired with another row's query would show
        ours, our_probs = _ImageAttention(attention, images, num_beams=2)(hidden)
        theirs, their_probs = attention(hidden, encoder_hidden_states=images.repeat_interleave(2, dim=0))
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(our_probs, their_probs)
    assert their_probs.max() > 0.5  # the attention is sharp indeed


# --------------------------------------------------------------------------- dataset folder


def test_caption_dataset_writes_both_formats_that_reload(dataset, config, clip_tokenizer):
    before = read_jsonl(dataset / "metadata.jsonl")
    result = caption_dataset(dataset, config=config, tokenizer=clip_tokenizer, progress=False)
    assert sorted(result.generated) == sorted(r["file_name"] for r in before) and not result.failed
    rows = read_jsonl(dataset / "metadata.jsonl")
    assert [r["file_name"] for r in rows] == [r["file_name"] for r in before]
    for old, row in zip(before, rows):
        assert {k: row[k] for k in old} == old, "prepare's keys are kept"
        assert count_identifier(row["text"], "TOK") == 1 and "TOK person" in row["text"]
        assert (dataset / row["file_name"]).is_file()  # imagefolder: file_name relative to metadata.jsonl
        sidecar = (dataset / row["file_name"]).with_suffix(".txt")
        assert sidecar.read_text(encoding="utf-8").strip() == row["text"]
    assert load_captions(dataset, require_identifier="TOK person") == {r["file_name"]: r["text"] for r in rows}
    saved = json.loads((dataset / "caption_config.json").read_text())
    assert saved["trigger"] == "TOK person" and saved["template"] == config.template
    assert not [p for p in dataset.rglob(".*tmp*")], "no temp files left"


def test_hand_edits_survive_a_rerun(dataset, config, clip_tokenizer, monkeypatch):
    caption_dataset(dataset, config=config, tokenizer=clip_tokenizer, progress=False)
    names = list(load_captions(dataset))
    sidecar0 = (dataset / names[0]).with_suffix(".txt")
    sidecar0.write_text("a photo of TOK person laughing on a beach\n", encoding="utf-8")
    # An edit made in metadata.jsonl only (sidecar deleted) is kept too.
    (dataset / names[1]).with_suffix(".txt").unlink()
    rows = read_jsonl(dataset / "metadata.jsonl")
    rows[1]["text"] = "a photo of TOK person in a red jacket"
    write_jsonl(dataset / "metadata.jsonl", rows)

    def no_blip(*a, **k):
        raise AssertionError("BLIP must not load when every image has a caption")

    monkeypatch.setattr(cap, "load_blip", no_blip)
    result = caption_dataset(dataset, config=config, tokenizer=clip_tokenizer, progress=False)
    assert result.generated == [] and sorted(result.kept) == sorted(names)
    captions = load_captions(dataset)
    assert captions[names[0]] == "a photo of TOK person laughing on a beach"
    assert captions[names[1]] == "a photo of TOK person in a red jacket"
    assert (dataset / names[1]).with_suffix(".txt").read_text().strip() == "a photo of TOK person in a red jacket"
    assert read_jsonl(dataset / "metadata.jsonl")[0]["text"] == "a photo of TOK person laughing on a beach"

    monkeypatch.undo()
    result = caption_dataset(dataset, config=CaptionConfig(**{**config.__dict__, "overwrite": True}),
                             tokenizer=clip_tokenizer, progress=False)
    assert sorted(result.generated) == sorted(names)
    assert load_captions(dataset)[names[0]] != "a photo of TOK person laughing on a beach"


def test_blip_is_released_after_captioning(dataset, config, clip_tokenizer, monkeypatch):
    import gc
    import weakref

    refs = []
    real_load = cap.load_blip

    def tracking_load(*args, **kwargs):
        model, processor = real_load(*args, **kwargs)
        refs.append(weakref.ref(model))
        return model, processor

    monkeypatch.setattr(cap, "load_blip", tracking_load)
    result = caption_dataset(dataset, config=config, tokenizer=clip_tokenizer, progress=False)
    gc.collect()
    assert len(refs) == 1 and result.generated
    assert refs[0]() is None, "BLIP must not stay in memory: training loads SDXL next"


def test_folders_without_metadata(tmp_path, config, clip_tokenizer):
    with_images = tmp_path / "a"
    _write_images(with_images / "images", n=2)
    plain = tmp_path / "b"
    _write_images(plain, n=2)
    (plain / "notes.md").write_text("not an image")
    for folder, prefix in ((with_images, "images/"), (plain, "")):
        result = caption_dataset(folder, config=config, tokenizer=clip_tokenizer, progress=False)
        assert sorted(result.captions) == [f"{prefix}astronaut_00.png", f"{prefix}astronaut_01.png"]
        assert [r["file_name"] for r in read_jsonl(folder / "metadata.jsonl")] == list(result.captions)
        assert load_captions(folder, require_identifier="TOK") == result.captions


def test_bad_input_gets_messages_naming_the_file(tmp_path, dataset, config, clip_tokenizer):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CaptionError, match="no images"):
        caption_dataset(tmp_path / "empty", config=config, tokenizer=clip_tokenizer)
    with pytest.raises(CaptionError, match="no images"):
        load_captions(tmp_path / "empty")

    # One unreadable image: the others are captioned, the bad one is named.
    (dataset / "images" / "astronaut_03.png").write_bytes(b"not a png")
    with pytest.warns(CaptionWarning, match="astronaut_03.png"):
        result = caption_dataset(dataset, config=config, tokenizer=clip_tokenizer, progress=False)
    assert list(result.failed) == ["images/astronaut_03.png"] and len(result.captions) == 3
    with pytest.raises(CaptionError) as err:
        load_captions(dataset)
    assert list(err.value.problems) == ["images/astronaut_03.png"] and "no caption" in str(err.value)

    (dataset / "images" / "astronaut_03.txt").write_text("  \n")
    (dataset / "images" / "astronaut_00.txt").write_text("a photo of a person on a beach\n")
    with pytest.raises(CaptionError) as err, pytest.warns(CaptionWarning, match="differ"):
        load_captions(dataset, require_identifier="TOK")
    assert err.value.problems.keys() == {"images/astronaut_00.png", "images/astronaut_03.png"}
    assert "empty caption" in err.value.problems["images/astronaut_03.png"]
    assert "identifier 'TOK'" in err.value.problems["images/astronaut_00.png"]
    assert "images/astronaut_00.png" in str(err.value)


def test_missing_listed_image_is_skipped_with_a_warning(dataset, config, clip_tokenizer):
    caption_dataset(dataset, config=config, tokenizer=clip_tokenizer, progress=False)
    (dataset / "images" / "astronaut_01.png").unlink()
    with pytest.warns(CaptionWarning, match="astronaut_01.png"):
        captions = load_captions(dataset, require_identifier="TOK")
    assert "images/astronaut_01.png" not in captions and len(captions) == len(BOXES) - 1


def test_sidecar_wins_over_metadata_with_one_warning(dataset, config, clip_tokenizer):
    caption_dataset(dataset, config=config, tokenizer=clip_tokenizer, progress=False)
    rows = read_jsonl(dataset / "metadata.jsonl")
    for row in rows[:2]:
        (dataset / row["file_name"]).with_suffix(".txt").write_text(f"a photo of TOK person, edited {row['source']}")
    with pytest.warns(CaptionWarning) as record:
        captions = load_captions(dataset)
    assert len([w for w in record if "differ" in str(w.message)]) == 1
    assert captions[rows[0]["file_name"]].endswith("edited " + rows[0]["source"])


def test_long_captions_and_kept_captions_without_identifier_warn(dataset, config, clip_tokenizer):
    names = [r["file_name"] for r in read_jsonl(dataset / "metadata.jsonl")]
    long = "a photo of TOK person, " + ", ".join(["wearing a red hat"] * 25)
    for name in names:
        (dataset / name).with_suffix(".txt").write_text(long)
    (dataset / names[1]).with_suffix(".txt").write_text("a photo of a person")
    with pytest.warns(CaptionWarning):
        result = caption_dataset(dataset, config=config, tokenizer=clip_tokenizer, progress=False)
    assert any(names[0] in m and "CLIP tokens" in m for m in result.warnings)
    assert any(names[1] in m and "0 times" in m for m in result.warnings)


def test_save_caption_updates_both_formats(dataset, config, clip_tokenizer):
    caption_dataset(dataset, config=config, tokenizer=clip_tokenizer, progress=False)
    name = read_jsonl(dataset / "metadata.jsonl")[2]["file_name"]
    save_caption(dataset, name, "  a photo of TOK person\nin the snow ")
    assert (dataset / name).with_suffix(".txt").read_text().strip() == "a photo of TOK person in the snow"
    assert read_jsonl(dataset / "metadata.jsonl")[2]["text"] == "a photo of TOK person in the snow"
    with pytest.raises(CaptionError, match=name):
        save_caption(dataset, name, "   ")
    with pytest.raises(CaptionError, match="nope.png"):
        save_caption(dataset, "images/nope.png", "a photo of TOK person")
    table = caption_table(dataset, tokenizer=clip_tokenizer)
    assert [r.file_name for r in table] == list(load_captions(dataset))
    assert all(r.has_identifier and r.tokens and r.problem is None for r in table)


def test_caption_editor_saves_edits(dataset, config, clip_tokenizer):
    pytest.importorskip("ipywidgets")
    from lora_helpers.ui.caption_editor import caption_editor

    caption_dataset(dataset, config=config, tokenizer=clip_tokenizer, progress=False)
    editor = caption_editor(dataset, tokenizer=clip_tokenizer)
    first_row = editor.children[2]  # after the header and the Save-all button
    area = first_row.children[1].children[1]
    save = first_row.children[1].children[2].children[0]
    status = first_row.children[1].children[2].children[1]
    area.value = "a photo of a person"
    assert "0 times" in status.value
    area.value = "a photo of TOK person at the beach"
    save.click()
    name = read_jsonl(dataset / "metadata.jsonl")[0]["file_name"]
    assert load_captions(dataset)[name] == "a photo of TOK person at the beach"
    assert "saved" in status.value


def test_cli_captions_with_name_and_token(dataset, tiny_models):
    parser = argparse.ArgumentParser()
    cap.add_cli_arguments(parser)
    args = parser.parse_args([str(dataset), "--token", "sks", "--class-noun", "woman", "--name", "Ada",
                              "--model", str(tiny_models / "blip"), "--max-new-tokens", "8", "--num-beams", "1"])
    assert cap.run_cli(args) == 0
    captions = load_captions(dataset, require_identifier="sks woman Ada")
    assert len(captions) == len(BOXES)
    assert json.loads((dataset / "caption_config.json").read_text())["trigger"] == "sks woman Ada"
    args = parser.parse_args([str(dataset.parent / "missing")])
    assert cap.run_cli(args) == 1
