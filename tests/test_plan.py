"""Plans for the machine the run is for: a T4 plan from a laptop, host RAM checked before loading,
and the 4-bit UNet below 4.5 GB."""

from __future__ import annotations

import argparse
import re

import pytest
import torch

from lora_helpers.cli import main
from lora_helpers.core.config import HUB_MODELS
from lora_helpers.core.run_folder import write_run_config
from lora_helpers.train import PRESETS, TrainConfig, plan_memory, train
from lora_helpers.train import memory as memory_mod
from lora_helpers.train.memory import HostMemoryError, check_host_memory
from lora_helpers.train.stage import _config_from_args, add_cli_arguments
from lora_helpers.train.step_plan import keep_resumed_batch
from train_helpers import make_dataset

# The tests run in smoke mode, where a config without a model trains the tiny one: plans of the
# real SDXL name it.
SDXL = HUB_MODELS.sdxl
needs_cpu_only = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the plan made on a machine without a GPU")


@needs_cpu_only
def test_plan_only_on_a_laptop_plans_for_the_t4(capsys, tmp_path):
    code = main(["train", str(tmp_path / "dataset"), str(tmp_path / "run"), "--preset", "t4-8gb", "--plan-only",
                 "--model", SDXL])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "memory plan for a Colab T4 (no GPU here" in out and "fp16 UNet, adamw8bit" in out
    assert re.search(r"UNet weights \(fp16, frozen\) +4\.78 GB", out) and "fp32" not in out.split("\n", 1)[1].split("LoRA")[0]
    plan = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL))
    assert plan.fits and plan.peak_gb <= 7.0
    assert plan.host_budget_gb == 12.7 and plan.host_peak_gb < 8.0  # one model at a time in Colab's 12.7 GB
    assert not (tmp_path / "run").exists()


def test_a_cpu_preset_plans_for_this_cpu():
    plan = plan_memory(TrainConfig.from_preset("cpu-smoke"), device_type="cpu")
    assert plan.target.startswith("this CPU")
    assert plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL, device="cpu")).target.startswith("this CPU")


def test_bf16_asked_for_by_name_is_kept_on_cpu_and_fp16_is_not():
    bf16 = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL, device="cpu", mixed_precision="bf16"))
    fp16 = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL, device="cpu"))  # the preset's fp16: fp32 on CPU
    assert "bf16 UNet" in bf16.target and "fp32 UNet" in fp16.target
    assert bf16.peak_gb < fp16.peak_gb - 4  # the UNet's weights take half the memory


def test_4bit_unet_is_planned_below_4_5_gb_at_1024_px():
    # on a 5 GB card; with 8 GB the memory it frees goes to fewer checkpointed blocks
    plan = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL, unet_4bit=True, memory_budget_gb=5.0),
                       device_type="cuda")
    assert plan.peak_gb <= 4.5, str(plan)
    every = dict(gradient_checkpointing="all", train_batch_size=1)
    four = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL, unet_4bit=True, **every), device_type="cuda")
    full = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL, **every), device_type="cuda")
    eight = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL, unet_8bit=True, **every), device_type="cuda")
    assert four.peak_gb < eight.peak_gb < full.peak_gb
    roomy = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL, unet_4bit=True), device_type="cuda")
    assert roomy.step_settings["gradient_checkpointing"] != "all"  # the room is used: fewer blocks recompute
    assert "4-bit NF4" in plan.target
    with pytest.raises(ValueError, match="unet_8bit and unet_4bit"):
        TrainConfig.from_preset("t4-8gb", model=SDXL, unet_4bit=True, unet_8bit=True)


def test_host_memory_is_checked_before_anything_loads(tiny_models, tmp_path, monkeypatch, capsys):
    dataset = make_dataset(tmp_path / "dataset")
    monkeypatch.setattr(memory_mod, "available_host_memory_gb", lambda: 0.25)
    config = TrainConfig.from_preset("cpu-smoke", model=str(tiny_models / "sdxl"), progress=False)
    with pytest.raises(HostMemoryError, match=r"needs about [\d.]+ GB of host RAM and only 0.2 GB is free.*Restart"):
        train(dataset, tmp_path / "run", config=config)
    assert not (tmp_path / "run" / "cache").exists()  # nothing was encoded or loaded
    code = main(["train", str(dataset), str(tmp_path / "run"), "--model", str(tiny_models / "sdxl"),
                 "--preset", "cpu-smoke", "--steps", "1"])
    err = capsys.readouterr().err
    assert code != 0 and "host RAM" in err and "Traceback" not in err


def test_host_memory_check_passes_when_there_is_room():
    plan = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL), device_type="cuda")
    check_host_memory(plan, available_gb=plan.host_peak_gb + 0.1)
    with pytest.raises(HostMemoryError):
        check_host_memory(plan, available_gb=plan.host_peak_gb - 0.1)


def test_4bit_unet_trains_a_step_on_cpu(tiny_models, tmp_path):
    pytest.importorskip("bitsandbytes")
    dataset = make_dataset(tmp_path / "dataset")
    config = TrainConfig.from_preset("cpu-smoke", model=str(tiny_models / "sdxl"), unet_4bit=True, max_train_steps=2,
                                     checkpointing_steps=0, validation_steps=0, validation_prompts=(), progress=False)
    result = train(dataset, tmp_path / "run", config=config)
    assert result.steps == 2 and result.final_loss is not None and result.final_loss == result.final_loss
    assert result.lora_path.is_file()


# --------------------------------------------------------------------------- the step the plan decides


@needs_cpu_only
def test_t4_plan_checkpoints_only_the_blocks_its_budget_needs(capsys, tmp_path):
    plan = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL))
    setting = plan.step_settings["gradient_checkpointing"]
    assert isinstance(setting, int) and 0 < setting < 7, plan.step_settings
    assert plan.step_settings["train_batch_size"] == 1
    full = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL, gradient_checkpointing="all", train_batch_size=1))
    assert full.train_peak_gb < plan.train_peak_gb and plan.fits and plan.peak_gb <= 7.0  # the headroom, used
    assert f"gradient checkpointing: {setting} of 7 blocks (up_blocks.0, " in str(plan)
    assert plan.to_dict()["step_settings"] == plan.step_settings  # recorded in config.json
    # a setting of one's own on the command line: planned as asked (and refused when over budget)
    code = main(["train", str(tmp_path / "d"), str(tmp_path / "r"), "--preset", "t4-8gb", "--plan-only", "--model", SDXL,
                 "--gradient-checkpointing", "2", "--batch-size", "1"])
    out = capsys.readouterr().out
    assert code == 1 and "checkpointing 2 of 7 blocks" in out and "DOES NOT FIT" in out


def test_roomy_plans_skip_checkpointing_and_take_batch_2_unless_the_batch_is_set():
    a100 = plan_memory(TrainConfig.from_preset("a100", model=SDXL), device_type="cuda")
    if not torch.cuda.is_available():  # planned for the preset's 40 GB GPU
        assert a100.step_settings == {"gradient_checkpointing": "none", "train_batch_size": 2,
                                      "gradient_accumulation_steps": 1}
        assert "batch: 2 image(s) per micro-batch x 1 accumulation [auto: room in" in str(a100)
    fixed = plan_memory(TrainConfig.from_preset("a100", model=SDXL, train_batch_size=1, gradient_accumulation_steps=2),
                        device_type="cuda")
    assert fixed.step_settings["train_batch_size"] == 1 and fixed.step_settings["gradient_accumulation_steps"] == 2
    smoke = plan_memory(TrainConfig.from_preset("cpu-smoke"), device_type="cpu")
    assert smoke.step_settings == {"gradient_checkpointing": "none", "train_batch_size": 1,
                                   "gradient_accumulation_steps": 1}
    # on a CPU there is no budget to plan against: "auto" checkpoints nothing and keeps batch 1
    cpu = plan_memory(TrainConfig.from_preset("cpu-smoke", train_batch_size="auto", gradient_checkpointing="auto"),
                      device_type="cpu")
    assert cpu.step_settings["gradient_checkpointing"] == "none" and cpu.step_settings["train_batch_size"] == 1


def test_checkpointing_and_batch_settings_are_checked_and_old_values_still_work(tmp_path, capsys):
    assert TrainConfig.from_preset("t4-8gb", gradient_checkpointing=True).gradient_checkpointing == "all"
    assert TrainConfig.from_preset("t4-8gb", gradient_checkpointing=False).gradient_checkpointing == "none"
    assert TrainConfig.from_preset("t4-8gb", gradient_checkpointing="3").gradient_checkpointing == 3
    assert TrainConfig().gradient_checkpointing == "auto" and TrainConfig().train_batch_size == "auto"
    assert TrainConfig().compile_unet is False and not any(p.get("compile_unet") for p in PRESETS.values())
    with pytest.raises(ValueError, match="gradient_checkpointing must be auto, all, none or a number"):
        TrainConfig.from_preset("t4-8gb", gradient_checkpointing="some")
    with pytest.raises(ValueError, match="train_batch_size must be 'auto' or a whole number"):
        TrainConfig.from_preset("t4-8gb", train_batch_size="two")
    code = main(["train", str(tmp_path / "d"), str(tmp_path / "r"), "--gradient-checkpointing", "-1", "--plan-only"])
    err = capsys.readouterr().err
    assert code == 2 and "gradient_checkpointing must be" in err and "Traceback" not in err
    args = argparse.ArgumentParser()
    add_cli_arguments(args)
    parsed = args.parse_args([str(tmp_path), str(tmp_path), "--compile-unet", "--batch-size", "auto",
                              "--no-gradient-checkpointing"])
    cfg = _config_from_args(parsed)
    assert cfg.compile_unet is True and cfg.train_batch_size == "auto" and cfg.gradient_checkpointing == "none"


def test_a_resumed_run_keeps_its_batch_when_the_batch_is_auto(tmp_path):
    write_run_config(tmp_path, {"config": {"train_batch_size": 2, "gradient_accumulation_steps": 3}})
    auto = TrainConfig.from_preset("t4-8gb")
    kept = keep_resumed_batch(auto, tmp_path)
    assert (kept.train_batch_size, kept.gradient_accumulation_steps) == (2, 3)
    fixed = TrainConfig.from_preset("t4-8gb", train_batch_size=1)
    assert keep_resumed_batch(fixed, tmp_path) is fixed  # a batch the person set wins (a change is then refused)
    assert keep_resumed_batch(auto, tmp_path / "new") is auto  # nothing trained there yet
