"""Where models come from and how big things are: one switch for smoke mode.

``LORA_HELPERS_SMOKE=1`` swaps every hub id for a tiny local model (built on first use
into a cache folder), 64 px images and a few steps. Notebooks and the CLI read this one
place, so the cells a Colab user runs are the same cells CI runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from lora_helpers.core import tiny_models

__all__ = [
    "HUB_MODELS",
    "Models",
    "smoke_mode",
    "cache_dir",
    "tiny_models_dir",
    "resolve_models",
    "default_resolution",
]

SMOKE_ENV = "LORA_HELPERS_SMOKE"
CACHE_ENV = "LORA_HELPERS_CACHE"


@dataclass(frozen=True)
class Models:
    """Model ids or local folders for every stage; each goes to ``from_pretrained``.

    Attributes:
        sdxl: the SDXL base pipeline (UNet, VAE, two text encoders, tokenizers, scheduler).
        vae: a VAE that is safe in fp16 (None: use the pipeline's own VAE).
        blip: the BLIP captioning model and processor.
        clip: the CLIP model and processor used for prompt adherence.
        smoke: True when these are the tiny local models.
    """

    sdxl: str
    vae: str | None
    blip: str
    clip: str
    smoke: bool = False


HUB_MODELS = Models(
    sdxl="stabilityai/stable-diffusion-xl-base-1.0",
    # The original SDXL VAE overflows in fp16 (NaN, black images); this one is fine-tuned not to.
    vae="madebyollin/sdxl-vae-fp16-fix",
    blip="Salesforce/blip-image-captioning-base",
    clip="openai/clip-vit-large-patch14",
)


def smoke_mode() -> bool:
    """True when ``LORA_HELPERS_SMOKE`` is set to a true value (1, true, yes, on)."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def cache_dir() -> Path:
    """Folder for built tiny models and caches (``LORA_HELPERS_CACHE`` or ~/.cache/lora_helpers)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lora_helpers")


def tiny_models_dir(*, build: bool = True) -> Path:
    """Folder holding the tiny models, built on first use.

    Args:
        build: build the models when they are missing.

    Returns:
        Folder with ``sdxl/``, ``blip/``, ``clip/`` subfolders.
    """
    root = cache_dir() / f"tiny-models-v{tiny_models.TINY_MODELS_VERSION}"
    if build and not (root / "complete").exists():
        tiny_models.build_tiny_models(root)
    return root


def resolve_models(smoke: bool | None = None, **overrides: str | None) -> Models:
    """Return the models to use: hub ids, or tiny local folders in smoke mode.

    Args:
        smoke: force smoke mode on or off; None reads ``LORA_HELPERS_SMOKE``.
        **overrides: replace single entries (``sdxl=``, ``vae=``, ``blip=``, ``clip=``);
            None values are ignored so CLI flags can be passed straight through.

    Returns:
        A :class:`Models`.
    """
    smoke = smoke_mode() if smoke is None else smoke
    if smoke:
        root = tiny_models_dir()
        models = Models(sdxl=str(root / "sdxl"), vae=None, blip=str(root / "blip"), clip=str(root / "clip"), smoke=True)
    else:
        models = HUB_MODELS
    return replace(models, **{k: v for k, v in overrides.items() if v is not None})


def default_resolution(smoke: bool | None = None) -> int:
    """Training and generation size: 1024 px for SDXL, 64 px for the tiny models."""
    smoke = smoke_mode() if smoke is None else smoke
    return 64 if smoke else 1024
