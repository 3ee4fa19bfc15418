"""An untrained run folder with a random LoRA, for smoke runs, demos and tests."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lora_helpers.core.lora_convert import save_kohya
from lora_helpers.core.lora_files import TEXT_ENCODER_TARGET_MODULES, UNET_TARGET_MODULES, quiet_diffusers, save_lora
from lora_helpers.core.run_folder import DEFAULT_TRIGGER, LORA_WEIGHT_NAME, checkpoint_dir, kohya_file_name, write_run_config

__all__ = ["make_random_lora"]


def make_random_lora(
    run_dir: str | os.PathLike,
    base_model: str | os.PathLike,
    *,
    rank: int = 4,
    seed: int = 0,
    trigger: str = DEFAULT_TRIGGER,
    checkpoint_steps: tuple[int, ...] = (),
    text_encoders: bool = False,
    resolution: int | None = None,
) -> Path:
    """Write an untrained run folder: a random (non-zero) LoRA in diffusers and kohya layout.

    For smoke runs, demos and tests where no trained LoRA exists; the pictures change
    with the LoRA but show nobody in particular. The folder follows the training
    stage's contract: ``pytorch_lora_weights.safetensors``, ``<name>_kohya.safetensors``,
    ``config.json`` and ``checkpoints/checkpoint-<step>/pytorch_lora_weights.safetensors``
    (the LoRA scaled by ``step / last step``, so checkpoints show a gradual change).

    Args:
        run_dir: folder to write (created; existing LoRA files are replaced).
        base_model: the SDXL base (hub id or folder) whose UNet shapes the LoRA.
        rank: LoRA rank.
        seed: random seed of the LoRA weights.
        trigger: recorded as the run's trigger phrase.
        checkpoint_steps: steps of intermediate checkpoints to write.
        text_encoders: also adapt both text encoders' attention layers.
        resolution: recorded resolution; default: the UNet's sample size.

    Returns:
        ``run_dir``.
    """
    # Model classes cost seconds to import; only tests and smoke runs come here.
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig, inject_adapter_in_model

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with quiet_diffusers():
        unet = UNet2DConditionModel.from_pretrained(str(base_model), subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(UNET_TARGET_MODULES),
                                init_lora_weights=False))  # non-zero B: the LoRA changes the pictures
    models = {"unet": unet}
    if text_encoders:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            with quiet_diffusers():
                model = cls.from_pretrained(str(base_model), subfolder=name)
            # peft directly: transformers' add_adapter wants a newer peft than diffusers needs
            config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                target_modules=list(TEXT_ENCODER_TARGET_MODULES))
            inject_adapter_in_model(config, model)
            model.peft_config = {"default": config}
            models[name] = model
    full_b = {(name, key): p.detach().clone() for name, m in models.items()
              for key, p in m.named_parameters() if ".lora_B." in key}

    def write(folder: Path, fraction: float) -> None:
        with torch.no_grad():
            for name, m in models.items():
                for key, p in m.named_parameters():
                    if (name, key) in full_b:
                        p.copy_(full_b[(name, key)] * fraction)
        save_lora(folder, **models)

    last = max(checkpoint_steps) if checkpoint_steps else 1
    for step in checkpoint_steps:
        write(checkpoint_dir(run_dir, step), step / last)
    write(run_dir, 1.0)
    save_kohya(run_dir / LORA_WEIGHT_NAME, run_dir / kohya_file_name(run_dir.name),
               output_name=run_dir.name, layers_per_block=unet.config.layers_per_block, trigger=trigger)
    write_run_config(run_dir, {
        "trigger": trigger,
        "base_model": str(base_model),
        "resolution": resolution or unet.config.sample_size * 8,
        "rank": rank,
        "note": "random untrained LoRA (make_random_lora) for smoke runs and demos",
    })
    return run_dir
