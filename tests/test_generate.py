"""Generation with a LoRA on the tiny SDXL: formats, scale, seeds, cache, grids, bad input, CLI, panel."""

from __future__ import annotations

import shutil
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from lora_helpers.core.lora_files import LoraFileError, LoraNotFoundError
from lora_helpers.core.random_lora import make_random_lora
from lora_helpers.generate import (
    GenerateConfig, base_vs_lora, checkpoint_progress, choose_base_model, fuse_lora, generate_images, load_lora,
    load_pipeline, prompt_seed_grid, scale_sweep, unfuse_lora, unload_lora,
)
from lora_helpers.core.grids import read_png_metadata
from lora_helpers.generate.cache import ImageCache

CFG = GenerateConfig(size=64, steps=2)
PROMPT = "a photo of {subject}"


@pytest.fixture(scope="module")
def base_model(tiny_models) -> str:
    return str(tiny_models / "sdxl")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, base_model) -> Path:
    return make_random_lora(tmp_path_factory.mktemp("runs") / "tok_run", base_model, checkpoint_steps=(2, 4))


@pytest.fixture(scope="module")
def pipe(base_model):
    return load_pipeline(base_model, device="cpu")


@pytest.fixture(scope="module")
def lora(pipe, run_dir):
    return load_lora(pipe, run_dir)


def _pixels(items) -> list[np.ndarray]:
    return [np.asarray(it.image, dtype=np.int16) for it in items]


def _adapters(pipe) -> set[str]:
    return {a for names in pipe.get_list_adapters().values() for a in names}


def test_run_folder_diffusers_and_kohya_files_give_the_same_images(pipe, run_dir, lora):
    assert lora.format == "diffusers" and lora.trigger == "TOK person" and lora.run_dir == run_dir
    kohya_file = run_dir / f"{run_dir.name}_kohya.safetensors"
    keys = list(load_file(kohya_file))
    assert any(k.startswith("lora_unet_input_blocks_") for k in keys)  # the SDXL names kohya sd-scripts merges
    assert not any(part in k for k in keys for part in ("down_blocks", "mid_block", "up_blocks"))
    kohya = load_lora(pipe, kohya_file, adapter_name="kohya")
    assert kohya.format == "kohya" and kohya.trigger == "TOK person"  # the run folder is found from the file
    (a,) = _pixels(generate_images(pipe, PROMPT, 0, config=CFG, lora_info=lora))
    (k,) = _pixels(generate_images(pipe, PROMPT, 0, config=CFG, lora_info=kohya))
    (b,) = _pixels(generate_images(pipe, "a photo of TOK person", 0, config=CFG))
    assert np.array_equal(a, k)
    assert np.abs(a - b).mean() > 1, "the LoRA must change the picture"
    unload_lora(pipe, kohya)
    assert "kohya" not in _adapters(pipe) and lora.adapter_name in _adapters(pipe)


def test_text_encoder_lora_formats_agree_and_scale_zero_is_the_base_model(pipe, tmp_path, base_model):
    run = make_random_lora(tmp_path / "te_run", base_model, text_encoders=True, seed=1)
    diffusers_info = load_lora(pipe, run, adapter_name="te_d")
    kohya_info = load_lora(pipe, run / "te_run_kohya.safetensors", adapter_name="te_k")
    assert set(diffusers_info.targets) == set(kohya_info.targets) == {"unet", "text_encoder", "text_encoder_2"}
    (d,) = _pixels(generate_images(pipe, PROMPT, 4, config=CFG, lora_info=diffusers_info))
    (k,) = _pixels(generate_images(pipe, PROMPT, 4, config=CFG, lora_info=kohya_info))
    zero_cfg = GenerateConfig(size=64, steps=2, lora_scale=0.0)
    (z,) = _pixels(generate_images(pipe, PROMPT, 4, config=zero_cfg, lora_info=diffusers_info))
    (b,) = _pixels(generate_images(pipe, "a photo of TOK person", 4, config=CFG))
    assert np.array_equal(d, k) and np.array_equal(z, b)
    assert np.abs(d - b).mean() > 1
    unload_lora(pipe, diffusers_info)
    unload_lora(pipe, kohya_info)


def test_scale_zero_is_the_base_model_and_scale_changes_pixels(pipe, lora):
    (base,) = _pixels(generate_images(pipe, "a photo of TOK person", 1, config=CFG))
    zero, half, one = (_pixels(generate_images(pipe, PROMPT, 1, config=GenerateConfig(size=64, steps=2, lora_scale=s),
                                               lora_info=lora))[0] for s in (0.0, 0.5, 1.0))
    assert np.array_equal(zero, base)
    assert np.abs(half - base).mean() > 0.5
    assert np.abs(one - half).mean() > 0.5


def test_an_image_depends_on_its_seed_alone(pipe, lora):
    together = generate_images(pipe, PROMPT, [3, 7], config=CFG, lora_info=lora)
    alone = generate_images(pipe, PROMPT, [7], config=CFG, lora_info=lora)
    three, seven = _pixels(together)
    assert np.array_equal(seven, _pixels(alone)[0])
    assert np.abs(three - seven).mean() > 1
    assert [it.seed for it in together] == [3, 7]


def test_saved_metadata_reproduces_the_image(pipe, lora, tmp_path):
    cfg = GenerateConfig(size=64, steps=2, negative_prompt="blurry", guidance=6.5, lora_scale=0.8)
    (item,) = generate_images(pipe, "{subject} in a park", 5, config=cfg, lora_info=lora)
    assert item.prompt == "TOK person in a park" and item.params["prompt_template"] == "{subject} in a park"
    meta = read_png_metadata(item.save(tmp_path / "x.png"))
    assert meta["lora_sha256"] == lora.sha256 and "Seed: 5" in meta["parameters"]
    again_cfg = GenerateConfig(size=int(meta["width"]), steps=int(meta["steps"]), guidance=float(meta["guidance"]),
                               negative_prompt=meta["negative_prompt"], lora_scale=float(meta["lora_scale"]))
    (again,) = generate_images(pipe, meta["prompt"], int(meta["seed"]), config=again_cfg, lora_info=lora)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "x.png").convert("RGB")), np.asarray(again.image))


def test_cache_hit_returns_identical_bytes_without_running_the_pipeline(pipe, lora, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    first = generate_images(pipe, PROMPT, [0, 1], config=CFG, lora_info=lora, cache=cache)
    assert not any(it.cached for it in first) and len(cache) == 2
    pipeline_class = type(pipe)
    with mock.patch.object(pipeline_class, "__call__", side_effect=AssertionError("pipeline ran")) as called:
        second = generate_images(pipe, PROMPT, [0, 1], config=CFG, lora_info=lora, cache=cache)
        assert called.call_count == 0
        assert all(it.cached for it in second)
        assert [it.image.tobytes() for it in second] == [it.image.tobytes() for it in first]
        assert cache.get_bytes(first[0].key) == (cache.folder / first[0].key[:2] / f"{first[0].key}.png").read_bytes()
        # A different scale, size, seed or the base model is a different picture: the model must run.
        for cfg, seeds, info in [(GenerateConfig(size=64, steps=2, lora_scale=0.5), [0], lora),
                                 (GenerateConfig(size=64, steps=3), [0], lora), (CFG, [2], lora), (CFG, [0], None)]:
            with pytest.raises(AssertionError, match="pipeline ran"):
                generate_images(pipe, "a photo of TOK person", seeds, config=cfg, lora_info=info, cache=cache)


def test_fused_lora_matches_unfused_and_unfuses(base_model, run_dir):
    pipe = load_pipeline(base_model, device="cpu")
    info = load_lora(pipe, run_dir, adapter_name="fz")
    cfg = GenerateConfig(size=64, steps=2, lora_scale=0.7)
    (unfused,) = _pixels(generate_images(pipe, PROMPT, 0, config=cfg, lora_info=info))
    fuse_lora(pipe, info, scale=0.7)
    assert pipe.fused_loras == {"fz"}
    (fused,) = _pixels(generate_images(pipe, PROMPT, 0, config=cfg, lora_info=info))
    assert np.abs(fused - unfused).max() <= 2
    assert pipe.fused_loras == {"fz"}, "generating at the fused scale must not unfuse"
    (base,) = _pixels(generate_images(pipe, "a photo of TOK person", 0, config=CFG))  # unfuses for the base model
    (fused_again,) = _pixels(generate_images(pipe, PROMPT, 0, config=cfg, lora_info=info))  # and re-fuses
    assert np.abs(fused_again - unfused).max() <= 2 and np.abs(base - unfused).mean() > 1
    unfuse_lora(pipe, info)
    assert not pipe.fused_loras and not info.fused
    (after,) = _pixels(generate_images(pipe, PROMPT, 0, config=cfg, lora_info=info))
    assert np.abs(after - unfused).max() <= 2


# --------------------------------------------------------------------------- bad input


def _sd15_kohya_lora(path: Path) -> Path:
    unet = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    save_file({f"{unet}.lora_down.weight": torch.randn(4, 768), f"{unet}.lora_up.weight": torch.randn(320, 4),
               f"{unet}.alpha": torch.tensor(4.0), f"{te}.lora_down.weight": torch.randn(4, 768),
               f"{te}.lora_up.weight": torch.randn(768, 4), f"{te}.alpha": torch.tensor(4.0)}, str(path))
    return path


def _wide_sdxl_lora(src: Path, path: Path) -> Path:
    """Right layer names, but the cross-attention width of the real SDXL (2048)."""
    state = load_file(src)
    for k in list(state):
        if ("attn2.to_k" in k or "attn2.to_v" in k) and "lora.down" in k:
            state[k] = torch.randn(state[k].shape[0], 2048)
    save_file(state, str(path))
    return path


def _nonfinite_lora(src: Path, path: Path, value: float) -> Path:
    state = load_file(src)
    key = sorted(state)[5]
    state[key][0, 0] = value
    save_file(state, str(path))
    return path


@pytest.mark.parametrize("case, error, words", [
    ("missing", LoraNotFoundError, ["nope.safetensors", "no such file"]),
    ("empty_run", LoraNotFoundError, ["no LoRA here"]),
    ("unfinished_run", LoraNotFoundError, ["checkpoint-7", "latest checkpoint"]),
    ("truncated", LoraFileError, ["damaged or incomplete"]),
    ("pickle_bin", LoraFileError, ["pickle", ".safetensors"]),
    ("pickle_renamed", LoraFileError, ["pickled"]),
    ("sd15", LoraFileError, ["Stable Diffusion 1", "does not fit", "sd15.safetensors"]),
    ("sdxl_width", LoraFileError, ["SDXL (cross-attention width 2048)", "width 2048, the layer has 64"]),
    ("full_model", LoraFileError, ["not a LoRA"]),
    ("nan", LoraFileError, ["nonfinite.safetensors", "NaN/inf", "earlier checkpoint"]),
    ("inf", LoraFileError, ["nonfinite.safetensors", "NaN/inf", "earlier checkpoint"]),
])
def test_bad_lora_files_are_refused_with_clear_messages(pipe, run_dir, tmp_path, case, error, words):
    lora_file = run_dir / "pytorch_lora_weights.safetensors"
    if case == "missing":
        source = tmp_path / "nope.safetensors"
    elif case == "empty_run":
        source = tmp_path / "run"
        source.mkdir()
    elif case == "unfinished_run":
        source = tmp_path / "run"
        (source / "checkpoints" / "checkpoint-7").mkdir(parents=True)
        shutil.copy(lora_file, source / "checkpoints" / "checkpoint-7" / lora_file.name)
    elif case == "truncated":
        source = tmp_path / "cut.safetensors"
        source.write_bytes(lora_file.read_bytes()[: lora_file.stat().st_size // 2])
    elif case == "pickle_bin":
        source = tmp_path / "lora.bin"
        torch.save({"a": torch.zeros(2)}, source)
    elif case == "pickle_renamed":
        source = tmp_path / "lora.safetensors"
        torch.save({"a": torch.zeros(2)}, source)
    elif case == "sd15":
        source = _sd15_kohya_lora(tmp_path / "sd15.safetensors")
    elif case == "sdxl_width":
        source = _wide_sdxl_lora(lora_file, tmp_path / "wide.safetensors")
    elif case in ("nan", "inf"):  # a diverged training run: one bad value turns every picture black
        source = _nonfinite_lora(lora_file, tmp_path / "nonfinite.safetensors", float(case))
    else:
        source = tmp_path / "model.safetensors"
        save_file({"conv_in.weight": torch.randn(8, 4, 3, 3), "conv_in.bias": torch.randn(8)}, str(source))
    before = _adapters(pipe)
    with pytest.raises(error) as excinfo:
        load_lora(pipe, source, adapter_name="bad")
    for word in words:
        assert word in str(excinfo.value), f"{word!r} not in: {excinfo.value}"
    assert _adapters(pipe) == before, "a refused LoRA must leave the pipeline unchanged"


def test_bad_generation_requests(pipe, lora):
    with pytest.raises(ValueError, match="no prompts"):
        generate_images(pipe, [], [0], config=CFG, lora_info=lora)
    with pytest.raises(ValueError, match="no seeds"):
        generate_images(pipe, PROMPT, [], config=CFG, lora_info=lora)
    with pytest.raises(ValueError, match="empty"):
        generate_images(pipe, ["a photo", "  "], [0], config=CFG, lora_info=lora)
    with pytest.raises(ValueError, match="trigger phrase"):
        generate_images(pipe, PROMPT, [0], config=CFG)  # base model: nobody told us who {subject} is
    with pytest.raises(ValueError, match="multiple of 8"):
        generate_images(pipe, PROMPT, [0], config=GenerateConfig(size=100), lora_info=lora)


@pytest.mark.parametrize("setting, value, words", [
    ("size", 100, ["size", "multiple of 8", "1024"]),
    ("size", 0, ["size", "multiple of 8"]),
    ("steps", 0, ["steps", "at least 1", "30"]),
    ("guidance", float("nan"), ["guidance", "finite", "5.0"]),
    ("guidance", float("inf"), ["guidance", "finite"]),
    ("lora_scale", float("nan"), ["lora_scale", "finite", "1.0"]),
    ("batch_size", 0, ["batch_size", "at least 1"]),
])
def test_bad_generate_settings_are_refused_when_made(setting, value, words):
    with pytest.raises(ValueError) as excinfo:
        GenerateConfig(**{setting: value})
    for word in words:
        assert word in str(excinfo.value), f"{word!r} not in: {excinfo.value}"


def test_nonfinite_scales_and_out_of_range_seeds_are_refused(pipe, run_dir, lora):
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite number"):
            load_lora(pipe, run_dir, adapter_name="bad_scale", scale=bad)
        with pytest.raises(ValueError, match="scale must be a finite number"):
            fuse_lora(pipe, lora, scale=bad)
    assert "bad_scale" not in _adapters(pipe) and not lora.fused
    for seeds, shown in (([2**64], "18446744073709551616"), ([-1], "-1"), ([1.5], "1.5")):
        with pytest.raises(ValueError, match=f"seed must be a whole number from 0 to {2**64 - 1}.*{shown}"):
            generate_images(pipe, PROMPT, seeds, config=CFG, lora_info=lora)


def test_offload_needs_a_gpu_and_the_base_model_comes_from_the_run(run_dir, base_model, monkeypatch):
    with pytest.raises(ValueError, match="CUDA"):
        load_pipeline(base_model, device="cpu", memory_saving="offload")
    assert choose_base_model(run_dir) == base_model
    assert choose_base_model(run_dir / "checkpoints" / "checkpoint-2") == base_model
    assert choose_base_model(run_dir, "other/model") == "other/model"
    # fp16 wants the fp16-fix VAE from the hub; offline, the base VAE is used (decoded in fp32) with a warning.
    monkeypatch.setenv("LORA_HELPERS_SMOKE", "0")  # smoke mode asks for no separate VAE at all
    with pytest.warns(UserWarning, match="fp16-fix VAE not available"):
        half = load_pipeline(base_model, device="cpu", dtype="float16")
    assert half.unet.dtype == torch.float16 and half.vae.config._name_or_path.endswith("vae")


# --------------------------------------------------------------------------- grids from generation


def _cell(grid, row, col):
    return np.asarray(grid.cell(row, col), dtype=np.int16)


def test_checkpoint_progress_grid_skips_a_broken_checkpoint(pipe, run_dir, lora, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    broken = run / "checkpoints" / "checkpoint-2" / "pytorch_lora_weights.safetensors"
    broken.write_bytes(broken.read_bytes()[:64])
    before = _adapters(pipe)
    with pytest.warns(UserWarning, match="step 2"):
        grid = checkpoint_progress(pipe, run, [PROMPT, "{subject}, oil painting"], seeds=[0], config=CFG)
    # checkpoint-4 is the last checkpoint and holds the final LoRA's weights: one column, not two
    assert (grid.rows, grid.cols) == (2, 2)
    assert grid.col_labels == ["step 2 (unreadable)", "step 4 (final)"]
    assert grid.row_labels == ["a photo of TOK person", "TOK person, oil painting"] and "seed 0" in grid.title
    assert grid.items[0] is None and "damaged" in grid.notes[0]
    assert grid.items[1].params["lora"].endswith("checkpoint-4/pytorch_lora_weights.safetensors")
    assert np.array_equal(_cell(grid, 1, 1), np.asarray(grid.items[3].image, dtype=np.int16))
    assert _adapters(pipe) == before, "checkpoint adapters must be removed again"
    meta = read_png_metadata(grid.save(tmp_path / "progress.png"))
    assert meta["grid"] == "checkpoints" and "step 4" in meta["col_labels"]


def test_scale_sweep_and_base_vs_lora_agree_on_the_base_model(pipe, lora, tmp_path):
    cache = ImageCache(tmp_path / "cache")
    sweep = scale_sweep(pipe, lora, PROMPT, [0, 1], scales=(0, 1.0), config=CFG, cache=cache)
    pair = base_vs_lora(pipe, lora, PROMPT, [0, 1], config=CFG, cache=cache)
    assert (sweep.rows, sweep.cols) == (pair.rows, pair.cols) == (2, 2)
    assert sweep.col_labels == ["scale 0", "scale 1"] and pair.col_labels[0] == "base model"
    assert sweep.row_labels == ["seed 0", "seed 1"] and "a photo of TOK person" in sweep.title
    for row in range(2):
        assert np.array_equal(_cell(sweep, row, 0), _cell(pair, row, 0)), "scale 0 must equal the base model"
        assert np.array_equal(_cell(sweep, row, 1), _cell(pair, row, 1)), "scale 1 is the LoRA column (cache hit)"
    assert all(it.cached for it in pair.items[1::2])
    grid = prompt_seed_grid(pipe, [PROMPT, "{subject} smiling"], [0, 1], config=CFG, lora_info=lora, cache=cache)
    assert grid.row_labels == ["a photo of TOK person", "TOK person smiling"]
    assert grid.col_labels == ["seed 0", "seed 1"] and grid.items[0].cached


# --------------------------------------------------------------------------- CLI and panel


def test_cli_generates_images_and_a_grid(run_dir, base_model, tmp_path, capsys):
    from lora_helpers.cli import main

    out = tmp_path / "out"
    code = main(["generate", str(run_dir), "--prompt", PROMPT, "--seeds", "0", "1", "--size", "64", "--steps", "2",
                 "--grid", "base-vs-lora", "--out", str(out), "--base-model", base_model, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0
    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 2 and all(str(p) in printed for p in images)
    assert (out / "grid_base-vs-lora.png").is_file() and str(out / "grid_base-vs-lora.png") in printed
    assert read_png_metadata(images[1])["seed"] == "1"

    code = main(["generate", str(tmp_path / "missing_run"), "--prompt", PROMPT, "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "missing_run" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, words", [
    (["--seeds", "99999999999999999999"], ["--seeds", "from 0 to 18446744073709551615", "99999999999999999999"]),
    (["--seeds", "0", "-3"], ["--seeds", "from 0 to", "'-3'"]),
    (["--seeds", "1.5"], ["--seeds", "whole number", "'1.5'"]),
    (["--steps", "0"], ["--steps", "at least 1", "30"]),
    (["--size", "100"], ["--size", "multiple of 8", "1024"]),
    (["--size", "-64"], ["--size", "multiple of 8"]),
    (["--scale", "nan"], ["--scale", "finite number", "1.0"]),
    (["--scale", "inf"], ["--scale", "finite number"]),
    (["--guidance", "nan"], ["--guidance", "finite number", "5.0"]),
])
def test_cli_refuses_bad_settings_before_loading_a_model(run_dir, tmp_path, capsys, monkeypatch, flags, words):
    from lora_helpers.cli import main
    from lora_helpers.generate import cli as generate_cli

    monkeypatch.setattr(generate_cli, "load_pipeline", mock.Mock(side_effect=AssertionError("model loaded")))
    with pytest.raises(SystemExit) as excinfo:  # argparse: usage and one error line, exit 2
        main(["generate", str(run_dir), "--prompt", PROMPT, "--out", str(tmp_path / "out")] + flags)
    err = capsys.readouterr().err
    assert excinfo.value.code == 2 and "Traceback" not in err
    (line,) = [l for l in err.splitlines() if "error:" in l]
    for word in words:
        assert word in line, f"{word!r} not in: {line}"
    assert not (tmp_path / "out").exists()


def test_cli_refuses_a_nan_lora_naming_the_file(run_dir, tmp_path, capsys, monkeypatch):
    from lora_helpers.cli import main
    from lora_helpers.generate import cli as generate_cli

    bad = _nonfinite_lora(run_dir / "pytorch_lora_weights.safetensors", tmp_path / "diverged.safetensors", float("nan"))
    monkeypatch.setattr(generate_cli, "load_pipeline", mock.Mock(side_effect=AssertionError("model loaded")))
    code = main(["generate", str(bad), "--prompt", "a photo of TOK person", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(bad) in err and "NaN/inf" in err and "VAE" not in err
    assert not (tmp_path / "out").exists()


def test_panel_generates_shows_and_saves(pipe, lora, tmp_path, monkeypatch):
    from lora_helpers.ui.generation_panel import generation_panel

    monkeypatch.setenv("LORA_HELPERS_SMOKE", "1")  # the panel's 512/1024 map to the tiny model's 64 px
    cache = ImageCache(tmp_path / "cache")
    panel = generation_panel(pipe, lora_info=lora, cache=cache, out_dir=tmp_path / "saved")
    panel.prompt.value = PROMPT
    panel.steps.value = 2
    panel.n_images.value = 2
    panel.seed.value = 11
    panel.generate_button.click()
    assert "error" not in panel.status.value, panel.status.value
    assert bytes(panel.image.value[:8]) == b"\x89PNG\r\n\x1a\n"
    assert [it.seed for it in panel.last] == [11, 12] and panel.last[0].params["width"] == 64
    same = generate_images(pipe, PROMPT, [11, 12], config=GenerateConfig(steps=2, lora_scale=lora.scale),
                           lora_info=lora, cache=cache)
    assert all(it.cached for it in same), "the panel must use the same generation path and cache keys"
    panel.save_button.click()
    assert len(panel.saved) == 3 and all(p.is_file() for p in panel.saved)
    assert read_png_metadata(panel.saved[0])["seed"] == "11"
    panel.randomise.click()
    assert panel.seed.value != 11

    panel.prompt.value = ""
    panel.generate_button.click()
    assert "error" in panel.status.value and "no prompts" in panel.status.value


def test_a_folder_with_only_the_hubs_fp16_files_loads(tiny_models, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    folder = tmp_path / "fp16-only"
    StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl").to(dtype=torch.float16).save_pretrained(
        folder, variant="fp16")
    pipe = load_pipeline(folder, device="cpu")  # fp32 on CPU, cast up from the *.fp16.safetensors files
    assert pipe.unet.dtype == torch.float32
