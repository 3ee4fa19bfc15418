"""Evaluation: identity likeness on real photos, CLIP scores, checkpoint choice, CLI, hook."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest
from PIL import Image, ImageOps
from PIL.PngImagePlugin import PngInfo

import lora_helpers.evaluate as ev
from lora_helpers.core.images import load_image


@pytest.fixture(scope="module")
def refs(person):
    # The first four photos are the references; the others are held out as "generated".
    return ev.reference_embeddings(person[:4], progress=False)


def _derived(path) -> list[Image.Image]:
    """Crops, rotations, a mirror, a small and a grey copy of one astronaut photo."""
    im = load_image(path)
    w, h = im.size
    return [
        im.rotate(12, resample=Image.BICUBIC, expand=True, fillcolor=(128, 128, 128)),
        im.crop((w // 8, 0, w - w // 8, int(h * 0.7))),
        ImageOps.mirror(im),
        im.resize((w // 3, h // 3), Image.LANCZOS),
        ImageOps.grayscale(im).convert("RGB"),
    ]


def test_astronaut_scores_high_and_above_grace_hopper(refs, person, sample_data):
    assert len(refs.names) == 4 and len(refs.leave_one_out) == 4
    assert refs.upper_bound > refs.threshold
    same = list(person[4:]) + _derived(person[0])
    others = sorted((sample_data / "other_person").glob("*.jpg"))
    same_scores = ev.identity_scores(same, refs, progress=False)
    other_scores = ev.identity_scores(others, refs, progress=False)
    assert all(s.face_found for s in same_scores + other_scores)
    assert all(s.passed for s in same_scores), [round(s.similarity, 3) for s in same_scores]
    assert not any(s.passed for s in other_scores)
    # A clear margin, not a coin flip at the threshold.
    assert min(s.similarity for s in same_scores) - max(s.similarity for s in other_scores) > 0.05


def test_no_face_counts_as_zero_and_an_unreadable_file_not_at_all(refs, person, sample_data):
    scores = ev.identity_scores([person[5], sample_data / "problems" / "no_face.jpg",
                                 sample_data / "problems" / "not_an_image.jpg"], refs, progress=False)
    assert scores[0].passed and scores[0].face_found
    assert scores[1].similarity == 0.0 and not scores[1].face_found and not scores[1].passed
    # unreadable: named, not scored (a broken file is not a LoRA that drew no face), batch goes on
    assert math.isnan(scores[2].similarity) and "not_an_image.jpg" in scores[2].error and not scores[2].passed
    stats = ev.identity_summary(scores)
    assert stats["unreadable"] == 1
    assert stats["faces_found"] == pytest.approx(1 / 2)
    assert stats["identity_pass_rate"] == pytest.approx(1 / 2)
    assert stats["identity_mean"] == pytest.approx(scores[0].similarity / 2)


def test_remove_identifier():
    assert ev.remove_identifier("a photo of TOK person, smiling", "TOK") == "a photo of person, smiling"
    assert ev.remove_identifier("TOK, on the beach", "TOK") == "on the beach"
    assert ev.remove_identifier("a TOKEN of TOK person", "TOK") == "a TOKEN of person"


def test_clip_t_runs_with_tiny_clip_and_removes_identifier(tiny_models, person):
    clip = ev.load_clip(tiny_models / "clip")
    images = [load_image(person[0]), load_image(person[1])]
    prompts = ["a photo of TOK person on the beach", "TOK person in the snow"]
    removed = ev.clip_scores(images, prompts, clip_model=clip, subject_phrase_to_remove="TOK")
    cleaned = ev.clip_scores(images, ["a photo of person on the beach", "person in the snow"], clip_model=clip)
    kept = ev.clip_scores(images, prompts, clip_model=clip)
    # CLIP-T is the cosine of the image and the (cleaned) prompt embeddings, computed here by hand
    by_hand = (clip.image_embeddings(images) * clip.text_embeddings(["a photo of person on the beach",
                                                                      "person in the snow"])).sum(axis=1)
    assert removed == pytest.approx(by_hand.tolist(), abs=1e-5)
    assert removed == pytest.approx(cleaned, abs=1e-5)
    assert not np.allclose(removed, kept, atol=1e-5), "the identifier must change what CLIP sees"
    # CLIP-I of a reference against itself is the highest possible; diversity of copies is 0.
    ci = ev.clip_image_scores(images[:1], images[:1], clip_model=clip)
    assert ci[0] == pytest.approx(1.0, abs=1e-4)
    emb = clip.image_embeddings([images[0], images[0], images[1]])
    assert ev.diversity(emb[:2]) == pytest.approx(0.0, abs=1e-5)
    assert ev.diversity(emb) > 0


def _rows(ckpt, step, scale, identity, clip_t, n=3, no_face=0):
    rows = []
    for seed in range(n):
        found = seed >= no_face
        rows.append({"checkpoint": ckpt, "step": step, "scale": scale, "seed": seed, "face_found": found,
                     "identity": identity if found else 0.0, "identity_pass": found and identity >= 0.91,
                     "clip_t": clip_t, "clip_i": 0.8})
    return rows


def test_best_checkpoint_picks_best_combined_score():
    rows = (_rows("base", 0, 0.0, 0.80, 0.30)
            + _rows("checkpoint-100", 100, 1.0, 0.90, 0.29)
            + _rows("checkpoint-200", 200, 0.5, 0.95, 0.28)
            + _rows("checkpoint-200", 200, 1.0, 0.97, 0.20)  # likeness at the cost of the prompt: overfit
            + _rows("checkpoint-300", 300, 1.0, 0.99, 0.29, no_face=2))  # faces missing count as 0
    choice = ev.best_checkpoint(rows)
    assert (choice.checkpoint, choice.scale) == ("checkpoint-200", 0.5)
    assert "dropped below" in choice.reason and "0.950" in choice.reason
    # Without the prompt floor, identity alone picks the overfitted one; prompt alone the earliest.
    only_identity = ev.best_checkpoint(rows, identity_weight=1.0, min_adherence_vs_base=None)
    assert (only_identity.checkpoint, only_identity.scale) == ("checkpoint-200", 1.0)
    only_prompt = ev.best_checkpoint(rows, identity_weight=0.0)
    assert (only_prompt.checkpoint, only_prompt.scale) == ("checkpoint-100", 1.0)
    with pytest.raises(ValueError, match="base model"):
        ev.best_checkpoint(_rows("base", 0, 0.0, 0.8, 0.3))


def test_the_choice_compares_held_out_identity_and_drops_near_copies():
    def rows(ckpt, step, identity, heldout, clip_t, memorised=0):
        out = _rows(ckpt, step, 0.0 if ckpt == "base" else 1.0, identity, clip_t)
        for i, r in enumerate(out):
            r.update(identity_heldout=heldout, memorised=i < memorised)
        return out

    # checkpoint-300 looks most like the training photos and least like the person's held-out photo:
    # it learned those photos, not the face
    data = (rows("base", 0, 0.70, 0.70, 0.30) + rows("checkpoint-200", 200, 0.93, 0.90, 0.29)
            + rows("checkpoint-300", 300, 0.97, 0.84, 0.29))
    choice = ev.best_checkpoint(data)
    assert choice.checkpoint == "checkpoint-200"
    assert "held-out identity 0.900 vs 0.700 for the base model (training photos 0.930" in choice.reason
    assert choice.identity_heldout_mean == pytest.approx(0.90)
    without_heldout = [{k: v for k, v in r.items() if k != "identity_heldout"} for r in data]
    assert ev.best_checkpoint(without_heldout).checkpoint == "checkpoint-300"  # what it chose before

    # a checkpoint that drew a copy of a training photo is not recommended, whatever its scores
    copying = rows("base", 0, 0.70, 0.70, 0.30) + rows("checkpoint-200", 200, 0.90, 0.86, 0.29) + rows(
        "checkpoint-300", 300, 0.95, 0.92, 0.29, memorised=1)
    choice = ev.best_checkpoint(copying)
    assert choice.checkpoint == "checkpoint-200" and "1 dropped for near-copies of training photos" in choice.reason
    only_copies = [r for r in copying if r["checkpoint"] != "checkpoint-200"]
    choice = ev.best_checkpoint(only_copies)
    assert choice.checkpoint == "checkpoint-300" and "every candidate drew a near-copy" in choice.reason


def test_cli_scores_plain_folder(tmp_path, tiny_models, person, sample_data, capsys):
    from lora_helpers.cli import main

    refs_dir, images = tmp_path / "refs", tmp_path / "made_elsewhere"
    refs_dir.mkdir(), images.mkdir()
    for p in person[:3]:
        load_image(p).resize((384, 384)).save(refs_dir / f"{p.stem}.jpg")
    meta = PngInfo()
    meta.add_text("prompt", "a photo of TOK person on the beach")
    load_image(person[6]).save(images / "a.png", pnginfo=meta)
    load_image(sample_data / "problems" / "no_face.jpg").save(images / "b.png")
    rc = main(["evaluate", str(images), "--references", str(refs_dir), "--clip-model", str(tiny_models / "clip")])
    assert rc == 0
    with open(images / "evaluation" / "scores.csv", newline="") as f:
        rows = {r["image"]: r for r in csv.DictReader(f)}
    assert rows["a.png"]["face_found"] == "True" and float(rows["a.png"]["identity"]) > 0.91
    assert rows["b.png"]["face_found"] == "False" and float(rows["b.png"]["identity"]) == 0.0
    assert rows["a.png"]["clip_t"] and not rows["b.png"]["clip_t"]  # CLIP-T only where a prompt is known
    assert rows["b.png"]["clip_i"]
    assert "leave-one-out" in capsys.readouterr().out
    assert ev.read_scores_csv(images / "evaluation" / "scores.csv")[0]["identity"] > 0.91


def _broken_png(path, source) -> None:
    """The first half of a real PNG: what an interrupted copy or download leaves."""
    buffer = io.BytesIO()
    load_image(source).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _small_refs(folder, person):
    folder.mkdir()
    for p in person[:3]:
        load_image(p).resize((384, 384)).save(folder / f"{p.stem}.jpg")
    return folder


def _generated(path, source, lora: str | None, seed: int) -> None:
    """A picture carrying the PNG text our generate stage writes (its LoRA file and scale)."""
    meta = PngInfo()
    for key, value in {"prompt": "a photo of TOK person", "seed": str(seed), "lora": lora or "None",
                       "lora_scale": "1.0" if lora else "None"}.items():
        meta.add_text(key, value)
    load_image(source).resize((256, 256)).save(path, pnginfo=meta)


def test_unreadable_image_is_named_counted_and_left_out_of_every_average(tmp_path, tiny_models, person, capsys):
    from lora_helpers.cli import main

    refs_dir = _small_refs(tmp_path / "refs", person)
    good, mixed = tmp_path / "good", tmp_path / "mixed"
    for folder in (good, mixed):
        folder.mkdir()
        for p in person[4:7]:
            load_image(p).save(folder / f"{p.stem}.png")
    _broken_png(mixed / "broken.png", person[7])
    clip = ["--clip-model", str(tiny_models / "clip")]
    assert main(["evaluate", str(good), "--references", str(refs_dir)] + clip) == 0
    capsys.readouterr()
    assert main(["evaluate", str(mixed), "--references", str(refs_dir)] + clip) == 0
    out, err = capsys.readouterr()
    assert "broken.png" in out and "left out of every average" in out and "Traceback" not in out + err
    (alone,) = ev.read_scores_csv(good / "evaluation" / "summary.csv")
    (with_broken,) = ev.read_scores_csv(mixed / "evaluation" / "summary.csv")
    assert alone["identity_mean"] > 0.91  # the real faces score high; the broken file must not pull them down
    for key in ("identity_mean", "identity_pass_rate", "faces_found", "clip_i_mean", "diversity_mean"):
        assert with_broken[key] == pytest.approx(alone[key]), key
    assert (with_broken["images"], with_broken["unreadable"]) == (3, 1)
    rows = {r["image"]: r for r in ev.read_scores_csv(mixed / "evaluation" / "scores.csv")}
    broken = rows["broken.png"]
    assert "broken.png" in broken["error"] and broken["identity"] is None and broken["face_found"] is None
    assert broken["clip_i"] is None
    report = json.loads((mixed / "evaluation" / "evaluation.json").read_text())
    assert [b["image"] for b in report["unreadable_images"]] == ["broken.png"]


def test_broken_image_and_a_stray_photo_among_generated_images(tmp_path, tiny_models, person, capsys):
    from lora_helpers.cli import main

    images = tmp_path / "images"
    images.mkdir()
    for seed, p in enumerate(person[4:6]):
        _generated(images / f"lora_{seed}.png", p, "/runs/me/pytorch_lora_weights.safetensors", seed)
        _generated(images / f"base_{seed}.png", p, None, seed)
    load_image(person[6]).save(images / "holiday.jpg")  # a photo without generation metadata
    _broken_png(images / "broken.png", person[7])
    code = main(["evaluate", str(images), "--references", str(_small_refs(tmp_path / "refs", person)),
                 "--clip-model", str(tiny_models / "clip")])
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in out + err and "broken.png" in out
    written = sorted(p.name for p in (images / "evaluation").iterdir())
    assert written == ["evaluation.json", "identity_vs_prompt.png", "scores.csv", "summary.csv"]
    report = json.loads((images / "evaluation" / "evaluation.json").read_text())
    summary = {(s["checkpoint"], s["scale"]): s["images"] for s in report["summary"]}
    assert summary == {("base", 0.0): 2, ("final", 1.0): 2, (None, None): 1}  # the broken file: in none of them
    assert report["choice"]["checkpoint"] == "final"  # the stray photo is never a candidate
    assert [b["image"] for b in report["unreadable_images"]] == ["broken.png"]


def test_evaluation_outputs_are_written_all_or_nothing(tmp_path, refs, monkeypatch):
    from lora_helpers.evaluate import report as report_module

    rows = (_rows("base", 0, 0.0, 0.80, 0.30) + _rows("checkpoint-100", 100, 1.0, 0.90, 0.29))
    out = tmp_path / "evaluation"
    first = report_module.write_evaluation(rows, refs, ev.EvaluateConfig(), out, extra={})
    assert set(first.files) == {"scores", "summary", "plot", "report"}
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def failing_plot(*args, **kwargs):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(report_module, "plot_identity_vs_prompt", failing_plot)
    more = rows + _rows("checkpoint-200", 200, 1.0, 0.95, 0.28)
    with pytest.raises(RuntimeError, match="plot failed"):
        report_module.write_evaluation(more, refs, ev.EvaluateConfig(), out, extra={})
    # the earlier outputs are untouched and no new or temporary file is left behind
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(RuntimeError, match="plot failed"):
        report_module.write_evaluation(more, refs, ev.EvaluateConfig(), tmp_path / "fresh", extra={})
    assert list((tmp_path / "fresh").iterdir()) == []


@pytest.mark.parametrize("flags, code, words", [
    (["--seeds", "99999999999999999999"], 2, ["--seeds", "from 0 to 18446744073709551615", "99999999999999999999"]),
    (["--seeds", "-1"], 2, ["--seeds", "from 0 to", "'-1'"]),
    (["--seeds", "1.5"], 2, ["--seeds", "whole number", "'1.5'"]),
    (["--steps", "0"], 2, ["--steps", "at least 1", "30"]),
    (["--resolution", "100"], 2, ["--resolution", "multiple of 8", "1024"]),
    (["--scales", "0", "nan"], 2, ["--scales", "finite number", "'nan'"]),
    (["--copy-threshold", "2"], 2, ["--copy-threshold", "from -1 to 1", "'2'"]),
    (["--prompts-file", "{tmp}/missing.txt"], 1, ["missing.txt", "not found"]),
    (["--prompts-file", "{tmp}/latin1.txt"], 1, ["latin1.txt", "line 2", "not UTF-8", "save the file as UTF-8"]),
    (["--prompts-file", "{tmp}/blank.txt"], 1, ["blank.txt", "no prompts"]),
])
def test_cli_refuses_bad_settings_and_inputs_before_loading_anything(tmp_path, capsys, monkeypatch, flags, code, words):
    from lora_helpers.cli import main
    from lora_helpers.evaluate import cli as evaluate_cli

    (tmp_path / "latin1.txt").write_bytes("a photo of {subject}\na photo of {subject} in a caf\xe9\n".encode("latin-1"))
    (tmp_path / "blank.txt").write_text("\n  \n", encoding="utf-8")
    for name in ("evaluate_run", "reference_embeddings", "evaluate_images"):
        monkeypatch.setattr(evaluate_cli, name, lambda *a, **k: pytest.fail("loaded before the settings were checked"))
    argv = ["evaluate", str(tmp_path), "--references", str(tmp_path)] + [f.format(tmp=tmp_path) for f in flags]
    try:
        got = main(argv)
    except SystemExit as exc:  # argparse: usage and one error line
        got = exc.code
    err = capsys.readouterr().err
    assert got == code and "Traceback" not in err
    (line,) = [l for l in err.splitlines() if "error:" in l]
    for word in words:
        assert word in line, f"{word!r} not in: {line}"
    assert not (tmp_path / "evaluation").exists()


def test_bad_evaluate_settings_are_refused_when_made():
    for kwargs, words in [({"seeds": (0, -1)}, "seed must be"), ({"scales": (0.0, float("nan"))}, "scales must be"),
                          ({"scales": (-1.0,)}, "scales must be"), ({"num_inference_steps": 0}, "num_inference_steps"),
                          ({"resolution": 60}, "resolution"), ({"identity_weight": 2.0}, "identity_weight"),
                          ({"max_checkpoints": 0}, "max_checkpoints"), ({"guidance_scale": float("inf")}, "guidance"),
                          ({"copy_threshold": 1.5}, "copy_threshold")]:
        with pytest.raises(ValueError, match=words):
            ev.EvaluateConfig(**kwargs)


def test_validation_hook_returns_identity_keys(tmp_path, refs, person, sample_data):
    hook = ev.identity_validation_hook(refs)
    images = [load_image(person[4]), load_image(sample_data / "problems" / "no_face.jpg")]
    stats = hook(20, images, tmp_path)
    assert set(stats) >= {"identity_mean", "identity_pass_rate", "faces_found"}
    assert stats["faces_found"] == 0.5 and stats["identity_pass_rate"] == 0.5
    assert 0.91 / 2 < stats["identity_mean"] < 0.5
    assert (tmp_path / "identity-000020.json").exists()


def test_evaluate_run_generates_scores_plots_and_resumes(tmp_path, tiny_models, refs, monkeypatch):
    from lora_helpers.core.random_lora import make_random_lora
    from lora_helpers.evaluate import run as evaluate_run_module
    from lora_helpers.cli import main

    run = make_random_lora(tmp_path / "run", tiny_models / "sdxl", checkpoint_steps=(1, 2))
    config = ev.EvaluateConfig(categories=("portrait",), prompts_per_category=1, seeds=(0, 1),
                               scales=(0.0, 1.0), clip_model=str(tiny_models / "clip"), resolution=64,
                               num_inference_steps=2)
    result = ev.evaluate_run(run, references=refs, config=config, progress=False)
    # checkpoint-2 holds the final weights: scored once, as "final".
    assert {(s["checkpoint"], s["scale"]) for s in result.summary} == {("base", 0.0), ("checkpoint-1", 1.0), ("final", 1.0)}
    assert len(result.rows) == 3 * 1 * 2
    for r in result.rows:
        assert (result.out_dir / r["image"]).is_file()
        assert "TOK" not in ev.remove_identifier(r["prompt"], "TOK") and "TOK person" in r["prompt"]
        assert r["face_found"] is False and r["identity"] == 0.0  # random weights draw no face: counted as 0
        assert r["diversity"] is not None
    # every image's CLIP-T is its own: the two seeds of one prompt are different pictures
    assert len({round(r["clip_t"], 6) for r in result.rows}) > 1
    assert result.choice is not None and result.choice.checkpoint in ("checkpoint-1", "final")
    for name in ("scores", "summary", "plot", "report"):
        assert result.files[name].is_file() and result.files[name].stat().st_size > 0
    assert ev.read_scores_csv(result.files["scores"]) [0]["checkpoint"] == "base"

    # The same images scored as a plain folder keep their checkpoint and scale (PNG text).
    folder_rows = ev.evaluate_images(result.out_dir / "images" / "checkpoint-1" / "scale-1", references=refs,
                                     config=config, progress=False)
    assert {(r["checkpoint"], r["scale"]) for r in folder_rows} == {("checkpoint-1", 1.0)}

    # A second run (here through the CLI) reuses every image instead of generating again.
    def no_generation(*a, **k):
        raise AssertionError("images on disk must be reused")

    monkeypatch.setattr(evaluate_run_module, "generate_images", no_generation)  # where evaluate_run looks it up
    refs_dir = tmp_path / "refs"
    refs_dir.mkdir()
    for name in refs.names[:2]:
        load_image(next(p for p in refs.images if p.name == name)).resize((320, 400)).save(refs_dir / name)
    args = ["evaluate", str(run), "--scales", "0", "1", "--seeds", "0", "1", "--categories", "portrait",
            "--prompts-per-category", "1", "--clip-model", str(tiny_models / "clip"), "--resolution", "64", "--steps", "2"]
    assert main(args + ["--references", str(refs_dir)]) == 0
    assert ev.read_scores_csv(run / "evaluation" / "scores.csv") != []
    assert main(args + ["--references", str(tmp_path / "missing")]) == 1  # a message, not a traceback
