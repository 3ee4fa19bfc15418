"""The memory planner: SDXL sizes from its config, the t4-8gb budget, refusals that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_helpers.core.tiny_models import SDXL_UNET_CONFIG
from lora_helpers.train.memory import MemoryBudgetError, check_budget, estimate_peak_memory, inference_activations_gb
from lora_helpers.train.memory_trace import trace_training_memory
from lora_helpers.train.model_size import count_unet_parameters


def _sdxl(**kwargs):
    return estimate_peak_memory(unet_config=SDXL_UNET_CONFIG, **kwargs)


def test_sdxl_unet_size_from_config_alone():
    counts = count_unet_parameters(SDXL_UNET_CONFIG, rank=16)
    assert counts["total"] == 2_567_463_684  # SDXL 1.0 base UNet
    assert 0.8 * counts["total"] < counts["linear"] < counts["total"]
    assert count_unet_parameters(SDXL_UNET_CONFIG, rank=32)["lora"] == 2 * counts["lora"]


def test_lora_count_matches_peft(tiny_models):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sdxl", subfolder="unet")
    targets = ("to_k", "to_q", "to_v", "to_out.0")
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=list(targets)))
    real = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
    assert count_unet_parameters(dict(unet.config), target_modules=targets, rank=4)["lora"] == real


def test_t4_recipe_fits_8gb_with_room():
    plan = _sdxl(resolution=1024, batch_size=1, lora_rank=16, budget_gb=8.0)
    assert plan.fits and plan.peak_gb <= 7.0, str(plan)
    # 2,567,463,684 parameters (SDXL 1.0 base UNet) at 2 bytes each, in GiB: worked out here, not by the planner
    assert plan.items["UNet weights (fp16, frozen)"] == pytest.approx(2_567_463_684 * 2 / 2**30, rel=1e-3)
    assert check_budget(plan).budget_gb == 8.0
    assert "budget 8.00 GB: fits" in str(plan)
    saved = json.loads(json.dumps(plan.to_dict()))  # what config.json records
    assert saved["peak_gb"] == pytest.approx(plan.peak_gb, abs=1e-3)
    assert sum(saved["items"].values()) == pytest.approx(plan.train_peak_gb, abs=0.01)


def test_estimates_move_the_right_way():
    base = _sdxl().train_peak_gb
    assert _sdxl(resolution=768).train_peak_gb < base < _sdxl(batch_size=2).train_peak_gb
    assert _sdxl(gradient_checkpointing=False).train_peak_gb > base + 5  # activations of every block
    assert _sdxl(optimizer="adamw").train_peak_gb > base
    assert _sdxl(unet_8bit=True).train_peak_gb < base - 1.5
    assert _sdxl(weight_dtype="fp32").train_peak_gb > base + 4
    assert _sdxl(train_text_encoder=True).train_peak_gb > base + 1.5


def test_over_budget_plan_is_refused_with_what_to_change():
    plan = _sdxl(resolution=1024, gradient_checkpointing=False, optimizer="adamw", budget_gb=8.0)
    with pytest.raises(MemoryBudgetError) as info:
        check_budget(plan)
    message = str(info.value)
    assert "over the 8.00 GB budget" in message and "gradient checkpointing" in message
    assert info.value.plan.peak_gb > 8
    # nothing single fits: the message lists changes that together do
    with pytest.raises(MemoryBudgetError, match="together"):
        check_budget(_sdxl(weight_dtype="fp32", train_text_encoder=True, gradient_checkpointing=False), 8.0)
    with pytest.raises(MemoryBudgetError, match="nothing in reach"):
        check_budget(_sdxl(), 1.0)


def test_activation_coefficients_agree_with_a_fake_tensor_trace(tiny_models):
    config = json.loads((tiny_models / "sdxl" / "unet" / "config.json").read_text())
    traced = trace_training_memory(config, resolution=128, lora_rank=4, gradient_checkpointing=True)
    plan = estimate_peak_memory(unet_config=config, resolution=128, lora_rank=4, device_type="cpu")
    estimated = next(v for k, v in plan.items.items() if k.startswith("activations"))
    assert 0.5 < estimated / traced["activations_gb"] < 2.0, (estimated, traced)


MEASURED = Path(__file__).resolve().parents[1] / "benchmarks" / "activations_measured.json"


def test_activation_estimates_match_the_measured_step():
    """The planner against real allocations of one full-size SDXL step (benchmarks/bench_activations.py)."""
    measured = json.loads(MEASURED.read_text())
    results, px, rank = measured["results"], measured["resolution"], measured["lora_rank"]
    assert measured["dtype"] == "bfloat16" and px == 1024
    figures = {mode: r.get("scaled_activations_gb", r["activations_gb"]) for mode, r in results.items()}
    assert set(figures) == {"checkpointed", "full", "inference"}
    assert all(v > 0 for v in figures.values())
    assert figures["inference"] < figures["checkpointed"] < figures["full"]
    assert 0 < results["checkpointed"]["lora_gradients_gb"] < 0.2  # rank 16, fp32: about 23 M parameters
    for mode in ("checkpointed", "full"):
        plan = _sdxl(resolution=px, batch_size=1, lora_rank=rank, weight_dtype="bf16",
                     gradient_checkpointing=mode == "checkpointed", device_type="cpu")
        estimated = next(v for k, v in plan.items.items() if k.startswith("activations"))
        assert estimated == pytest.approx(figures[mode], rel=0.1), (mode, estimated, figures[mode])
    assert inference_activations_gb(SDXL_UNET_CONFIG, px, 2) == pytest.approx(figures["inference"], rel=0.1)
