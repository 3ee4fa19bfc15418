"""How big an SDXL model is, from its config alone: UNet, Linear and LoRA parameter counts, the VAE.

Read from ``unet/config.json`` and ``vae/config.json`` and counted on the meta device, so the
memory planner needs no weights (and, for SDXL base, no network: its config is known).
"""

from __future__ import annotations

import functools
import json
import warnings

import torch

from lora_helpers.core.config import HUB_MODELS
from lora_helpers.core.lora_files import UNET_TARGET_MODULES
from lora_helpers.core.tiny_models import SDXL_UNET_CONFIG

__all__ = ["unet_config_for", "count_unet_parameters", "vae_parameters", "text_encoder_parameters"]

_SDXL_VAE_PARAMS = 83_653_863
_SDXL_TEXT_ENCODER_PARAMS = 123_060_480 + 694_659_840  # CLIP ViT-L text + OpenCLIP bigG text


def unet_config_for(model: str) -> dict:
    """The UNet config of a model (hub id or folder), reading only ``unet/config.json``.

    Offline, the hub id of SDXL base falls back to the known SDXL config, so plans can
    be made anywhere.
    """
    from diffusers import UNet2DConditionModel

    if str(model) == HUB_MODELS.sdxl:
        # Known exactly: no hub round trip (which, without a network, retries for about a minute).
        return dict(SDXL_UNET_CONFIG)
    try:
        with warnings.catch_warnings():  # huggingface_hub deprecation chatter on offline lookups
            warnings.simplefilter("ignore")
            return dict(UNet2DConditionModel.load_config(model, subfolder="unet"))
    except (OSError, ValueError, EnvironmentError):
        if "stable-diffusion-xl" in str(model).lower() or "sdxl" in str(model).lower():
            return dict(SDXL_UNET_CONFIG)
        raise


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # peft's rule: a target matches a module whose name is it or ends with "." + it
    return any(name == t or name.endswith("." + t) for t in targets)


@functools.lru_cache(maxsize=16)
def vae_parameters(model: str | None) -> int:
    """Parameters of the model's VAE, from its config on the meta device (SDXL's when unknown)."""
    if model is None or str(model) == HUB_MODELS.sdxl:
        return _SDXL_VAE_PARAMS
    from diffusers import AutoencoderKL

    try:
        config = dict(AutoencoderKL.load_config(model, subfolder="vae"))
    except (OSError, ValueError, EnvironmentError):
        return _SDXL_VAE_PARAMS
    with torch.device("meta"):
        vae = AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    return sum(p.numel() for p in vae.parameters())


@functools.lru_cache(maxsize=16)
def text_encoder_parameters(model: str | None) -> int:
    """Parameters of both text encoders, from their configs on the meta device (SDXL's when unknown)."""
    if model is None or str(model) == HUB_MODELS.sdxl:
        return _SDXL_TEXT_ENCODER_PARAMS
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    total = 0
    for subfolder, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                config = CLIPTextConfig.from_pretrained(model, subfolder=subfolder)
        except (OSError, ValueError, EnvironmentError):
            return _SDXL_TEXT_ENCODER_PARAMS
        with torch.device("meta"):
            total += sum(p.numel() for p in cls(config).parameters())
    return total


@functools.lru_cache(maxsize=16)
def _count(config_json: str, targets: tuple[str, ...], rank: int) -> tuple[int, int, int]:
    from diffusers import UNet2DConditionModel

    config = {k: v for k, v in json.loads(config_json).items() if not k.startswith("_")}
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    total = sum(p.numel() for p in unet.parameters())
    linear = sum(m.weight.numel() for m in unet.modules() if isinstance(m, torch.nn.Linear))
    lora = 0
    for name, module in unet.named_modules():
        if not _matches(name, targets):
            continue
        if isinstance(module, torch.nn.Linear):
            lora += rank * (module.in_features + module.out_features)
        elif isinstance(module, torch.nn.Conv2d):
            k = module.kernel_size[0] * module.kernel_size[1]
            lora += rank * (module.in_channels * k + module.out_channels)
    return total, linear, lora


def count_unet_parameters(unet_config: dict, *, target_modules=UNET_TARGET_MODULES,
                          rank: int = 16) -> dict[str, int]:
    """Parameters of a UNet config, its Linear layers, and a LoRA on ``target_modules``.

    Returns:
        ``{"total": ..., "linear": ..., "lora": ...}``.
    """
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet_config.items() if not k.startswith("_")}
    total, linear, lora = _count(json.dumps(config, sort_keys=True, default=str), tuple(target_modules), rank)
    return {"total": total, "linear": linear, "lora": lora}
