"""Evaluation beyond the training photos: identity on held-out photos, the memorisation flag,
and two runs compared on the same prompts and seeds."""

from __future__ import annotations

import io
import json
from dataclasses import replace

import pytest
from PIL import Image, ImageOps

import lora_helpers.evaluate as ev
from lora_helpers.core.images import load_image
from lora_helpers.core.fileio import sha256_file
from lora_helpers.core.run_folder import HELD_OUT_FIELD, read_run_config, write_metadata, write_run_config
from lora_helpers.evaluate.report import write_evaluation


def _dataset(folder, training, held_out=(), *, side: int = 384, mark_training: bool = False):
    """A prepared dataset as the prepare stage writes it: images/ and metadata.jsonl with the held-out rows
    marked (training rows carry ``held_out: false`` with ``mark_training``, else no field)."""
    (folder / "images").mkdir(parents=True)
    rows = []
    for i, (path, held) in enumerate([(p, False) for p in training] + [(p, True) for p in held_out]):
        name = f"images/{i:02d}-{path.stem}.png"
        image = load_image(path)
        image.thumbnail((side, side))
        image.save(folder / name)
        row = {"file_name": name, "text": "a photo of TOK person"}
        if held or mark_training:
            row[HELD_OUT_FIELD] = held
        rows.append(row)
    write_metadata(folder, rows)
    return folder


def _names(photos, start: int = 0) -> list[str]:
    return [f"{i:02d}-{p.stem}.png" for i, p in enumerate(photos, start)]


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _tilted(path) -> Image.Image:
    """Another picture of the person in ``path``: turned, cropped and smaller (no copy of it)."""
    image = load_image(path).rotate(10, resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128))
    w, h = image.size
    return image.crop((w // 10, h // 12, w - w // 10, h)).resize((w * 2 // 5, h * 2 // 5), Image.LANCZOS)


@pytest.mark.parametrize("trained_on", ["hopper", "astronaut"])
def test_identity_against_held_out_photos_tells_the_two_people_apart(tmp_path, person, hopper, trained_on):
    # The two people of sample_data: one trained on, the other only held out.
    astronaut = [person[0], person[3]]
    training, held_out = (hopper, astronaut[:1]) if trained_on == "hopper" else (astronaut, hopper[:1])
    refs = ev.reference_embeddings(_dataset(tmp_path / "dataset", training, held_out), progress=False)
    assert refs.names == _names(training)
    assert refs.held_out is not None and refs.held_out.names == _names(held_out, len(training))
    assert refs.held_out_note == "" and refs.held_out_upper_bound < refs.threshold  # another person

    seen, unseen = (_tilted(hopper[0]), load_image(person[5])) if trained_on == "hopper" else \
        (load_image(person[5]), _tilted(hopper[1]))
    s_seen, s_unseen = ev.identity_scores([seen, unseen], refs, progress=False)
    # An image of the trained person matches the training photos, not the held-out one; and the reverse.
    assert s_seen.similarity > refs.threshold > s_seen.heldout_similarity
    assert s_unseen.heldout_similarity > refs.threshold > s_unseen.similarity
    assert s_seen.similarity - s_seen.heldout_similarity > 0.05
    assert s_unseen.heldout_similarity - s_unseen.similarity > 0.05
    assert not s_seen.memorised and not s_unseen.memorised  # new pictures, not copies

    rows = ev.evaluate_images([seen, unseen], references=refs, config=ev.EvaluateConfig(use_clip=False),
                              progress=False)
    assert [r["identity_heldout"] for r in rows] == pytest.approx(
        [s_seen.heldout_similarity, s_unseen.heldout_similarity], abs=1e-4)
    result = write_evaluation(rows, refs, ev.EvaluateConfig(use_clip=False), tmp_path / "out", extra={})
    (summary,) = result.summary
    assert summary["identity_heldout_mean"] == pytest.approx(
        (s_seen.heldout_similarity + s_unseen.heldout_similarity) / 2, abs=1e-4)
    report = json.loads(result.files["report"].read_text())
    assert report["held_out"]["photos"] == refs.held_out.names and report["held_out"]["not_available"] is None
    assert "held-out photos: 1" in ev.format_summary(result)
    assert "identity_heldout" in result.files["scores"].read_text().splitlines()[0]
    # The validation hook logs it during training too.
    stats = ev.identity_validation_hook(refs)(10, [seen, unseen], None)
    assert stats["identity_heldout_mean"] == pytest.approx(summary["identity_heldout_mean"], abs=1e-4)
    assert stats["memorised"] == 0


@pytest.mark.parametrize("count, mark_training, reason", [
    (3, False, "the dataset has 3 usable photos; 8 or more are needed to hold one out"),
    (8, True, "no photo was held out"),  # held_out: false on every row is a training photo too
])
def test_without_held_out_photos_the_summary_says_why_in_one_line(tmp_path, person, count, mark_training, reason):
    folder = _dataset(tmp_path / "dataset", person[:count], side=256, mark_training=mark_training)
    refs = ev.reference_embeddings(folder, progress=False)
    assert refs.held_out is None and len(refs.names) == count
    assert refs.held_out_note.startswith(reason)
    rows = ev.evaluate_images([load_image(person[5])], references=refs, config=ev.EvaluateConfig(use_clip=False),
                              progress=False)
    assert rows[0]["identity_heldout"] is None and rows[0]["identity"] > refs.threshold
    result = write_evaluation(rows, refs, ev.EvaluateConfig(use_clip=False), tmp_path / "out", extra={})
    text = ev.format_summary(result)
    (line,) = [l for l in text.splitlines() if "held-out" in l and "not available" in l]
    assert line == f"held-out identity not available: {refs.held_out_note}"
    assert json.loads(result.files["report"].read_text())["held_out"]["not_available"] == refs.held_out_note


def _copies(image: Image.Image) -> dict[str, Image.Image]:
    """What a generator that memorised a photo might hand back: resized and compressed, mirrored, squeezed."""
    w, h = image.size
    return {
        "half size, JPEG 75": _jpeg(image.resize((w // 2, h // 2), Image.LANCZOS), 75),
        "mirrored, JPEG 85": _jpeg(ImageOps.mirror(image), 85),
        "1024 x 1024": image.resize((1024, 1024), Image.BICUBIC),
    }


def test_copy_fingerprint_flags_copies_and_not_other_photos_of_the_samples(person, hopper, sample_data):
    photos = {p.name: load_image(p) for p in person + hopper}
    index = ev.copy_index(list(photos.items()))
    for name, image in photos.items():
        for how, copy in _copies(image).items():
            match = index.match(copy)
            assert (match.photo, match.memorised) == (name, True), f"{how} copy of {name}: {match}"
        # Every other sample photo, with this one left out of the index, is a different photo: no copy.
        others = ev.copy_index([(n, im) for n, im in photos.items() if n != name])
        match = others.match(image)
        assert not match.memorised, f"{name} taken for a copy of {match.photo} ({match.similarity:.3f})"
    # The prepare stage's near-duplicate example (resized to 96 %, JPEG 72) is a copy of the photo it came from.
    match = index.match(load_image(sample_data / "problems" / "near_duplicate.jpg"))
    assert match.photo == "astronaut_04_tilt_right_warm.jpg" and match.memorised
    assert ev.copy_index([]).match(photos[person[0].name]).photo is None


def test_a_generated_copy_of_a_training_photo_is_flagged_in_scores_and_summary(tmp_path, person, hopper):
    dataset = _dataset(tmp_path / "dataset", person[:3], held_out=hopper[:1])
    trained = load_image(dataset / "images" / _names(person[:3])[1])
    held = load_image(dataset / "images" / _names(hopper[:1], 3)[0])
    images = tmp_path / "generated"
    images.mkdir()
    made = {"copy.png": _copies(trained)["half size, JPEG 75"], "flipped.png": ImageOps.mirror(trained),
            "new.png": load_image(person[5]), "held_out_copy.png": held}
    for name, image in made.items():
        image.save(images / name)
    config = ev.EvaluateConfig(use_clip=False)
    rows = {r["image"]: r for r in ev.evaluate_images(images, references=dataset, config=config, progress=False)}
    for name in ("copy.png", "flipped.png"):
        assert rows[name]["memorised"] is True and rows[name]["nearest_training_photo"] == _names(person[:3])[1]
        assert rows[name]["copy_similarity"] >= ev.COPY_THRESHOLD
    # a new picture of the person is no copy; nor is a copy of a photo the model never trained on
    assert rows["new.png"]["memorised"] is False and rows["new.png"]["copy_similarity"] < ev.COPY_THRESHOLD
    assert rows["held_out_copy.png"]["memorised"] is False
    refs = ev.reference_embeddings(dataset, progress=False)
    result = write_evaluation(list(rows.values()), refs, config, tmp_path / "out", extra={})
    (summary,) = result.summary
    assert summary["memorised"] == 2
    report = json.loads(result.files["report"].read_text())
    assert report["memorised"]["count"] == 2
    assert sorted(r["image"] for r in report["memorised"]["images"]) == ["copy.png", "flipped.png"]
    assert "2 image(s) are near-copies of a training photo" in ev.format_summary(result)
    read_back = {r["image"]: r for r in ev.read_scores_csv(result.files["scores"])}
    assert read_back["copy.png"]["memorised"] is True and read_back["new.png"]["memorised"] is False
    assert read_back["copy.png"]["nearest_training_photo"] == _names(person[:3])[1]


def test_two_runs_compared_on_the_same_prompts_and_seeds(tmp_path, tiny_models, person, hopper, monkeypatch, capsys):
    from lora_helpers.cli import main
    from lora_helpers.core.random_lora import make_random_lora
    from lora_helpers.evaluate import run as evaluate_run_module

    # Two ways of training one person: different identifiers, different weights, one dataset.
    run_a = make_random_lora(tmp_path / "tok", tiny_models / "sdxl", seed=1, trigger="TOK person")
    run_b = make_random_lora(tmp_path / "sks", tiny_models / "sdxl", seed=2, trigger="sks person")
    dataset = _dataset(tmp_path / "dataset", person[:2], held_out=person[3:4], side=320)
    refs = ev.reference_embeddings(dataset, progress=False)
    # run_b was trained before the photo was held out: config.json lists it among its training images.
    held_file = dataset / "images" / _names(person[3:4], 2)[0]
    write_run_config(run_b, {**read_run_config(run_b), "dataset": {"images": [
        {"file_name": f"images/{held_file.name}", "sha256": sha256_file(held_file)}]}})
    config = ev.EvaluateConfig(categories=("portrait",), prompts_per_category=2, seeds=(0, 1), scales=(1.0,),
                               clip_model=str(tiny_models / "clip"), resolution=64, num_inference_steps=2)
    comparison = ev.compare_runs([run_a, run_b], references=refs, config=config, progress=False)

    assert comparison.labels == ["tok", "sks"]
    table = ev.read_scores_csv(comparison.files["table"])
    assert comparison.files["table"] == run_a / "evaluation" / "comparison.csv"
    per_prompt = [r for r in table if r["prompt_id"] != "all"]
    assert [(r["prompt_id"], r["run"]) for r in per_prompt] == [
        ("portrait-00", "tok"), ("portrait-00", "sks"), ("portrait-01", "tok"), ("portrait-01", "sks")]
    assert {r["seeds"] for r in per_prompt} == {"0 1"} and {r["images"] for r in per_prompt} == {2}
    assert all("TOK person" in r["prompt"] for r in per_prompt if r["run"] == "tok")
    assert all("sks person" in r["prompt"] for r in per_prompt if r["run"] == "sks")
    overall = {r["run"]: r for r in table if r["prompt_id"] == "all"}
    assert set(overall) == {"tok", "sks"} and overall["tok"]["images"] == 4
    for r in table:  # random LoRAs draw no face: identity 0, numbers not empty cells
        assert r["identity_mean"] == 0.0 and r["memorised"] == 0
        assert r["clip_t_mean"] is not None and r["scale"] == 1.0
        # the photo run_b trained on is no held-out photo for it: no held-out score, not a wrong one
        assert r["identity_heldout_mean"] == (0.0 if r["run"] == "tok" else None)
    a_refs, b_refs = (result.references for result in comparison.results)
    assert a_refs.held_out is not None and b_refs.held_out is None
    assert "this run trained on the held-out photo" in ev.held_out_line(b_refs)
    # each run's own numbers are those of its own evaluation at the compared checkpoint and scale
    for label, result in zip(comparison.labels, comparison.results):
        own = [s for s in result.summary if (s["checkpoint"], s["scale"]) == (overall[label]["checkpoint"], 1.0)]
        assert overall[label]["clip_t_mean"] == pytest.approx(own[0]["clip_t_mean"], abs=1e-5)
    assert overall["tok"]["clip_t_mean"] != overall["sks"]["clip_t_mean"]  # two runs, not one twice
    with Image.open(comparison.files["plot"]) as im:
        assert im.format == "PNG" and im.size[0] > 300
    assert "portrait-00" in ev.format_comparison(comparison)

    # A run evaluated with other seeds is refused, naming both runs.
    other_seeds = ev.evaluate_run(run_b, references=refs, config=replace(config, seeds=(5,)),
                                  out_dir=tmp_path / "other_seeds", progress=False)
    with pytest.raises(ValueError, match="tok and .* different prompts or seeds"):
        ev.compare_runs([comparison.results[0], other_seeds], references=refs)

    # The CLI: `evaluate RUN --compare OTHER_RUN` reuses the images on disk and writes the same table.
    monkeypatch.setattr(evaluate_run_module, "generate_images",
                        lambda *a, **k: pytest.fail("images on disk must be reused"))
    (run_a / "evaluation" / "comparison.csv").unlink()
    args = ["evaluate", str(run_a), "--references", str(tmp_path / "dataset"), "--compare", str(run_b),
            "--scales", "1", "--seeds", "0", "1", "--categories", "portrait", "--prompts-per-category", "2",
            "--clip-model", str(tiny_models / "clip"), "--resolution", "64", "--steps", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "held-out photos: 1" in out and "comparison:" in out
    assert ev.read_scores_csv(run_a / "evaluation" / "comparison.csv") == table
    # --compare with a folder that is no run: one line, before anything is evaluated
    scores = run_a / "evaluation" / "scores.csv"
    before = scores.stat().st_mtime_ns
    assert main(args[:5] + [str(tmp_path / "dataset")] + args[5:]) == 1
    assert "--compare compares training runs" in capsys.readouterr().err
    assert scores.stat().st_mtime_ns == before


def test_held_out_photos_a_run_trained_on_are_left_out_of_its_held_out_score(tmp_path, person, hopper):
    dataset = _dataset(tmp_path / "dataset", person[:2], held_out=[hopper[0], person[3]], side=320)
    refs = ev.reference_embeddings(dataset, progress=False)
    first, second = _names([hopper[0], person[3]], 2)
    assert refs.held_out.names == [first, second]
    assert ev.without_trained_photos(refs, set()) is refs  # not recorded: nothing to drop
    assert ev.without_trained_photos(refs, {"0" * 64}) is refs
    with pytest.warns(UserWarning, match=first):
        fewer = ev.without_trained_photos(refs, {sha256_file(dataset / "images" / first)})
    assert fewer.held_out.names == [second] and refs.held_out.names == [first, second]  # refs itself unchanged
    # The held-out score now measures the astronaut photo alone: an astronaut image passes it.
    (score,) = ev.identity_scores([load_image(person[5])], fewer, progress=False)
    assert score.heldout_similarity > fewer.threshold


def _result(tmp_path, name: str, identity: dict[tuple[str, float], float], copied: int = 0) -> ev.EvaluationResult:
    """An evaluated run made of rows with known scores: 2 prompts x 2 seeds per checkpoint and scale."""
    rows = []
    for (ckpt, scale), value in identity.items():
        for pid in ("portrait-00", "place-00"):
            for seed in (0, 1):
                rows.append({"checkpoint": ckpt, "step": int(ckpt.split("-")[-1]) if "-" in ckpt else 200,
                             "scale": scale, "prompt_id": pid, "prompt": f"{pid} of {name}", "seed": seed,
                             "face_found": True, "identity": value + seed / 100, "identity_heldout": value - 0.1,
                             "identity_pass": True, "clip_t": 0.2, "memorised": pid == "portrait-00" and seed < copied})
    run_dir = tmp_path / name
    return ev.EvaluationResult(rows=rows, summary=ev.summarize(rows), choice=None, references=None,
                               out_dir=run_dir / "evaluation", files={}, run_dir=run_dir)


def test_compare_runs_at_a_named_checkpoint_and_scale_with_known_numbers(tmp_path):
    settings = {("checkpoint-100", 0.5): 0.80, ("checkpoint-100", 1.0): 0.85, ("final", 0.5): 0.90, ("final", 1.0): 0.95}
    a = _result(tmp_path, "tok", settings, copied=2)
    b = _result(tmp_path, "pivotal", {k: v - 0.05 for k, v in settings.items()})
    # No choice recorded: the last checkpoint at its highest scale.
    default = ev.compare_runs([a, b], references=None, out_dir=tmp_path / "cmp")
    overall = {r["run"]: r for r in default.rows if r["prompt_id"] == "all"}
    assert (overall["tok"]["checkpoint"], overall["tok"]["scale"]) == ("final", 1.0)
    assert overall["tok"]["identity_mean"] == pytest.approx(0.955)  # 0.95 and 0.96 for the two seeds
    assert overall["pivotal"]["identity_heldout_mean"] == pytest.approx(0.80)
    assert (overall["tok"]["memorised"], overall["pivotal"]["memorised"]) == (2, 0)
    portrait = {r["run"]: r for r in default.rows if r["prompt_id"] == "portrait-00"}
    assert portrait["tok"]["memorised"] == 2 and portrait["tok"]["prompt"] == "portrait-00 of tok"
    # By step and scale.
    named = ev.compare_runs([a, b], references=None, checkpoint="100", scale=0.5, labels=["A", "B"],
                            out_dir=tmp_path / "cmp")
    overall = {r["run"]: r for r in named.rows if r["prompt_id"] == "all"}
    assert (overall["A"]["checkpoint"], overall["A"]["scale"], overall["A"]["identity_mean"]) == \
        ("checkpoint-100", 0.5, pytest.approx(0.805))
    assert overall["B"]["identity_mean"] == pytest.approx(0.755)
    assert [r["run"] for r in ev.read_scores_csv(named.files["table"])][:2] == ["A", "B"]
    with pytest.raises(ValueError, match="checkpoint-999.*it has checkpoint-100 at scale 0.5"):
        ev.compare_runs([a, b], references=None, checkpoint="checkpoint-999", out_dir=tmp_path / "cmp")
    with pytest.raises(ValueError, match="name each of the 2 runs once"):
        ev.compare_runs([a, b], references=None, labels=["A", "A"], out_dir=tmp_path / "cmp")
    with pytest.raises(ValueError, match="at least two runs"):
        ev.compare_runs([a], references=None)
