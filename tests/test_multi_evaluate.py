"""Evaluation of several people in one LoRA: identity per person, leakage between them, and who
appeared in an image of two people; on the two real people of sample_data (the astronaut and
Grace Hopper), where the answer is known."""

from __future__ import annotations

import json

import pytest
from PIL import Image, ImageEnhance, ImageOps

import lora_helpers.evaluate as ev
from lora_helpers.core.images import load_image
from lora_helpers.core.run_folder import (
    HELD_OUT_FIELD, SUBJECT_FIELD, SUBJECTS_KEY, read_run_config, write_caption_config, write_metadata,
    write_run_config,
)
from lora_helpers.evaluate.report import write_evaluation

TRIGGERS = {"astronaut": "TOK1 person", "grace": "TOK2 person"}


def _variants(path) -> list[Image.Image]:
    """More photos of the person in ``path``: a crop, a mirror, a warmer and a turned copy."""
    im = load_image(path)
    w, h = im.size
    return [
        im.crop((w // 10, h // 12, w - w // 10, h - h // 20)),
        ImageOps.mirror(im),
        ImageEnhance.Color(im).enhance(1.4),
        im.rotate(-8, resample=Image.BICUBIC, expand=True, fillcolor=(120, 120, 120)),
    ]


def _dataset(folder, people: dict[str, list], held_out: dict[str, list] | None = None, side: int = 384):
    """A prepared multi-person dataset: images/, metadata.jsonl rows with "subject" (and held-out
    rows), caption_config.json with the people's triggers."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for slug, photos in people.items():
        for held, items in ((False, photos), (True, (held_out or {}).get(slug, []))):
            for item in items:
                name = f"images/{len(rows):02d}-{slug}.png"
                image = load_image(item) if not isinstance(item, Image.Image) else item
                image = image.copy()
                image.thumbnail((side, side))
                image.save(folder / name)
                row = {"file_name": name, "text": f"a photo of {TRIGGERS[slug]}", SUBJECT_FIELD: slug}
                if held:
                    row[HELD_OUT_FIELD] = True
                rows.append(row)
    write_metadata(folder, rows)
    write_caption_config(folder, {SUBJECTS_KEY: {s: {"trigger": t, "token": t.split()[0], "class_noun": "person"}
                                                 for s, t in TRIGGERS.items()}})
    return folder


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, person, hopper):
    return _dataset(tmp_path_factory.mktemp("multi") / "dataset",
                    {"astronaut": person[:4], "grace": [hopper[0], *_variants(hopper[0])[:3]]})


@pytest.fixture(scope="module")
def refs(dataset):
    return ev.subject_references(dataset, progress=False)


def _side_by_side(left: Image.Image, right: Image.Image | None, height: int = 420) -> Image.Image:
    """One canvas with two photos (or one and an empty grey half): two people in one picture."""
    def fit(im):
        return im.resize((round(im.width * height / im.height), height), Image.LANCZOS)

    a = fit(left)
    b = fit(right) if right is not None else Image.new("RGB", a.size, (128, 128, 128))
    canvas = Image.new("RGB", (a.width + b.width, height), (128, 128, 128))
    canvas.paste(a, (0, 0))
    canvas.paste(b, (a.width, 0))
    return canvas


def test_each_person_is_embedded_from_their_own_rows_with_the_triggers(refs, dataset):
    assert refs.slugs == ["astronaut", "grace"] and refs.triggers == TRIGGERS
    assert len(refs.subjects["astronaut"].names) == 4 and len(refs.subjects["grace"].names) == 4
    assert all(n.endswith("-astronaut.png") for n in refs.subjects["astronaut"].names)
    assert all(n.endswith("-grace.png") for n in refs.subjects["grace"].names)
    # each person's photos agree with each other, not with the other person's
    for slug, other in (("astronaut", "grace"), ("grace", "astronaut")):
        own = refs.subjects[slug]
        assert own.upper_bound > refs.threshold
        assert float((own.embeddings @ refs.subjects[other].mean).max()) < refs.threshold
    assert refs.named("a photo of TOK2 person and tok1 person") == ("astronaut", "grace")
    assert refs.named("a photo of TOK10 person") == ()
    # One person's references from a multi-person dataset need the person named.
    with pytest.raises(ValueError, match="several people \\(astronaut, grace\\)"):
        ev.reference_embeddings(dataset, progress=False)
    with pytest.raises(ValueError, match="choose one of astronaut, grace"):
        ev.reference_embeddings(dataset, subject="ada", progress=False)
    assert ev.reference_embeddings(dataset, subject="grace", progress=False).names == refs.subjects["grace"].names


def test_identity_is_high_and_leakage_low_for_the_right_person_and_the_reverse_for_the_wrong(refs, person, hopper):
    astronaut = [load_image(person[5]), load_image(person[6])]
    grace = _variants(hopper[1])[:2]
    images = astronaut + grace + grace[:1]
    prompts = ["a photo of TOK1 person"] * 2 + ["a photo of TOK2 person on the beach"] * 2 + ["TOK1 person, smiling"]
    rows = ev.evaluate_images(images, references=refs, prompts=prompts, config=ev.EvaluateConfig(use_clip=False),
                              progress=False)
    assert [r["subject"] for r in rows] == ["astronaut"] * 2 + ["grace"] * 2 + ["astronaut"]
    for r in rows[:4]:  # the person prompted: their own face, the other person's far below
        assert r["identity_pass"] and r["identity"] > refs.threshold > r["leakage"], r
        assert r["identity"] - r["leakage"] > 0.05
        assert r["appeared_" + r["subject"]] and not any(r[f"appeared_{s}"] for s in refs.slugs if s != r["subject"])
    assert "leak_grace" in rows[0] and "leak_astronaut" not in rows[0]
    assert rows[0]["leakage"] == rows[0]["leak_grace"]
    # Grace prompted as the astronaut: the face is the other person's, which leakage shows.
    wrong = rows[4]
    assert not wrong["identity_pass"] and wrong["leak_grace"] > refs.threshold > wrong["identity"]
    assert wrong["appeared_grace"] and not wrong["appeared_astronaut"]
    assert wrong["leak_grace"] == pytest.approx(rows[2]["identity"], abs=1e-4)  # the same picture


def test_identity_during_training_counts_each_image_against_the_person_its_prompt_names(dataset, person, hopper,
                                                                                       tmp_path):
    from lora_helpers.train.events import TrainStart, ValidationHooks
    from lora_helpers.train.config import TrainConfig

    hook = ev.identity_validation_hook(dataset)
    listener = ValidationHooks([hook], tmp_path)
    # the trainer's validation: one prompt per person, two seeds each (prompts x seeds, row-major)
    listener.on_train_start(TrainStart(run_dir=tmp_path, config=TrainConfig(validation_seeds=(0, 1)), plan=None,
                                       start_step=0, resumed_from=None, n_images=8,
                                       validation_prompts=("a photo of TOK1 person", "a photo of TOK2 person")))
    right = [load_image(person[5]), load_image(person[6]), *_variants(hopper[1])[:2]]
    record = {}
    listener.on_validation(10, right, tmp_path / "grid.png", record)
    assert record["identity_astronaut"] > 0.9 and record["identity_grace"] > 0.9, record
    assert record["identity_mean"] > record["leakage"] + 0.05 and record["identity_pass_rate"] == 1.0
    written = json.loads((tmp_path / "identity-000010.json").read_text())
    assert [i["people"] for i in written["images"]] == [["astronaut"]] * 2 + [["grace"]] * 2

    swapped = right[2:] + right[:2]  # each person drawn where the other was prompted: it learned the wrong face
    record = {}
    listener.on_validation(20, swapped, tmp_path / "grid.png", record)
    assert record["identity_pass_rate"] == 0.0 and record["leakage"] > record["identity_mean"] + 0.05, record
    # pooled over both people, as the hook did before, the swap would not show
    pooled = ev.identity_validation_hook([*person[:4], hopper[0]], write_scores=False)(20, swapped, None)
    assert pooled["identity_mean"] > record["identity_mean"]


def test_two_people_in_one_picture_both_appear_and_one_alone_only_that_one(refs, person, hopper):
    both = _side_by_side(load_image(person[5]), _variants(hopper[1])[0])
    swapped = _side_by_side(_variants(hopper[1])[0], load_image(person[5]))
    alone = _side_by_side(load_image(person[5]), None)
    prompt = "a photo of TOK1 person and TOK2 person at a cafe"
    rows = ev.evaluate_images([both, swapped, alone], references=refs, prompts=[prompt] * 3,
                              config=ev.EvaluateConfig(use_clip=False), progress=False)
    for r in rows[:2]:
        assert r["subject"] == "astronaut+grace" and r["faces"] == 2
        assert r["appeared_astronaut"] and r["appeared_grace"] and r["identity_pass"]
        assert min(r["face_astronaut"], r["face_grace"]) > refs.threshold
        assert r["identity"] == pytest.approx((r["face_astronaut"] + r["face_grace"]) / 2, abs=1e-4)
        assert "leakage" not in r  # both people were asked for
    assert rows[0]["face_astronaut"] == pytest.approx(rows[1]["face_astronaut"], abs=0.02)  # left or right alike
    one = rows[2]
    assert one["faces"] == 1 and one["appeared_astronaut"] and not one["appeared_grace"]
    assert not one["identity_pass"] and one["face_grace"] == 0.0
    assert one["identity"] == pytest.approx(one["face_astronaut"] / 2, abs=1e-4)  # the missing person counts 0


def test_subject_summary_from_rows_with_known_numbers():
    def row(subject, identity, leakage=None, appeared=(), **kw):
        r = {"checkpoint": "final", "step": 10, "scale": 1.0, "subject": subject, "face_found": identity > 0,
             "identity": identity, "identity_pass": identity >= 0.9, "leakage": leakage}
        r.update({f"appeared_{s}": s in appeared for s in ("a", "b")}, **kw)
        return r

    rows = [row("a", 0.95, 0.5, "a"), row("a", 0.85, 0.93, "b"), row("b", 0.0, None),
            row("a+b", 0.9, None, "ab"), row("a+b", 0.5, None, "a"),
            {"checkpoint": "final", "scale": 1.0, "subject": "a", "error": "unreadable"}]
    summary = {s["subject"]: s for s in ev.subject_summary(rows)}
    assert list(summary) == ["a", "b", "a+b"]
    a = summary["a"]
    assert a["images"] == 2 and a["identity_mean"] == pytest.approx(0.9) and a["identity_pass_rate"] == 0.5
    assert a["leakage_mean"] == pytest.approx(0.715) and a["appeared_rate"] == 0.5 and a["others_appeared_rate"] == 0.5
    assert summary["b"]["faces_found"] == 0.0 and summary["b"]["appeared_rate"] == 0.0
    assert summary["a+b"]["appeared_rate"] == 0.5 and summary["a+b"]["identity_mean"] == pytest.approx(0.7)
    assert summary["a+b"]["others_appeared_rate"] == 0.0


def test_prompts_per_person_and_for_two_people():
    prompts = ev.subject_prompts(TRIGGERS, categories=("portrait", "place"), per_category=1)
    assert [p.prompt_id for p in prompts] == ["astronaut-portrait-00", "astronaut-place-00", "grace-portrait-00",
                                             "grace-place-00", "astronaut+grace-together-00"]
    assert prompts[2].text == "a close-up portrait photo of TOK2 person" and prompts[2].subjects == ("grace",)
    assert prompts[-1].text == "a photo of TOK1 person and TOK2 person at a cafe"
    assert prompts[-1].subjects == ("astronaut", "grace")
    custom = ev.subject_prompts(TRIGGERS, templates=["{subject} in the snow", "{grace} hugs {astronaut}"])
    assert [(p.text, p.subjects) for p in custom] == [
        ("TOK1 person in the snow", ("astronaut",)), ("TOK2 person in the snow", ("grace",)),
        ("TOK2 person hugs TOK1 person", ("astronaut", "grace"))]
    for template, words in (("{ada} at a cafe", "not one of the LoRA's people; use {astronaut}, {grace}"),
                            ("a cafe", "names nobody")):
        with pytest.raises(ValueError, match=words):
            ev.subject_prompts(TRIGGERS, templates=[template])


def _two_person_run(run_dir, tiny_models):
    """A run of the two people as the train stage records it: "subjects" in config.json, no top-level trigger."""
    from lora_helpers.core.random_lora import make_random_lora

    run = make_random_lora(run_dir, tiny_models / "sdxl", checkpoint_steps=(1, 2))
    cfg = read_run_config(run)
    cfg.pop("trigger", None)
    cfg[SUBJECTS_KEY] = {s: {"trigger": t, "class_noun": "person", "images": 4} for s, t in TRIGGERS.items()}
    write_run_config(run, cfg)
    return run


def test_a_two_person_run_is_scored_per_person_with_leakage_and_written(tmp_path, tiny_models, refs, monkeypatch,
                                                                         dataset, capsys):
    from lora_helpers.evaluate import run as evaluate_run_module

    run = _two_person_run(tmp_path / "run", tiny_models)
    config = ev.EvaluateConfig(categories=("portrait",), prompts_per_category=1, seeds=(0,), scales=(0.0, 1.0),
                               checkpoints="final", clip_model=str(tiny_models / "clip"), resolution=64,
                               num_inference_steps=2)
    result = ev.evaluate_run(run, references=refs, config=config, progress=False)
    # per person the standard prompt, and one prompt naming both; for the base model and the final LoRA
    assert sorted({(r["prompt_id"], r["subject"]) for r in result.rows}) == [
        ("astronaut+grace-together-00", "astronaut+grace"), ("astronaut-portrait-00", "astronaut"),
        ("grace-portrait-00", "grace")]
    assert len(result.rows) == 3 * 2
    texts = {r["subject"]: r["prompt"] for r in result.rows}
    assert "TOK1 person" in texts["astronaut"] and "TOK2" not in texts["astronaut"]
    assert "TOK1 person" in texts["astronaut+grace"] and "TOK2 person" in texts["astronaut+grace"]
    for r in result.rows:  # random weights draw nobody: no face, nobody appeared, identity counted 0
        assert r["identity"] == 0.0 and not r["appeared_astronaut"] and not r["appeared_grace"]
        assert r["clip_t"] is not None and r["clip_i"] is not None
    assert {(s["checkpoint"], s["subject"]) for s in result.subjects} == {
        (c, s) for c in ("base", "final") for s in ("astronaut", "grace", "astronaut+grace")}
    for key in ("scores", "summary", "plot", "report", "subjects", "leakage_plot"):
        assert result.files[key].is_file() and result.files[key].stat().st_size > 0, key
    header = result.files["scores"].read_text().splitlines()[0].split(",")
    assert {"subject", "appeared_astronaut", "appeared_grace", "face_astronaut", "face_grace"} <= set(header)
    report = json.loads(result.files["report"].read_text())
    assert report["subjects"] == TRIGGERS and set(report["held_out"]) == {"astronaut", "grace"}
    assert report["people"]["grace"]["references"] == refs.subjects["grace"].names
    text = ev.format_summary(result)
    assert "astronaut (TOK1 person): references: 4 with a face" in text and "astronaut+grace" in text

    # Resumed from the images on disk, here through the CLI with the multi-person dataset as the references.
    from lora_helpers.cli import main

    monkeypatch.setattr(evaluate_run_module, "generate_images", lambda *a, **k: pytest.fail("images must be reused"))
    assert main(["evaluate", str(run), "--references", str(dataset), "--checkpoints", "final", "--scales", "0", "1",
                 "--seeds", "0", "--categories", "portrait", "--prompts-per-category", "1", "--clip-model",
                 str(tiny_models / "clip"), "--resolution", "64", "--steps", "2"]) == 0
    again = ev.read_scores_csv(result.files["scores"])
    assert [(r["subject"], r["identity"]) for r in again] == [(r["subject"], r["identity"]) for r in result.rows]
    assert "astronaut+grace" in capsys.readouterr().out
    # One person's references do not fit a run of two (and the reverse), each said in one line.
    with pytest.raises(ValueError, match="several people \\(astronaut, grace\\)"):
        ev.evaluate_run(run, references=refs.subjects["astronaut"], config=config, progress=False)
    with pytest.raises(ValueError, match="one-person run"):
        ev.evaluate_run(_one_person(tmp_path, tiny_models), references=refs, config=config, progress=False)


def _one_person(tmp_path, tiny_models):
    from lora_helpers.core.random_lora import make_random_lora

    return make_random_lora(tmp_path / "one", tiny_models / "sdxl")


def test_summary_and_leakage_plot_written_for_rows_with_known_leakage(tmp_path, refs):
    rows = []
    for scale, identity, leak in ((0.0, 0.5, 0.5), (1.0, 0.95, 0.6)):
        for slug, other, more in (("astronaut", "grace", 0.0), ("grace", "astronaut", 0.1)):
            rows.append({"checkpoint": "base" if scale == 0 else "final", "step": 10, "scale": scale, "subject": slug,
                         "face_found": True, "identity": identity, "identity_pass": identity > refs.threshold,
                         f"leak_{other}": leak + more, "leakage": leak + more,
                         f"appeared_{slug}": identity > refs.threshold, f"appeared_{other}": False})
    result = write_evaluation(rows, refs, ev.EvaluateConfig(use_clip=False), tmp_path, extra={})
    final = [s for s in result.subjects if s["checkpoint"] == "final"]
    assert [(s["subject"], s["identity_mean"], s["leakage_mean"], s["appeared_rate"]) for s in final] == [
        ("astronaut", 0.95, 0.6, 1.0), ("grace", 0.95, pytest.approx(0.7), 1.0)]
    written = {(r["checkpoint"], r["subject"]): r for r in ev.read_scores_csv(result.files["subjects"])}
    assert written[("final", "grace")]["leakage_mean"] == 0.7 and written[("base", "astronaut")]["leakage_mean"] == 0.5
    assert result.files["leakage_plot"].stat().st_size > 0
    # One person: the outputs are those of before (no per-person file, no leakage plot).
    single = write_evaluation([{k: v for k, v in r.items() if k in ("checkpoint", "step", "scale", "identity")}
                               for r in rows], refs.subjects["astronaut"], ev.EvaluateConfig(use_clip=False),
                              tmp_path / "one", extra={})
    assert set(single.files) == {"scores", "summary", "report", "plot"} and single.subjects is None
    # Again into the first folder: the per-person table and plot of the earlier evaluation go, so
    # they cannot be read as this one's; a file of the same name that no evaluation wrote stays.
    (tmp_path / "one" / "subjects.csv").write_text("mine\n")
    for folder in (tmp_path, tmp_path / "one"):
        write_evaluation([{k: v for k, v in r.items() if k in ("checkpoint", "step", "scale", "identity")}
                          for r in rows], refs.subjects["astronaut"], ev.EvaluateConfig(use_clip=False), folder,
                         extra={})
    assert not (tmp_path / "subjects.csv").exists() and not (tmp_path / "identity_vs_leakage.png").exists()
    assert (tmp_path / "identity_vs_prompt.png").is_file() and (tmp_path / "one" / "subjects.csv").read_text() == "mine\n"


def test_held_out_photos_are_kept_per_person(tmp_path, person, hopper):
    folder = _dataset(tmp_path / "dataset", {"astronaut": person[:3], "grace": [hopper[0], *_variants(hopper[0])[:2]]},
                      held_out={"astronaut": [person[3]]})
    refs = ev.subject_references(folder, progress=False)
    astronaut, grace = refs.subjects["astronaut"], refs.subjects["grace"]
    assert astronaut.held_out is not None and astronaut.held_out.names == ["03-astronaut.png"]
    assert astronaut.names == ["00-astronaut.png", "01-astronaut.png", "02-astronaut.png"]
    assert grace.held_out is None and grace.held_out_note.startswith("the dataset has 3 usable photos of grace")
    rows = ev.evaluate_images([load_image(person[6]), _variants(hopper[1])[1]], references=refs,
                              prompts=["TOK1 person", "TOK2 person"], config=ev.EvaluateConfig(use_clip=False),
                              progress=False)
    assert rows[0]["identity_heldout"] > refs.threshold and rows[1]["identity_heldout"] is None
    text = ev.format_references(refs)
    assert "grace (TOK2 person):" in text and "astronaut: held-out photos: 1 (03-astronaut.png)" in ev.held_out_line(refs)
