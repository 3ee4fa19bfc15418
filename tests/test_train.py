"""Training on the tiny SDXL (CPU, fp32): it learns, saves, reloads, resumes exactly, and fails well."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import image_diff, make_dataset, max_diff

from lora_helpers.train import TrainConfig, TrainingDivergedError, train
from lora_helpers.train import session as session_module
from lora_helpers.train.block_memory import checkpointed_blocks, unet_blocks
from lora_helpers.train.models import enable_block_checkpointing
from lora_helpers.train.validation import render_validation


def _config(tiny_models, **overrides) -> TrainConfig:
    base = dict(model=str(tiny_models / "sdxl"), checkpointing_steps=1000, validation_steps=0,
                validation_prompts=(), progress=False)
    return TrainConfig.from_preset("cpu-smoke", **{**base, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="module")
def learned(dataset, tiny_models, tmp_path_factory):
    """An over-fitting run (fixed noise and timesteps) with the in-memory validation images captured."""
    captured = {}

    def hook(step, images, run_dir):
        captured[step] = images
        return {"n_images": len(images)}

    cfg = _config(tiny_models, max_train_steps=48, learning_rate=1e-2, lr_scheduler="constant", fixed_noise=True,
                  validation_prompts=("a photo of {subject}",), validation_seeds=(3,), snr_gamma=None)
    run_dir = tmp_path_factory.mktemp("learned")
    result = train(dataset, run_dir, config=cfg, validation_hook=hook)
    return result, captured, cfg


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_lora_learns_the_training_images(learned):
    result, _, cfg = learned
    rows = _rows(result.run_dir)
    assert len(rows) == cfg.max_train_steps and all(r["loss"] is not None for r in rows)
    # With fixed noise and timesteps, each epoch (every image once, batch 1) evaluates the same
    # loss function at newer weights: its mean must fall.
    epochs: dict[int, list[float]] = {}
    for r in rows:
        epochs.setdefault(r["epoch"], []).append(r["loss"])
    assert all(len(v) == 6 for v in epochs.values()) and len(epochs) == 8
    means = [sum(v) / len(v) for _, v in sorted(epochs.items())]
    assert means[-1] < 0.85 * means[0], f"loss did not fall: epoch means {means}"
    assert sum(b < a for a, b in zip(means, means[1:])) >= 5, f"loss is not falling steadily: {means}"


def test_run_folder_contract(learned, dataset):
    result, captured, _ = learned
    run_dir = result.run_dir
    config = json.loads(result.config_path.read_text())
    assert config["trigger"] == "TOK person" and config["resolution"] == 64 and config["lora_rank"] == 4
    assert config["base_model"].endswith("sdxl") and config["status"] == "finished"
    assert len(config["dataset"]["images"]) == 6 and all(len(i["sha256"]) == 64 for i in config["dataset"]["images"])
    assert config["versions"]["diffusers"] and config["config"]["fixed_noise"] is True
    # the final step is checkpointed with a loadable diffusers file
    assert (run_dir / "checkpoints" / "checkpoint-48" / "pytorch_lora_weights.safetensors").is_file()
    card = (run_dir / "README.md").read_text()
    assert "TOK person" in card and "samples/step-000048.png" in card
    assert (run_dir / "samples" / "step-000048.png").is_file() and (run_dir / "training_curves.png").is_file()
    # the hook saw the in-memory images and its values went into log.jsonl
    assert list(captured) == [48]
    assert _rows(run_dir)[-1]["n_images"] == 1
    # offline, the Hub upload is skipped with a message
    from lora_helpers.train.outputs import push_to_hub

    assert push_to_hub(run_dir, "someone/tok-person-lora") is None
    # both aspect buckets were trained
    cache = json.loads((run_dir / "cache" / "cache.json").read_text())
    assert sorted({tuple(s) for s in cache["sizes"]}) == [(56, 72), (64, 64)]


def test_saved_lora_reloads_and_reproduces_the_in_memory_output(learned, tiny_models):
    from diffusers import StableDiffusionXLPipeline

    result, captured, cfg = learned
    in_memory = captured[48][0]
    kwargs = dict(prompt="a photo of TOK person", num_inference_steps=cfg.validation_inference_steps,
                  guidance_scale=cfg.validation_guidance_scale, height=64, width=64)

    def render(pipe):
        pipe.set_progress_bar_config(disable=True)
        return pipe(**kwargs, generator=torch.Generator().manual_seed(3)).images[0]

    base = render(StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    pipe.load_lora_weights(result.run_dir)
    reloaded = render(pipe)
    kohya_pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    kohya_pipe.load_lora_weights(str(result.kohya_path))
    kohya = render(kohya_pipe)
    assert image_diff(base, in_memory) > 2, "the LoRA should change the picture"
    assert max_diff(reloaded, in_memory) <= 1, "the saved LoRA must reproduce the in-memory one"
    assert max_diff(kohya, reloaded) <= 1, "the kohya file must give the same picture"


def test_resume_repeats_an_uninterrupted_run(dataset, tiny_models, tmp_path):
    # batch 2 over two buckets, accumulation, cosine schedule with warm-up, noise offset, min-SNR
    cfg = _config(tiny_models, max_train_steps=6, checkpointing_steps=3, train_batch_size=2,
                  gradient_accumulation_steps=2, lr_scheduler="cosine", lr_warmup_steps=2, noise_offset=0.05,
                  validation_steps=3, validation_prompts=("a photo of {subject}",))
    straight = train(dataset, tmp_path / "straight", config=cfg)

    def disconnect(step, images, run_dir):
        if step == 3:
            raise KeyboardInterrupt  # a Colab disconnect right after checkpoint-3
        return None

    with pytest.raises(KeyboardInterrupt):
        train(dataset, tmp_path / "resumed", config=cfg, validation_hook=disconnect)
    assert (tmp_path / "resumed" / "checkpoints" / "checkpoint-3").is_dir()
    with pytest.raises(FileExistsError, match="resume"):
        train(dataset, tmp_path / "resumed", config=cfg)  # never overwrite a run by accident
    resumed = train(dataset, tmp_path / "resumed", config=cfg, resume="latest")

    a, b = load_file(straight.lora_path), load_file(resumed.lora_path)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    rows_a, rows_b = _rows(straight.run_dir), _rows(resumed.run_dir)
    assert [r["step"] for r in rows_b] == list(range(1, 7))
    assert [r["loss"] for r in rows_a] == pytest.approx([r["loss"] for r in rows_b], rel=1e-5)
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora.up" in k)  # training moved the weights


def test_listeners_hear_every_step_checkpoint_and_validation_and_a_failing_one_only_warns(dataset, tiny_models,
                                                                                          tmp_path):
    from lora_helpers.train import TrainingListener

    class Recorder(TrainingListener):
        def __init__(self):
            self.events = []

        def on_train_start(self, start):
            self.events.append(("start", start.start_step, start.config.max_train_steps))

        def on_step_end(self, step, row):
            self.events.append(("step", step, row["step"]))

        def on_checkpoint(self, step, folder):
            self.events.append(("checkpoint", step, folder))

        def on_validation(self, step, images, grid_path, record):
            self.events.append(("validation", step, grid_path, len(images), record.get("n_images")))
            record["listener_score"] = 0.5  # what a listener adds to the record goes into the log row

        def on_train_end(self, result):
            self.events.append(("end", result.steps))

    class Broken:  # any object with some on_* methods is a listener
        def on_step_end(self, step, row):
            raise RuntimeError("plot failed")

        def on_validation(self, step, images, grid_path, record):
            raise ValueError("no display")

    def hook(step, images, run_dir):
        return {"n_images": len(images)}

    recorder, run = Recorder(), tmp_path / "run"
    cfg = _config(tiny_models, max_train_steps=4, checkpointing_steps=2, validation_steps=2,
                  validation_prompts=("a photo of {subject}",))
    with pytest.warns(UserWarning) as caught:
        result = train(dataset, run, config=cfg, validation_hook=hook, listeners=[Broken(), recorder])
    assert result.steps == 4 and result.lora_path.is_file()  # the failing listener did not end the training
    messages = [str(w.message) for w in caught]
    assert "training listener Broken.on_step_end failed at step 1: RuntimeError: plot failed" in messages
    assert sum("Broken.on_step_end failed" in m for m in messages) == 4
    assert sum("Broken.on_validation failed" in m for m in messages) == 2
    assert [e[0] for e in recorder.events] == ["start", "step", "step", "checkpoint", "validation", "step", "step",
                                               "checkpoint", "validation", "end"]
    assert recorder.events[0] == ("start", 0, 4) and recorder.events[-1] == ("end", 4)
    assert [e[1:] for e in recorder.events if e[0] == "step"] == [(1, 1), (2, 2), (3, 3), (4, 4)]
    assert [e[1:] for e in recorder.events if e[0] == "checkpoint"] == [
        (2, run / "checkpoints" / "checkpoint-2"), (4, run / "checkpoints" / "checkpoint-4")]
    validations = [e[1:] for e in recorder.events if e[0] == "validation"]
    # the grid is on disk when the event fires, and the hook's values came first
    assert validations == [(2, run / "samples" / "step-000002.png", 1, 1), (4, run / "samples" / "step-000004.png", 1, 1)]
    assert all(path.is_file() for _, path, _, _ in validations)
    rows = _rows(run)
    assert [r.get("listener_score") for r in rows] == [None, 0.5, None, 0.5]
    assert rows[1]["n_images"] == 1 and rows[1]["samples"] == "samples/step-000002.png"


def test_show_validation_prints_the_step_and_scores_above_the_grid(tmp_path, capsys):
    from PIL import Image

    from lora_helpers.train import ShowValidation

    grid = tmp_path / "step-000020.png"
    Image.new("RGB", (8, 8)).save(grid)
    ShowValidation().on_validation(20, [], grid, {"step": 20, "samples": "samples/step-000020.png",
                                                  "identity_mean": 0.51234, "faces_found": 1.0})
    assert capsys.readouterr().out.splitlines()[0] == "step 20: identity_mean 0.512, faces_found 1.000"


def test_nonfinite_loss_is_skipped_counted_and_stops_the_run_when_repeated(dataset, tiny_models, tmp_path,
                                                                           monkeypatch):
    from lora_helpers.train import step as train_step

    real = train_step._diffusion_loss
    calls = {"n": 0}

    def nan_at_steps_2_3_and_from_6(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] in (2, 3) or calls["n"] >= 6 else loss

    monkeypatch.setattr(train_step, "_diffusion_loss", nan_at_steps_2_3_and_from_6)
    cfg = _config(tiny_models, max_train_steps=20, checkpointing_steps=4, max_nonfinite_in_a_row=3)
    with pytest.raises(TrainingDivergedError, match="learning rate") as info:
        train(dataset, tmp_path / "run", config=cfg)
    assert "fp16-fix VAE" in str(info.value) and "checkpoint-4" in str(info.value)
    rows = _rows(tmp_path / "run")
    assert [r["skipped"] for r in rows] == [False, True, True, False, False, True, True, True]
    assert rows[1]["loss"] is None and rows[-1]["nonfinite_total"] == 5
    # the steps in between trained normally, and what was saved is finite
    saved = load_file(tmp_path / "run" / "checkpoints" / "checkpoint-4" / "pytorch_lora_weights.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_out_of_memory_is_reported_with_advice(dataset, tiny_models, tmp_path, monkeypatch):
    from lora_helpers.train import TrainingOutOfMemoryError
    from lora_helpers.train.session import TrainingSession

    def oom(self):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")

    monkeypatch.setattr(TrainingSession, "prepare_data", oom)
    with pytest.raises(TrainingOutOfMemoryError, match="resolution") as info:
        train(dataset, tmp_path / "run", config=_config(tiny_models))
    assert "lora_rank" in str(info.value) and "unet_8bit" in str(info.value)


def test_buckets_keep_prepared_sizes_and_batches_never_mix_them():
    from lora_helpers.core.buckets import training_size as bucket_size
    from lora_helpers.train.data import batch_plan

    assert bucket_size(832, 1216, 1024) == (832, 1216)  # an SDXL bucket from the prepare stage stays
    w, h = bucket_size(3000, 4000, 1024)  # a phone photo goes to a 3:4 bucket of about 1024^2 px
    assert w % 64 == 0 and h % 64 == 0 and abs(w * h / 1024**2 - 1) < 0.1 and abs(w / h - 0.75) < 0.05
    sizes = [(64, 64)] * 5 + [(56, 72)] * 3
    plan = batch_plan(sizes, 2, seed=0, epoch=0)
    assert sorted(i for b in plan for i in b) == list(range(8))  # every image once per epoch
    assert all(len({sizes[i] for i in b}) == 1 for b in plan)  # one size per batch
    assert plan == batch_plan(sizes, 2, seed=0, epoch=0)  # a function of (seed, epoch) alone
    assert plan != batch_plan(sizes, 2, seed=0, epoch=1)


def test_unreadable_images_are_skipped_with_a_warning(tmp_path):
    from lora_helpers.train.data import read_training_images

    folder = make_dataset(tmp_path / "dataset")
    (folder / "images" / "astronaut_01.png").write_bytes(b"not a png")
    (folder / "masks" / "astronaut_02.png").write_bytes(b"\x89PNG broken")
    with pytest.warns(UserWarning) as caught:
        images = read_training_images(folder)
    messages = " ".join(str(w.message) for w in caught)
    assert "images/astronaut_01.png" in messages and "skipped" in messages
    assert "without its face mask" in messages
    assert len(images) == 5 and all(im.file_name != "images/astronaut_01.png" for im in images)
    assert next(im for im in images if im.file_name == "images/astronaut_02.png").mask_path is None
    assert images[0].original_size == (200, 200) and images[0].crop_top_left == (20, 120)


def test_over_budget_plan_is_refused_before_loading(dataset, tiny_models, tmp_path):
    from lora_helpers.train import MemoryBudgetError

    with pytest.raises(MemoryBudgetError, match="GB"):
        train(dataset, tmp_path / "run", config=_config(tiny_models, memory_budget_gb=0.001))
    assert not (tmp_path / "run" / "cache").exists()


def test_cli_trains_with_prior_preservation(dataset, tiny_models, tmp_path, capsys):
    from lora_helpers.cli import main

    run = tmp_path / "run"
    code = main(["train", str(dataset), str(run), "--model", str(tiny_models / "sdxl"), "--preset", "cpu-smoke",
                 "--steps", "3", "--rank", "2", "--validate-every", "0", "--checkpoint-every", "1",
                 "--keep-checkpoints", "1", "--output-name", "astronaut", "--prior-preservation",
                 "--num-class-images", "2", "--prior-weight", "0.5"])
    assert code == 0, capsys.readouterr().err
    assert "done: 3 steps" in capsys.readouterr().out
    assert (run / "astronaut_kohya.safetensors").is_file()
    # every checkpoint keeps its LoRA; only the last keeps what resuming needs
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-1", "checkpoint-2", "checkpoint-3"]
    assert [p.name for p in (run / "checkpoints").iterdir() if (p / "training_state.pt").is_file()] == ["checkpoint-3"]
    assert all((p / "pytorch_lora_weights.safetensors").is_file() for p in (run / "checkpoints").iterdir())
    assert not (run / "checkpoints" / "checkpoint-2" / "optimizer.pt").exists()
    config = json.loads((run / "config.json").read_text())
    assert config["lora_rank"] == 2 and config["config"]["class_prompt"] == "a photo of a person"
    # class images generated with the base model, and a prior loss term in every step
    assert len(list((run / "class_images").glob("*.png"))) == 2
    rows = _rows(run)
    assert all(r["prior_loss"] > 0 and r["instance_loss"] > 0 for r in rows)
    assert rows[0]["loss"] == pytest.approx(rows[0]["instance_loss"] + 0.5 * rows[0]["prior_loss"], rel=1e-5)
    assert main(["train", str(dataset), str(run), "--model", str(tiny_models / "sdxl"), "--plan-only",
                 "--preset", "t4-8gb", "--budget-gb", "0.0001"]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out


def test_naming_a_preset_without_applying_it_is_refused():
    with pytest.raises(ValueError, match="from_preset"):
        TrainConfig(preset="cpu-smoke")
    smoke = TrainConfig.from_preset("cpu-smoke", max_train_steps=7)
    assert smoke.resolution == 64 and smoke.max_train_steps == 7
    assert TrainConfig().resolution == 1024


def test_model_card_tells_each_tool_how_to_load_the_kohya_file(tmp_path):
    from lora_helpers.train.outputs import write_model_card

    card = write_model_card(tmp_path, config={"model": "stabilityai/stable-diffusion-xl-base-1.0", "resolution": 1024},
                            trigger="TOK person", n_images=8, steps=800, kohya_path=tmp_path / "tok_kohya.safetensors",
                            sample_grid=None, estimated_gb=7.1, measured_gb=None, seconds_per_step=None).read_text()
    assert "ComfyUI/models/loras/" in card and "Load LoRA" in card  # ComfyUI has no <lora:...> prompt syntax
    assert "<lora:tok_kohya:1> a photo of TOK person" in card and "Forge" in card
    assert "sdxl_merge_lora.py" in card and "--models tok_kohya.safetensors" in card


@pytest.mark.parametrize("setting, value", [
    ("max_train_steps", 0), ("max_train_steps", -3), ("lora_alpha", 0), ("lora_alpha", -4.0),
    ("lora_alpha", float("nan")), ("lora_rank", 0), ("train_batch_size", 0), ("gradient_accumulation_steps", 0),
    ("learning_rate", 0.0), ("learning_rate", float("nan")), ("learning_rate", float("inf")),
    ("text_encoder_lr", -1e-5), ("resolution", 0), ("resolution", -64), ("resolution", 100),
    ("checkpointing_steps", -1), ("validation_steps", -5), ("lr_warmup_steps", -1),
    ("seed", -1), ("seed", 2**64), ("max_grad_norm", 0.0), ("snr_gamma", -1.0), ("noise_offset", float("nan")),
    ("lora_dropout", 1.0), ("validation_inference_steps", 0), ("num_class_images", -1), ("prior_loss_weight", -0.5),
    ("max_nonfinite_in_a_row", 0), ("memory_budget_gb", -2.0),
])
def test_settings_out_of_range_are_refused_naming_the_setting(setting, value):
    with pytest.raises(ValueError, match=rf"^{setting} must ") as info:
        TrainConfig.from_preset("cpu-smoke", **{setting: value})
    assert "\n" not in str(info.value) and str(value) in str(info.value)


def test_settings_at_the_edge_of_their_range_are_accepted():
    cfg = TrainConfig.from_preset("cpu-smoke", max_train_steps=1, lora_alpha=0.5, lora_rank=1, resolution=8,
                                  checkpointing_steps=0, validation_steps=0, lr_warmup_steps=0, seed=2**64 - 1,
                                  validation_seeds=(0, 2**64 - 1), noise_offset=0.0, num_class_images=0)
    assert (cfg.max_train_steps, cfg.lora_alpha, cfg.resolution) == (1, 0.5, 8)
    with pytest.raises(ValueError, match=r"^validation_seeds must be whole numbers from 0 to 2\*\*64-1 .*not -1$"):
        TrainConfig.from_preset("cpu-smoke", validation_seeds=(0, -1))
    with pytest.raises(ValueError) as info:
        TrainConfig.from_preset("cpu-smoke", max_train_steps=0)
    assert str(info.value) == "max_train_steps must be at least 1 (or None for 100 steps per photo), not 0"


def test_cli_names_a_bad_setting_in_one_line_without_a_traceback(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "lora_helpers", "train", str(tmp_path / "dataset"),
                           str(tmp_path / "run"), "--steps", "0"], cwd=repo, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]  # (import warnings of other packages may come first)
    assert last == "error: max_train_steps must be at least 1 (or None for 100 steps per photo), not 0"
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_checkpointed_blocks_are_recomputed_and_the_others_are_not(tiny_models):
    from diffusers import UNet2DConditionModel  # seconds to import: only where needed
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sdxl", subfolder="unet")
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    chosen = checkpointed_blocks(dict(unet.config), 2)
    assert len(chosen) == 2 and enable_block_checkpointing(unet, chosen)
    calls: dict[str, int] = {}
    for block in unet_blocks(dict(unet.config)):
        unet.get_submodule(block).resnets[-1].conv1.register_forward_hook(
            lambda *_, block=block: calls.__setitem__(block, calls.get(block, 0) + 1))
    dim = unet.config.cross_attention_dim
    text = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    out = unet(torch.randn(1, 4, 8, 8), torch.tensor([500]), encoder_hidden_states=torch.randn(1, 77, dim),
               added_cond_kwargs={"text_embeds": torch.randn(1, text), "time_ids": torch.randn(1, 6)}).sample
    out.square().mean().backward()
    # the last ResNet of a checkpointed block runs again in the backward pass; the other blocks' run once
    assert {b: calls[b] for b in chosen} == {b: 2 for b in chosen}
    assert all(n == 1 for b, n in calls.items() if b not in chosen) and len(calls) == 5, calls
    assert not enable_block_checkpointing(unet, []) and not unet.is_gradient_checkpointing


def test_full_partial_and_no_checkpointing_train_the_same_lora(dataset, tiny_models, tmp_path):
    results = {}
    for setting in ("all", 2, "none"):
        cfg = _config(tiny_models, max_train_steps=3, gradient_checkpointing=setting, learning_rate=1e-2)
        results[setting] = train(dataset, tmp_path / str(setting), config=cfg)
        saved = json.loads(results[setting].config_path.read_text())
        assert saved["config"]["gradient_checkpointing"] == setting
    reference = load_file(results["none"].lora_path)
    for setting in ("all", 2):
        weights = load_file(results[setting].lora_path)
        assert weights.keys() == reference.keys()
        for key in reference:
            torch.testing.assert_close(weights[key], reference[key], rtol=1e-5, atol=1e-6, msg=key)
        assert [r["loss"] for r in _rows(results[setting].run_dir)] == pytest.approx(
            [r["loss"] for r in _rows(results["none"].run_dir)], rel=1e-5)
    assert "gradient checkpointing on 2 UNet blocks" in (results[2].run_dir / "README.md").read_text()


def test_validation_images_made_together_on_a_cpu_equal_those_made_one_by_one(tiny_models):
    from diffusers import AutoencoderKL, UNet2DConditionModel  # seconds to import: only where needed

    folder = tiny_models / "sdxl"
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae")
    dim = unet.config.cross_attention_dim
    pooled = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
    torch.manual_seed(0)
    jobs = [({"prompt_embeds": torch.randn(1, 77, dim), "pooled_prompt_embeds": torch.randn(1, pooled)}, seed)
            for seed in (3, 4, 5)]
    settings = dict(unet=unet, vae=vae, model=str(folder), device=torch.device("cpu"), steps=2, guidance=5.0,
                    resolution=64)
    together = render_validation(jobs, **settings)
    alone = [render_validation([job], **settings)[0] for job in jobs]
    assert len(together) == 3 and all(max_diff(a, b) <= 1 for a, b in zip(together, alone))
    assert image_diff(alone[0], alone[1]) > 2  # the seeds (and prompts) give different pictures


def test_nothing_of_the_trained_models_stays_in_memory_after_training(dataset, tiny_models, tmp_path, monkeypatch):
    built = []

    def build(*args, **kwargs):
        models = original(*args, **kwargs)
        built.extend(weakref.ref(m) for m in (models.unet, models.optimizer))
        return models

    original = session_module.build_models
    monkeypatch.setattr(session_module, "build_models", build)
    train(dataset, tmp_path / "run", config=_config(tiny_models, max_train_steps=1))
    assert len(built) == 2 and all(ref() is None for ref in built)  # a notebook can go on to generate
