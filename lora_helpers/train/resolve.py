"""A :class:`~lora_helpers.train.config.TrainConfig` made concrete for a machine.

:func:`resolve_config` fills the "auto" and None fields (device, precision, VAE,
optimizer, model) before anything is planned or loaded; a resolved config stays as it is.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from lora_helpers.core.config import HUB_MODELS, resolve_models, smoke_mode
from lora_helpers.core.runtime import say
from lora_helpers.train.config import TrainConfig

__all__ = ["bitsandbytes_problem", "device_for", "resolve_config"]


def device_for(config: TrainConfig) -> str:
    """ "cuda" when the config may use a GPU and one is there, else "cpu"."""
    if config.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def _mixed_precision(config: TrainConfig, device_type: str) -> str:
    if device_type != "cuda":
        # fp16 kernels on CPU are slow or missing (tests and smoke runs use fp32). bf16 is kept when
        # asked for by name: CPUs with AVX-512 BF16 or AMX run it fast, in half of fp32's memory.
        return "bf16" if config.mixed_precision == "bf16" else "no"
    if config.mixed_precision == "auto":
        if not torch.cuda.is_available():  # planning for a GPU from a machine without one: 2 bytes either way
            return "fp16"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if config.mixed_precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16 (a T4 does not): use mixed_precision='fp16' (the t4-8gb preset)")
    return config.mixed_precision


def resolve_config(config: TrainConfig, device_type: str) -> TrainConfig:
    """Fill the "auto" and None fields for this machine (idempotent).

    Args:
        config: as the person set it.
        device_type: "cuda" or "cpu" (from :func:`device_for`, or the machine planned for).

    Returns:
        A copy with model, VAE, precision, optimizer, LoRA alpha and device filled in.
    """
    smoke = config.preset == "cpu-smoke" or smoke_mode()
    models = resolve_models(smoke=smoke)
    mixed = _mixed_precision(config, device_type)
    vae = config.vae
    if vae == "auto":
        # The original SDXL VAE overflows in fp16; in fp32 it is fine (and needs no download).
        vae = HUB_MODELS.vae if (mixed == "fp16" and not models.smoke) else None
    optimizer = config.optimizer
    if optimizer == "auto":
        optimizer = "adamw8bit" if device_type == "cuda" else "adamw"
    if optimizer == "adamw8bit" and (problem := bitsandbytes_problem()):
        # Colab images without bitsandbytes, or a build without this GPU's kernels: train anyway,
        # with 6 more bytes of optimizer state per LoRA weight (plan_memory counts them).
        _say_once(f"8-bit AdamW is not available ({problem}); using AdamW instead")
        optimizer = "adamw"
    return dataclasses.replace(
        config, model=config.model or models.sdxl, vae=vae, mixed_precision=mixed, optimizer=optimizer,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else float(config.lora_rank),
        device=device_type,
    )


@functools.cache
def bitsandbytes_problem() -> str | None:
    """Why 8-bit AdamW cannot be used here, or None when bitsandbytes imports and has the optimizer."""
    try:
        import bitsandbytes as bnb  # optional (the cuda extra), and slow to import: only probed when asked

        bnb.optim.AdamW8bit  # noqa: B018 - raises when the build has no optimizer kernels
    except Exception as exc:  # ImportError, or a RuntimeError from a build without CUDA kernels
        return f"bitsandbytes: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unusable'}"
    return None


@functools.cache
def _say_once(message: str) -> None:
    say(message)
