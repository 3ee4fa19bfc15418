"""Which UNet blocks hold a training step's activations, and which ones to checkpoint.

Gradient checkpointing in diffusers is switched per module: each top-level block of the UNet
(``down_blocks.i``, ``mid_block``, ``up_blocks.i``) recomputes its ResNets and transformer layers in
the backward pass when its flag is set. Checkpointing every block costs about half a step more
(the forward pass runs twice); a budget with room only needs the blocks whose activations take the
most memory. This module says how much each block holds (relative figures from the config alone);
:mod:`lora_helpers.train.memory` turns them into GiB and :mod:`lora_helpers.train.step_plan` chooses.
"""

from __future__ import annotations

import numbers
from typing import Any

from lora_helpers.core.lora_files import UNET_TARGET_MODULES

__all__ = ["RESNET_SAVED_ELEMENTS", "TRANSFORMER_SAVED_ELEMENTS", "unet_blocks", "block_units", "block_activation_weights",
           "checkpointing_setting", "checkpointed_blocks", "unchecked_share", "checkpointing_label"]

# What leaving one top-level UNet block un-checkpointed adds, per (level pixels x channels) element
# of each unit in it where gradients flow, in elements of the activation dtype: a ResNet block and a
# transformer layer. Measured by benchmarks/bench_blocks.py on 2026-11-30 (SDXL UNet config, fp16,
# LoRA rank 16, 1024 px, fake tensors: bytes alive at the end of the forward pass with every block
# checkpointed but one, minus all checkpointed; the seven blocks' savings add up to exactly the
# none-minus-all difference) and fitted by least squares over the blocks: each block's share then
# agrees with the measured one within half a percentage point (and within 2.5 on sdxl-small at
# 256 px, where the 77 text tokens weigh more). Only the ratio is used: it splits the measured
# difference between full and checkpointed activations (memory.py) among the blocks.
# Figures: benchmarks/checkpoint_blocks_measured.json.
RESNET_SAVED_ELEMENTS = 7.5
TRANSFORMER_SAVED_ELEMENTS = 26.5


def unet_blocks(unet_config: dict) -> list[str]:
    """The UNet's top-level blocks in forward order (``down_blocks.0`` ... ``mid_block`` ... ``up_blocks.N``):
    the units that gradient checkpointing is switched on or off for."""
    n = len(unet_config["block_out_channels"])
    mid = ["mid_block"] if unet_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") else []
    return [f"down_blocks.{i}" for i in range(n)] + mid + [f"up_blocks.{i}" for i in range(n)]


def _per_level(value, n: int) -> list[int]:
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)] * n


# LoRA targets inside the transformer layers (attention, feed-forward, projections); any other
# target (a ResNet convolution, the time embedding) lets gradients flow from the first block on.
_TRANSFORMER_TARGETS = ("to_", "add_", "ff", "proj_", "attn", "norm", "transformer")


def block_units(unet_config: dict, target_modules: tuple[str, ...] = UNET_TARGET_MODULES
                ) -> dict[str, tuple[float, float]]:
    """Per top-level block, (pixels at its level) x channels summed over its ResNets, and over its transformer
    layers, where gradients flow (relative to the full-resolution latent's pixels).

    Units before the first LoRA layer count nothing: no input of theirs requires a gradient, so autograd
    keeps nothing for them (SDXL's ``down_blocks.0`` under attention-only LoRA targets).

    Returns:
        Block name -> (ResNet elements, transformer-layer elements), in forward order.
    """
    channels = list(unet_config["block_out_channels"])
    n, per_block = len(channels), int(unet_config.get("layers_per_block", 2))
    tlayers = _per_level(unet_config.get("transformer_layers_per_block", 1), n)
    reverse = unet_config.get("reverse_transformer_layers_per_block")
    up_tlayers = [_per_level(r, per_block + 1)[0] for r in reverse] if reverse else list(reversed(tlayers))
    down_types = list(unet_config.get("down_block_types", ["CrossAttnDownBlock2D"] * n))
    up_types = list(unet_config.get("up_block_types", ["CrossAttnUpBlock2D"] * n))
    flowing = not all(t.split(".")[-1].startswith(_TRANSFORMER_TARGETS) or t.startswith(_TRANSFORMER_TARGETS)
                      for t in target_modules)
    units: list[tuple[str, int, int, int]] = []  # (block, level, resnets, transformer layers) in forward order
    for level in range(n):
        attn = tlayers[level] if "CrossAttn" in down_types[level] else 0
        units += [(f"down_blocks.{level}", level, 1, 0), (f"down_blocks.{level}", level, 0, attn)] * per_block
    if "mid_block" in unet_blocks(unet_config):
        mid_attn = tlayers[-1] if "CrossAttn" in str(unet_config.get("mid_block_type", "CrossAttn")) else 0
        units += [("mid_block", n - 1, 1, 0), ("mid_block", n - 1, 0, mid_attn), ("mid_block", n - 1, 1, 0)]
    for i in range(n):
        attn = up_tlayers[i] if "CrossAttn" in up_types[i] else 0
        units += [(f"up_blocks.{i}", n - 1 - i, 1, 0), (f"up_blocks.{i}", n - 1 - i, 0, attn)] * (per_block + 1)
    out = {block: (0.0, 0.0) for block in unet_blocks(unet_config)}
    for block, level, resnets, layers in units:
        flowing = flowing or layers > 0  # the first transformer layer carries LoRA weights
        if flowing:
            elements = channels[level] / 4**level
            out[block] = (out[block][0] + resnets * elements, out[block][1] + layers * elements)
    return out


def block_activation_weights(unet_config: dict, target_modules: tuple[str, ...] = UNET_TARGET_MODULES
                             ) -> dict[str, float]:
    """How much each top-level UNet block adds to the activations when it is not checkpointed (relative units):
    :func:`block_units` weighted by the saved elements of a ResNet and of a transformer layer.

    Args:
        unet_config: the UNet config.
        target_modules: the LoRA's target layers.

    Returns:
        Block name -> weight, in forward order.
    """
    return {block: r * RESNET_SAVED_ELEMENTS + t * TRANSFORMER_SAVED_ELEMENTS
            for block, (r, t) in block_units(unet_config, target_modules).items()}


def checkpointing_setting(value: Any) -> str | int:
    """A ``gradient_checkpointing`` value as "auto", "all", "none" or a block count (True/False from older configs).

    Raises:
        ValueError: naming the setting and the values it takes.
    """
    if isinstance(value, bool):
        return "all" if value else "none"
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, numbers.Integral) and value >= 0:
        return int(value)
    if isinstance(value, str) and value.strip().lower() in ("auto", "all", "none"):
        return value.strip().lower()
    raise ValueError(f"gradient_checkpointing must be auto, all, none or a number of UNet blocks (e.g. 4), not {value!r}")


def checkpointed_blocks(unet_config: dict, setting: bool | str | int,
                        target_modules: tuple[str, ...] = UNET_TARGET_MODULES) -> list[str]:
    """The UNet blocks that a ``gradient_checkpointing`` setting checkpoints, the most memory-hungry first.

    Args:
        unet_config: the UNet config.
        setting: "all" (or True), "none" (or False), or a number of blocks; "auto" must be decided by
            the plan first (:func:`lora_helpers.train.step_plan.choose_step`).
        target_modules: the LoRA's target layers (where gradients start to flow).

    Returns:
        Block names (``up_blocks.0``, ...), the ones whose activations take the most memory first.
    """
    weights = block_activation_weights(unet_config, target_modules)
    order = sorted(weights, key=lambda block: -weights[block])  # stable: ties keep the forward order
    setting = checkpointing_setting(setting)
    if setting == "auto":
        raise ValueError("gradient_checkpointing='auto' is decided by the memory plan first (plan_memory)")
    return order if setting == "all" else [] if setting == "none" else order[:setting]


def unchecked_share(unet_config: dict, setting: bool | str | int,
                    target_modules: tuple[str, ...] = UNET_TARGET_MODULES) -> float:
    """The part of what checkpointing saves that a setting leaves in memory: 0.0 with every block
    checkpointed, 1.0 with none, the un-checkpointed blocks' weights in between."""
    chosen = checkpointed_blocks(unet_config, setting, target_modules)
    if not chosen:
        return 1.0
    weights = block_activation_weights(unet_config, target_modules)
    return sum(w for block, w in weights.items() if block not in chosen) / (sum(weights.values()) or 1.0)


def checkpointing_label(unet_config: dict, setting: str | int, target_modules: tuple[str, ...]) -> str:
    """"off", "on" or "K of N blocks": how much of the UNet a setting checkpoints."""
    chosen, n = len(checkpointed_blocks(unet_config, setting, target_modules)), len(unet_blocks(unet_config))
    return "off" if chosen == 0 else "on" if chosen == n else f"{chosen} of {n} blocks"
