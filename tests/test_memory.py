"""The memory planner: SDXL sizes from its config, the t4-8gb budget, refusals that name the fix."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_helpers.core.tiny_models import SDXL_UNET_CONFIG
from lora_helpers.train.block_memory import block_activation_weights, checkpointed_blocks
from lora_helpers.train.memory import MemoryBudgetError, check_budget, estimate_peak_memory, inference_activations_gb
from lora_helpers.train.memory_trace import trace_training_memory
from lora_helpers.train.model_size import count_unet_parameters
from lora_helpers.train.step_plan import AUTO_FILL, choose_step


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


# --------------------------------------------------------------------------- per-block checkpointing

BLOCKS_MEASURED = Path(__file__).resolve().parents[1] / "benchmarks" / "checkpoint_blocks_measured.json"


def _choose(budget_gb, **kwargs):
    inputs = dict(unet_config=SDXL_UNET_CONFIG, resolution=1024, lora_rank=16, weight_dtype="fp16", budget_gb=budget_gb)
    return choose_step(inputs, budget_gb=budget_gb, **kwargs)


def test_block_shares_follow_the_measured_blocks():
    """Each block's share of what checkpointing saves, against the fake-tensor measurement (bench_blocks.py)."""
    measured = json.loads(BLOCKS_MEASURED.read_text())
    for name, run in measured["runs"].items():
        config = SDXL_UNET_CONFIG if run["model"] == "sdxl" else json.loads(json.dumps(run["unet_config"]))
        weights = block_activation_weights(config)
        total, saved = sum(weights.values()), sum(run["delta_gb"].values())
        assert saved == pytest.approx(run["none_gb"] - run["all_gb"], rel=0.02)  # one block's saving adds to the others'
        for block, delta in run["delta_gb"].items():
            assert weights[block] / total == pytest.approx(delta / saved, abs=0.035), (name, block)
    # no LoRA before the first transformer: nothing is kept for the first block, checkpointed or not
    assert block_activation_weights(SDXL_UNET_CONFIG)["down_blocks.0"] == 0
    assert block_activation_weights(SDXL_UNET_CONFIG, ("to_q", "conv1"))["down_blocks.0"] > 0


def test_fewer_checkpointed_blocks_need_more_memory():
    peaks = [_sdxl(gradient_checkpointing=k).train_peak_gb for k in range(8)]
    assert peaks[0] == pytest.approx(_sdxl(gradient_checkpointing="none").train_peak_gb)
    assert peaks[7] == pytest.approx(_sdxl(gradient_checkpointing=True).train_peak_gb)
    assert all(a >= b for a, b in zip(peaks, peaks[1:])) and peaks[0] > peaks[3] > peaks[7]
    order = checkpointed_blocks(SDXL_UNET_CONFIG, "all")
    weights = block_activation_weights(SDXL_UNET_CONFIG)
    assert [weights[b] for b in order] == sorted(weights.values(), reverse=True)
    assert "4 of 7 blocks" in next(k for k in _sdxl(gradient_checkpointing=4).items if k.startswith("activations"))


def test_checkpointing_goes_from_none_to_some_to_all_as_the_budget_shrinks():
    chosen = {budget: _choose(budget) for budget in (40.0, 9.0, 8.0, 7.6, 6.0)}
    assert chosen[40.0].settings["gradient_checkpointing"] == "none" and chosen[40.0].checkpointed == []
    counts = [len(c.checkpointed) for c in chosen.values()]
    assert counts == sorted(counts) and 0 < counts[1] < counts[3] < 7, counts  # more blocks as the budget shrinks
    weights = block_activation_weights(SDXL_UNET_CONFIG)
    for budget, choice in chosen.items():
        setting = choice.settings["gradient_checkpointing"]
        fill = AUTO_FILL * budget
        if choice.checkpointed and setting != "all":
            left = [weights[b] for b in weights if b not in choice.checkpointed]
            assert min(weights[b] for b in choice.checkpointed) >= max(left)  # the most memory-hungry first
            assert _sdxl(gradient_checkpointing=setting).peak_gb <= fill  # they fit ...
            assert _sdxl(gradient_checkpointing=len(choice.checkpointed) - 1).peak_gb > fill  # ... one fewer would not
    assert chosen[6.0].settings["gradient_checkpointing"] == "all" and "even so" in chosen[6.0].lines[0]
    assert "the fewest blocks that fit 7 GB of the 8 GB budget" in chosen[8.0].lines[0]
    assert "up_blocks.0" in chosen[8.0].lines[0]  # the plan names the blocks


def test_a_larger_micro_batch_only_where_memory_allows_and_the_batch_is_not_fixed():
    roomy = _choose(40.0)
    assert roomy.settings["train_batch_size"] == 2 and roomy.settings["gradient_accumulation_steps"] == 1
    # with accumulation the effective batch stays: 1 x 4 -> 4 x 1 where it fits, else 2 x 2
    assert _choose(80.0, gradient_accumulation_steps=4).settings == {
        "gradient_checkpointing": "none", "train_batch_size": 4, "gradient_accumulation_steps": 1}
    assert _choose(40.0, gradient_accumulation_steps=4).settings == {
        "gradient_checkpointing": "none", "train_batch_size": 2, "gradient_accumulation_steps": 2}
    assert _sdxl(batch_size=4, gradient_checkpointing="none").peak_gb > AUTO_FILL * 40.0
    assert _choose(80.0, gradient_accumulation_steps=6).settings["train_batch_size"] == 3
    assert _choose(40.0, train_batch_size=1).settings["train_batch_size"] == 1  # the person's batch is kept
    assert _choose(8.0).settings["train_batch_size"] == 1  # the T4 needs checkpointing: no room for batch 2
    assert _choose(None).settings == {"gradient_checkpointing": "none", "train_batch_size": 1,
                                      "gradient_accumulation_steps": 1}  # nothing to plan against
    # checkpointing chosen by the person: a batch that fits with it
    every = _choose(8.0, gradient_checkpointing="all")
    assert every.settings["train_batch_size"] == 2 and _sdxl(batch_size=2).peak_gb <= AUTO_FILL * 8.0
