"""Several people in one LoRA (tiny SDXL, CPU): balanced batches, per-person triggers, reload, resume."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TWO_PEOPLE, image_diff, make_dataset, make_two_person_dataset, max_diff

from lora_helpers.train import TrainConfig, train
from lora_helpers.train.data import TrainImage, batch_plan, read_subjects, read_training_images
from lora_helpers.train.resume import dataset_fingerprint, resume_changes

PROMPTS = ("a photo of {subject}", "{astronaut} and {grace} at a cafe")


def _config(tiny_models, **overrides) -> TrainConfig:
    base = dict(model=str(tiny_models / "sdxl"), checkpointing_steps=1000, validation_steps=0,
                validation_prompts=(), progress=False)
    return TrainConfig.from_preset("cpu-smoke", **{**base, **overrides})


@pytest.fixture(scope="module")
def two_people(tmp_path_factory) -> Path:
    return make_two_person_dataset(tmp_path_factory.mktemp("two_people"))


def test_batches_draw_each_person_equally_often_and_depend_on_seed_and_epoch_alone():
    # 6 photos of one person in two buckets, 2 of the other
    sizes = [(64, 64)] * 4 + [(56, 72)] * 2 + [(64, 64)] * 2
    subjects = ["a"] * 6 + ["b"] * 2
    for epoch in range(3):
        plan = batch_plan(sizes, 2, seed=5, epoch=epoch, subjects=subjects)
        drawn = [i for batch in plan for i in batch]
        per_person = Counter(subjects[i] for i in drawn)
        assert per_person["a"] == per_person["b"] == 6, per_person
        per_image = Counter(drawn)
        assert all(per_image[i] == 1 for i in range(6)) and per_image[6] == per_image[7] == 3
        assert all(len({tuple(sizes[i]) for i in batch}) == 1 for batch in plan)  # buckets never mix
        assert plan == batch_plan(sizes, 2, seed=5, epoch=epoch, subjects=subjects)
    assert batch_plan(sizes, 2, seed=5, epoch=0, subjects=subjects) != batch_plan(sizes, 2, seed=5, epoch=1,
                                                                                  subjects=subjects)
    # 5 photos and 2 of different sizes, batches of 2: every epoch has the same number of batches
    # (the step counter maps to (epoch, batch) with it), and each person is drawn 5 times
    sizes7, people7 = [(64, 64)] * 3 + [(56, 72)] * 2 + [(64, 64), (56, 72)], ["a"] * 5 + ["b"] * 2
    plans = [batch_plan(sizes7, 2, seed=1, epoch=e, subjects=people7) for e in range(8)]
    assert len({len(plan) for plan in plans}) == 1
    for plan in plans:
        drawn = Counter(people7[i] for batch in plan for i in batch)
        assert drawn == {"a": 5, "b": 5}
        assert sorted(Counter(i for batch in plan for i in batch if people7[i] == "b").values()) == [2, 3]
    # one person (or none named): every image once, the order of a one-person run
    assert batch_plan(sizes, 2, seed=5, epoch=0, subjects=["a"] * 8) == batch_plan(sizes, 2, seed=5, epoch=0)
    with pytest.raises(ValueError, match="subjects"):
        batch_plan(sizes, 2, seed=5, epoch=0, subjects=["a"] * 3)


def test_each_image_keeps_its_person_and_the_dataset_is_checked_against_caption_config(two_people, tmp_path):
    images = read_training_images(two_people)
    subjects = read_subjects(two_people, images)
    assert {k: (v["trigger"], v["images"]) for k, v in subjects.items()} == {
        "astronaut": ("TOK1 person", 6), "grace": ("TOK2 person", 2)}
    assert all(TWO_PEOPLE[im.subject]["token"] in im.caption for im in images)
    with pytest.raises(ValueError, match="leave the trigger setting empty"):
        read_subjects(two_people, images, trigger="TOK person")
    mixed = tmp_path / "mixed"
    shutil.copytree(two_people, mixed)
    people = json.loads((mixed / "caption_config.json").read_text())
    people["subjects"]["astronaut"]["trigger"] = "<s0><s1> person"
    (mixed / "caption_config.json").write_text(json.dumps(people))
    with pytest.raises(ValueError, match="some people are called by new tokens"):
        read_subjects(mixed, images)
    # rows naming a person caption_config.json does not list, and the other way round
    stray = [TrainImage(file_name="images/x.png", path=Path("x"), caption="c", subject="ada")]
    with pytest.raises(ValueError, match="names ada, who is not in .*caption_config.json"):
        read_subjects(two_people, images + stray)
    one = make_dataset(tmp_path / "one")
    with pytest.raises(ValueError, match="no \"subjects\""):
        read_subjects(one, images)
    (one / "caption_config.json").write_text(json.dumps({"subjects": TWO_PEOPLE}))
    with pytest.raises(ValueError, match="say not whose they are"):
        read_subjects(one, read_training_images(one))


def test_a_person_changed_on_a_photo_is_a_dataset_change_for_resume(two_people, tiny_models):
    from lora_helpers.train.outputs import dataset_hashes

    images = read_training_images(two_people)
    before = dataset_fingerprint(dataset_hashes(images))
    images[0].subject = "grace"
    changes = resume_changes({}, before, _config(tiny_models), dataset_fingerprint(dataset_hashes(images)))
    assert "1 person changed (images/astronaut_00.png)" in changes["dataset"][1]


@pytest.fixture(scope="module")
def learned_two(two_people, tiny_models, tmp_path_factory):
    captured = {}

    def hook(step, images, run_dir):
        captured[step] = images

    cfg = _config(tiny_models, max_train_steps=24, learning_rate=1e-2, lr_scheduler="constant", fixed_noise=True,
                  validation_prompts=PROMPTS, validation_seeds=(3,), snr_gamma=None)
    result = train(two_people, tmp_path_factory.mktemp("two_run"), config=cfg, validation_hook=hook)
    return result, captured, cfg


def test_two_person_run_balances_batches_and_records_each_person(learned_two):
    result, captured, cfg = learned_two
    rows = [json.loads(line) for line in (result.run_dir / "log.jsonl").read_text().splitlines()]
    # batch 1: an epoch draws each of the two people 6 times (the 2 Grace Hopper photos 3 times each)
    assert Counter(r["epoch"] for r in rows) == {0: 12, 1: 12}
    config = json.loads(result.config_path.read_text())
    assert "trigger" not in config
    assert config["subjects"] == {"astronaut": {"trigger": "TOK1 person", "class_noun": "person", "images": 6},
                                  "grace": {"trigger": "TOK2 person", "class_noun": "person", "images": 2}}
    assert {i["file_name"]: i.get("subject") for i in config["dataset"]["images"]}["images/grace_01.png"] == "grace"
    card = (result.run_dir / "README.md").read_text()
    assert "| grace | `TOK2 person` | 2 |" in card and "of 2 people" in card
    # {subject} rendered once per person, {astronaut} and {grace} filled in
    from PIL import Image

    prompts = json.loads(Image.open(result.run_dir / "samples" / "step-000024.png").text["prompts"])
    assert prompts == ["a photo of TOK1 person", "a photo of TOK2 person", "TOK1 person and TOK2 person at a cafe"]
    assert len(captured[24]) == 3


def test_two_person_lora_reloads_to_the_in_memory_images(learned_two, tiny_models):
    from diffusers import StableDiffusionXLPipeline

    result, captured, cfg = learned_two
    kwargs = dict(num_inference_steps=cfg.validation_inference_steps, guidance_scale=cfg.validation_guidance_scale,
                  height=64, width=64)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    base = pipe("a photo of TOK2 person", **kwargs, generator=torch.Generator().manual_seed(3)).images[0]
    pipe.load_lora_weights(result.run_dir)
    for index, prompt in ((1, "a photo of TOK2 person"), (2, "TOK1 person and TOK2 person at a cafe")):
        reloaded = pipe(prompt, **kwargs, generator=torch.Generator().manual_seed(3)).images[0]
        assert max_diff(reloaded, captured[24][index]) <= 1, prompt
    assert image_diff(base, captured[24][1]) > 2, "the LoRA should change the picture"


def test_resume_of_a_two_person_run_repeats_an_uninterrupted_one(two_people, tiny_models, tmp_path):
    cfg = _config(tiny_models, max_train_steps=6, checkpointing_steps=3, train_batch_size=2,
                  validation_steps=3, validation_prompts=("a photo of {subject}",))
    straight = train(two_people, tmp_path / "straight", config=cfg)

    def disconnect(step, images, run_dir):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(two_people, tmp_path / "resumed", config=cfg, validation_hook=disconnect)
    resumed = train(two_people, tmp_path / "resumed", config=cfg, resume="latest")
    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_prior_preservation_pairs_each_person_with_their_own_class(tiny_models, tmp_path, monkeypatch):
    from lora_helpers.train import step as step_module

    dataset = make_two_person_dataset(tmp_path / "ds", n_astronaut=3, n_grace=2)
    config = json.loads((dataset / "caption_config.json").read_text())
    config["subjects"]["astronaut"]["class_noun"] = "man"
    config["subjects"]["grace"]["class_noun"] = "woman"
    (dataset / "caption_config.json").write_text(json.dumps(config))
    pairs = []
    original = step_module.TrainStep._class_indices

    def spy(self, micro, idx):
        chosen = original(self, micro, idx)
        pairs.extend((self.prior_prompts[i], self.cache.prompts[self.cache.class_prompt_ids[c]])
                     for i, c in zip(idx, chosen))
        return chosen

    monkeypatch.setattr(step_module.TrainStep, "_class_indices", spy)
    cfg = _config(tiny_models, max_train_steps=6, with_prior_preservation=True, num_class_images=2,
                  class_inference_steps=2)
    train(dataset, tmp_path / "run", config=cfg)
    folders = sorted(p.name for p in (tmp_path / "run" / "class_images").iterdir())
    assert folders == ["a_photo_of_a_man", "a_photo_of_a_woman"]
    assert all(len(list((tmp_path / "run" / "class_images" / f).glob("*.png"))) == 2 for f in folders)
    assert len(pairs) == 6 and {p for p, _ in pairs} == {"a photo of a man", "a photo of a woman"}
    assert all(own == drawn for own, drawn in pairs), pairs  # each image with its own class's images


def test_pivotal_tokens_for_several_people_give_each_their_own(two_people, tiny_models, tmp_path):
    from lora_helpers.core.embeddings import read_embeddings
    from lora_helpers.generate import load_lora, load_pipeline

    cfg = _config(tiny_models, max_train_steps=4, pivotal_tokens=2, validation_prompts=("{astronaut} and {grace}",),
                  validation_steps=0)
    result = train(two_people, tmp_path / "run", config=cfg)
    config = json.loads((result.run_dir / "config.json").read_text())
    assert {k: v["trigger"] for k, v in config["subjects"].items()} == {"astronaut": "<s0><s1> person",
                                                                      "grace": "<s2><s3> person"}
    both = read_embeddings(result.run_dir / "lora_emb.safetensors")
    assert both.tokens == ["<s0>", "<s1>", "<s2>", "<s3>"]
    for slug, tokens, rows in (("astronaut", ["<s0>", "<s1>"], [0, 1]), ("grace", ["<s2>", "<s3>"], [2, 3])):
        person = read_embeddings(result.run_dir / "embeddings" / f"{slug}.safetensors")
        assert person.tokens == tokens
        torch.testing.assert_close(person.clip_g, both.clip_g[rows], rtol=0, atol=0)
    assert not (result.run_dir / "checkpoints" / "checkpoint-4" / "embeddings").exists()
    assert "`embedding:astronaut`" in (result.run_dir / "README.md").read_text()
    # each person's rows learned something of their own
    assert (both.clip_l[0] - both.clip_l[2]).abs().max() > 1e-4
    pipe = load_pipeline(str(tiny_models / "sdxl"))
    info = load_lora(pipe, result.run_dir)
    assert info.subjects["grace"] == "<s2><s3> person"
    assert pipe.tokenizer.tokenize("<s2><s3> person")[:2] == ["<s2>", "<s3>"]
