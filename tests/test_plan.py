"""Plans for the machine the run is for: a T4 plan from a laptop, host RAM checked before loading,
and the 4-bit UNet below 4.5 GB."""

from __future__ import annotations

import pytest
import torch

from lora_helpers.cli import main
from lora_helpers.core.config import HUB_MODELS
from lora_helpers.train import TrainConfig, plan_memory, train
from lora_helpers.train import memory as memory_mod
from lora_helpers.train.memory import HostMemoryError, check_host_memory
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
    assert "UNet weights (fp16, frozen)                         4.78 GB" in out and "fp32" not in out.split("\n", 1)[1].split("LoRA")[0]
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
    plan = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL, unet_4bit=True), device_type="cuda")
    assert plan.peak_gb <= 4.5, str(plan)
    full = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL), device_type="cuda")
    eight = plan_memory(TrainConfig.from_preset("t4-8gb", model=SDXL, unet_8bit=True), device_type="cuda")
    assert plan.peak_gb < eight.peak_gb < full.peak_gb
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
