"""How a training step runs within the memory budget, decided from the plan before anything loads.

Two settings trade memory for speed. Gradient checkpointing recomputes activations in the
backward pass: with every UNet block checkpointed a step takes about half as long again.
``gradient_checkpointing="auto"`` checkpoints the fewest blocks that fit the budget, the most
memory-hungry first (:func:`lora_helpers.train.block_memory.checkpointed_blocks`), and none when
the budget has room. A larger micro-batch gives more images per second while memory allows:
``train_batch_size="auto"`` takes it when nothing needs checkpointing (recomputing costs more per
image than a larger batch gains); with gradient accumulation it keeps the effective batch (four
micro-batches of 1 become two of 2), without it the micro-batch is 2 (what the a100 preset always
used). A batch the person set is never changed.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_helpers.core.run_folder import read_run_config
from lora_helpers.train.block_memory import checkpointed_blocks, checkpointing_label, checkpointing_setting, unet_blocks
from lora_helpers.train.config import TrainConfig
from lora_helpers.train.memory import GB, estimate_peak_memory
from lora_helpers.train.model_size import unet_config_for

__all__ = ["StepChoice", "choose_step", "plan_step", "plan_inputs", "choice_budget", "keep_resumed_batch",
           "AUTO_BATCH", "AUTO_FILL", "MAX_AUTO_MICRO_BATCH"]

AUTO_BATCH = 2  # without accumulation: batch 2 where it fits (the a100 preset's batch)
# "auto" fills at most this part of the budget: the rest is the margin for the estimate's error (the
# CUDA factor and overhead are assumptions until measured on a GPU). 7 of 8 GB: the T4 plan's goal.
AUTO_FILL = 0.875
MAX_AUTO_MICRO_BATCH = 4  # with accumulation: micro-batches up to this size, the effective batch kept


@dataclass
class StepChoice:
    """What :func:`choose_step` decided.

    Attributes:
        settings: resolved ``TrainConfig`` fields: ``gradient_checkpointing`` ("all", "none" or a
            block count), ``train_batch_size`` and ``gradient_accumulation_steps``.
        checkpointed: the checkpointed UNet blocks, the most memory-hungry first.
        lines: the decision in words, for the printed plan.
    """

    settings: dict[str, Any]
    checkpointed: list[str]
    lines: list[str] = field(default_factory=list)


def _setting(count: int, n: int) -> str | int:
    return "none" if count == 0 else "all" if count >= n else count


def choose_step(plan_inputs: dict, *, budget_gb: float | None, gradient_checkpointing: bool | str | int = "auto",
                train_batch_size: int | str = "auto", gradient_accumulation_steps: int = 1,
                budget_words: str | None = None) -> StepChoice:
    """Resolve "auto" checkpointing and micro-batch from the memory plan.

    Args:
        plan_inputs: keyword arguments of :func:`lora_helpers.train.memory.estimate_peak_memory` with
            ``unet_config`` filled in (its ``gradient_checkpointing`` and ``batch_size`` are replaced here).
        budget_gb: the GPU memory to fit (GiB); "auto" fills :data:`AUTO_FILL` of it. None: unknown, so "auto"
            checkpoints nothing and keeps batch 1.
        gradient_checkpointing: "auto", "all"/True, "none"/False or a number of blocks.
        train_batch_size: "auto" or the micro-batch the person chose (kept).
        gradient_accumulation_steps: micro-batches per optimizer step.
        budget_words: how the plan names the budget ("the 8 GB budget"); default from ``budget_gb``.

    Returns:
        A :class:`StepChoice`. When even full checkpointing does not fit, it checkpoints every block
        and :func:`lora_helpers.train.memory.check_budget` says what else to change.
    """
    unet_config = plan_inputs["unet_config"]
    targets = plan_inputs.get("target_modules") or ()
    n = len(unet_blocks(unet_config))
    budget_words = budget_words or (f"the {budget_gb:g} GB budget" if budget_gb is not None else "")
    where = f"{AUTO_FILL * budget_gb:.3g} GB of {budget_words}" if budget_gb is not None else ""
    auto_batch = train_batch_size == "auto"
    batch, accumulation = (1 if auto_batch else int(train_batch_size)), int(gradient_accumulation_steps)

    def fits(setting: str | int, micro: int) -> bool:
        plan = estimate_peak_memory(**{**plan_inputs, "gradient_checkpointing": setting, "batch_size": micro})
        return plan.peak_gb <= AUTO_FILL * budget_gb

    gradient_checkpointing = checkpointing_setting(gradient_checkpointing)
    why = ""
    if gradient_checkpointing != "auto":
        setting = gradient_checkpointing
    elif budget_gb is None:
        setting, why = "none", "auto: no memory budget to keep within"
    else:
        count = next((k for k in range(n + 1) if fits(_setting(k, n), batch)), n)
        setting = _setting(count, n)
        why = (f"auto: fits {where} without" if count == 0 else
               f"auto: the fewest blocks that fit {where}" if fits(setting, batch) else f"auto: over {where} even so")
    chosen = checkpointed_blocks(unet_config, setting, targets)
    batch_why = "set" if not auto_batch else "auto"
    # a larger micro-batch only where nothing had to be checkpointed for batch 1, or the person chose the checkpointing
    if auto_batch and budget_gb is not None and (gradient_checkpointing != "auto" or not chosen):
        options = ([(m, accumulation // m) for m in range(min(accumulation, MAX_AUTO_MICRO_BATCH), 1, -1)
                    if accumulation % m == 0] if accumulation > 1 else [(AUTO_BATCH, 1)])
        for micro, accum in options:
            if fits(setting, micro):
                batch, accumulation = micro, accum
                kept = accum * micro == gradient_accumulation_steps
                batch_why = f"auto: room in {where}" + (", the same effective batch" if kept else "")
                break
    if batch_why == "auto":
        batch_why = "auto: " + (f"no room for more in {where}" if budget_gb is not None else "no memory budget to plan against")
    label = checkpointing_label(unet_config, setting, targets)
    lines = [f"gradient checkpointing: {label}" + (f" ({', '.join(chosen)})" if 0 < len(chosen) < n else "")
             + (f" [{why}]" if why else ""),
             f"batch: {batch} image(s) per micro-batch x {accumulation} accumulation [{batch_why}]"]
    settings = {"gradient_checkpointing": setting, "train_batch_size": batch, "gradient_accumulation_steps": accumulation}
    return StepChoice(settings=settings, checkpointed=chosen, lines=lines)


def plan_inputs(cfg: TrainConfig, device_type: str) -> dict:
    """The arguments of :func:`estimate_peak_memory` for a resolved config (the UNet config read once)."""
    weight_dtype = {"fp16": "fp16", "bf16": "bf16"}.get(cfg.mixed_precision, "fp32")
    return dict(unet_config=unet_config_for(cfg.model), model=cfg.model, resolution=cfg.resolution,
                batch_size=1 if cfg.train_batch_size == "auto" else cfg.train_batch_size, lora_rank=cfg.lora_rank,
                target_modules=tuple(cfg.target_modules), weight_dtype=weight_dtype, unet_8bit=cfg.unet_8bit,
                unet_4bit=cfg.unet_4bit, gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer,
                train_text_encoder=cfg.train_text_encoder, pivotal_tokens=cfg.pivotal_tokens,
                prior_preservation=cfg.with_prior_preservation,
                device_type=device_type, budget_gb=cfg.memory_budget_gb)


# GPU memory of the GPU a preset is made for, when no budget is set and there is no GPU here to ask
_PRESET_GPU_GB = {"a100": 40.0}


def choice_budget(cfg: TrainConfig, device_type: str) -> tuple[float | None, str | None]:
    """The memory "auto" checkpointing and batch are chosen to fit, and its name in the plan.

    The budget when there is one; else this GPU's memory; else the memory of the GPU the preset is made
    for; on a CPU none (nothing to plan against).
    """
    if cfg.memory_budget_gb:
        return cfg.memory_budget_gb, None
    if device_type != "cuda":
        return None, None
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GB
        return total, f"this GPU's {total:.0f} GB"
    gb = _PRESET_GPU_GB.get(cfg.preset)
    return (gb, f"the {cfg.preset} preset's {gb:g} GB GPU") if gb else (None, None)


def plan_step(cfg: TrainConfig, device_type: str) -> tuple[dict, StepChoice]:
    """Decide a resolved config's "auto" step settings from its memory plan.

    Args:
        cfg: a config resolved for ``device_type`` (model, precision and optimizer filled in).
        device_type: "cuda" or "cpu", the device planned for.

    Returns:
        ``(inputs, choice)``: the arguments of :func:`estimate_peak_memory` for the chosen step, and the
        :class:`StepChoice` (its ``settings`` replace the config's "auto" values).
    """
    inputs = plan_inputs(cfg, device_type)
    budget, words = choice_budget(cfg, device_type)
    choice = choose_step(inputs, budget_gb=budget, budget_words=words, gradient_checkpointing=cfg.gradient_checkpointing,
                         train_batch_size=cfg.train_batch_size, gradient_accumulation_steps=cfg.gradient_accumulation_steps)
    inputs.update(gradient_checkpointing=choice.settings["gradient_checkpointing"],
                  batch_size=choice.settings["train_batch_size"])
    return inputs, choice


def keep_resumed_batch(config: TrainConfig, run_dir: Path) -> TrainConfig:
    """On resume, an "auto" batch keeps the batch the run was trained with (another GPU may have chosen another,
    and a changed batch is refused on resume)."""
    if config.train_batch_size != "auto":
        return config
    earlier = read_run_config(run_dir).get("config") or {}
    batch, accumulation = earlier.get("train_batch_size"), earlier.get("gradient_accumulation_steps")
    if not isinstance(batch, int) or not isinstance(accumulation, int):
        return config
    return dataclasses.replace(config, train_batch_size=batch, gradient_accumulation_steps=accumulation)
