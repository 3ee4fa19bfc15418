"""Training inputs computed once: VAE latents, face-mask weights, text embeddings.

SDXL fits in 8 GB for training only if the VAE and both text encoders are gone before
the UNet arrives. So the training images are encoded to latents (fp32 VAE, or the
fp16-fix VAE: the original VAE overflows in fp16 and gives NaN), the captions to
prompt embeddings (plus the pooled embedding), then those models are deleted from GPU
*and* host memory, one at a time (Colab has 12.7 GB of host RAM). The results live in
``run/cache/`` with a fingerprint of everything they depend on, so a resumed run reuses
them and a changed dataset or caption rebuilds them.

Images keep their aspect bucket (:func:`lora_helpers.core.buckets.training_size`): each becomes a
latent of its own size, and batches are drawn from one size at a time.

diffusers and transformers are imported inside the functions that load models: importing
them costs seconds, and a notebook that only builds a config or reads a run needs neither.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from lora_helpers.core.fileio import atomic_path, sha256_file, write_json
from lora_helpers.core.images import load_image
from lora_helpers.core.runtime import free_memory
from lora_helpers.core.buckets import training_size
from lora_helpers.train.data import TrainImage

__all__ = [
    "CACHE_VERSION",
    "TrainCache",
    "load_component",
    "encode_prompts",
    "build_cache",
]

CACHE_VERSION = 1
_CACHE_FILE = "cache.safetensors"
_MANIFEST = "cache.json"


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence diffusers/transformers chatter while probing for the fp16 variant."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    old_d, old_t = dlog.get_verbosity(), tlog.get_verbosity()
    dlog.set_verbosity(logging.CRITICAL)  # diffusers reports a missing variant as an error
    tlog.set_verbosity(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        dlog.set_verbosity(old_d)
        tlog.set_verbosity(old_t)


def load_component(cls, name: str, *, dtype: torch.dtype = torch.float32, subfolder: str | None = None, **kwargs):
    """``cls.from_pretrained`` with the host-RAM habits Colab needs.

    The fp16 files are read when the model has them and ``dtype`` is fp16 (half the
    download and half the RAM); ``low_cpu_mem_usage`` avoids a second copy while loading.
    A model that ships only fp16 files also loads in fp32 (cast up). A hub id or local
    folder both work.

    Args:
        cls: a diffusers or transformers class (``UNet2DConditionModel``, ``AutoencoderKL``, a pipeline).
        name: hub id or folder.
        dtype: the dtype to load in.
        subfolder: the component's folder inside ``name`` ("unet", "vae", ...).
        **kwargs: passed on to ``from_pretrained``.

    Returns:
        The loaded model.
    """
    kwargs = {"low_cpu_mem_usage": True, **kwargs}
    if subfolder:
        kwargs["subfolder"] = subfolder
    variants = ["fp16", None] if dtype == torch.float16 else [None, "fp16"]
    errors = []
    for variant in variants:
        try:
            with _quiet():
                return cls.from_pretrained(name, dtype=dtype, variant=variant, **kwargs)
        except (OSError, ValueError) as exc:  # no files of this variant: try the other
            errors.append(exc)
    raise errors[variants.index(None)]


def encode_prompts(pipe, prompts: Sequence[str], device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts exactly as ``StableDiffusionXLPipeline`` does at inference.

    Args:
        pipe: an SDXL pipeline with both text encoders (UNet and VAE may be None).
        prompts: the prompts, encoded one at a time.
        device: where the text encoders are.

    Returns:
        ``(prompt_embeds [N, 77, D], pooled [N, D2])`` on CPU.
    """
    embeds, pooled = [], []
    with torch.no_grad():
        for prompt in prompts:
            pe, _, pp, _ = pipe.encode_prompt(prompt, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
            embeds.append(pe[0].cpu())
            pooled.append(pp[0].cpu())
    return torch.stack(embeds), torch.stack(pooled)


def _fit(image, size: tuple[int, int], resample):
    return image if image.size == tuple(size) else ImageOps.fit(image, tuple(size), resample)


def _pixels(path: Path, size: tuple[int, int]) -> torch.Tensor:
    image = _fit(load_image(path), size, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _mask_weight(path: Path, size: tuple[int, int], background_weight: float) -> torch.Tensor:
    """Face mask at latent size (area average), mapped to loss weights in [background_weight, 1]."""
    mask = _fit(Image.open(path).convert("L"), size, Image.Resampling.BILINEAR)
    mask = mask.resize((size[0] // 8, size[1] // 8), Image.Resampling.BOX)
    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None]
    return background_weight + (1.0 - background_weight) * m


@dataclass
class TrainCache:
    """Everything a training step needs except the UNet, on CPU.

    Attributes:
        latents: per instance image, [4, h, w] (already scaled by the VAE factor).
        weights: per instance image, [1, h, w] loss weights from its face mask, or None.
        time_ids: per instance image, [6] (original size, crop top-left, target size).
        prompt_ids: per instance image, index of its caption in ``prompts``.
        class_latents, class_time_ids: prior-preservation images (may be empty).
        class_prompt_ids: per class image, index of its class prompt in ``prompts``.
        prompts: every encoded prompt (captions, class prompt, validation prompts).
        prompt_embeds, pooled_embeds: [P, 77, D] and [P, D2]; None when the text
            encoders are trained (their outputs change every step).
        sizes: (width, height) of each instance image.
    """

    latents: list[torch.Tensor]
    weights: list[torch.Tensor | None]
    time_ids: list[torch.Tensor]
    prompt_ids: list[int]
    sizes: list[tuple[int, int]]
    prompts: list[str]
    prompt_embeds: torch.Tensor | None
    pooled_embeds: torch.Tensor | None
    class_latents: list[torch.Tensor] = field(default_factory=list)
    class_time_ids: list[torch.Tensor] = field(default_factory=list)
    class_prompt_ids: list[int] = field(default_factory=list)
    fingerprint: str = ""

    def prompt_index(self, prompt: str) -> int:
        """Index of ``prompt`` in :attr:`prompts` (KeyError if it was not encoded)."""
        try:
            return self.prompts.index(prompt)
        except ValueError:
            raise KeyError(f"prompt {prompt!r} was not encoded into the cache") from None

    def embeds(self, prompt_ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompt and pooled embeddings for these prompt indices, stacked."""
        return self.prompt_embeds[list(prompt_ids)], self.pooled_embeds[list(prompt_ids)]

    def save(self, folder: Path, manifest: dict) -> None:
        """Write ``cache.safetensors`` and ``cache.json`` (``manifest`` plus the fingerprint) into ``folder``."""
        tensors: dict[str, torch.Tensor] = {}
        for i, (lat, w, t) in enumerate(zip(self.latents, self.weights, self.time_ids)):
            tensors[f"latent.{i}"], tensors[f"time_ids.{i}"] = lat, t
            if w is not None:
                tensors[f"weight.{i}"] = w
        for i, (lat, t) in enumerate(zip(self.class_latents, self.class_time_ids)):
            tensors[f"class_latent.{i}"], tensors[f"class_time_ids.{i}"] = lat, t
        if self.prompt_embeds is not None:
            tensors["prompt_embeds"], tensors["pooled_embeds"] = self.prompt_embeds, self.pooled_embeds
        with atomic_path(folder / _CACHE_FILE) as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        write_json(folder / _MANIFEST, {**manifest, "fingerprint": self.fingerprint, "prompts": self.prompts,
                                        "prompt_ids": self.prompt_ids, "class_prompt_ids": self.class_prompt_ids,
                                        "sizes": self.sizes,
                                        "n_images": len(self.latents), "n_class": len(self.class_latents)})

    @classmethod
    def load(cls, folder: Path, fingerprint: str) -> "TrainCache | None":
        """The cache in ``folder`` if its fingerprint matches, else None."""
        try:
            manifest = json.loads((folder / _MANIFEST).read_text(encoding="utf-8"))
            if manifest.get("fingerprint") != fingerprint:
                return None
            t = load_file(str(folder / _CACHE_FILE))
        except (OSError, ValueError):
            return None
        n, nc = manifest["n_images"], manifest["n_class"]
        return cls(
            latents=[t[f"latent.{i}"] for i in range(n)], weights=[t.get(f"weight.{i}") for i in range(n)],
            time_ids=[t[f"time_ids.{i}"] for i in range(n)], prompt_ids=list(manifest["prompt_ids"]),
            sizes=[tuple(s) for s in manifest["sizes"]], prompts=list(manifest["prompts"]),
            prompt_embeds=t.get("prompt_embeds"), pooled_embeds=t.get("pooled_embeds"),
            class_latents=[t[f"class_latent.{i}"] for i in range(nc)],
            class_time_ids=[t[f"class_time_ids.{i}"] for i in range(nc)],
            class_prompt_ids=list(manifest.get("class_prompt_ids") or []), fingerprint=fingerprint,
        )


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)


def build_cache(cache_dir: str | os.PathLike, *, model: str, images: Sequence[TrainImage], resolution: int,
                device: torch.device | str, vae: str | None = None, vae_dtype: torch.dtype = torch.float32,
                text_dtype: torch.dtype = torch.float32, extra_prompts: Sequence[str] = (),
                class_images: Sequence[Path] = (), class_prompt: str | None = None,
                class_prompts: Sequence[str] | None = None, use_masks: bool = True,
                background_weight: float = 0.5, encode_text: bool = True, progress: bool = True) -> TrainCache:
    """Encode the training set once, or reuse the cache when nothing it depends on changed.

    Text encoders are loaded first and freed, then the VAE, so at most one of them is
    in host or GPU memory at a time.

    Args:
        cache_dir: where ``cache.safetensors`` and ``cache.json`` go (``run/cache``).
        model: SDXL hub id or folder.
        images: from :func:`lora_helpers.train.data.read_training_images`.
        resolution: training resolution (each image keeps its aspect bucket).
        device: where the encoders run.
        vae: a separate VAE (e.g. the fp16-fix VAE) instead of the model's.
        vae_dtype: fp32, or fp16 with the fp16-fix VAE only (the original gives NaN in fp16).
        text_dtype: text encoder dtype.
        extra_prompts: also encode these (validation and class prompts).
        class_images: prior-preservation images, trained square at ``resolution``.
        class_prompt: their prompt.
        class_prompts: each class image's own prompt instead (people of several classes).
        use_masks: turn face masks into loss weights.
        background_weight: loss weight outside the face (1 = masks have no effect).
        encode_text: False when the text encoders are trained (then captions are encoded
            every step and only latents are cached).
        progress: show progress bars.

    Returns:
        A :class:`TrainCache`.

    Raises:
        FloatingPointError: the VAE produced NaN/inf latents (fp16 VAE), with advice.
    """
    cache_dir = Path(cache_dir)
    device = torch.device(device)
    class_prompts = list(class_prompts) if class_prompts else [class_prompt] * len(class_images)
    prompts = list(dict.fromkeys([im.caption for im in images] + [p for p in class_prompts if p]
                                 + ([class_prompt] if class_prompt else [])
                                 + [p for p in extra_prompts if p]))
    sizes = []
    for im in images:
        with Image.open(im.path) as probe:
            sizes.append(training_size(*probe.size, resolution))
    parts = {
        "version": CACHE_VERSION, "model": model, "vae": vae, "vae_dtype": str(vae_dtype), "text_dtype": str(text_dtype),
        "resolution": resolution, "use_masks": use_masks, "background_weight": background_weight,
        "encode_text": encode_text, "prompts": prompts, "class_prompt": class_prompt,
        "images": [(im.file_name, sha256_file(im.path), sha256_file(im.mask_path) if im.mask_path else None,
                    im.caption, im.original_size, im.crop_top_left) for im in images],
        "class_images": [sha256_file(p) for p in class_images],
    }
    if len(set(class_prompts)) > 1:  # (kept out otherwise: caches of one class keep their fingerprint)
        parts["class_prompts"] = class_prompts
    fingerprint = _fingerprint(parts)
    cached = TrainCache.load(cache_dir, fingerprint)
    if cached is not None:
        if len(cached.class_prompt_ids) != len(cached.class_latents):  # written before class prompts were recorded
            cached.class_prompt_ids = [prompts.index(p) for p in class_prompts]
        return cached

    prompt_embeds = pooled = None
    if encode_text and prompts:
        from diffusers import StableDiffusionXLPipeline

        pipe = load_component(StableDiffusionXLPipeline, model, dtype=text_dtype, unet=None, vae=None)
        pipe.text_encoder.to(device)
        pipe.text_encoder_2.to(device)
        prompt_embeds, pooled = encode_prompts(pipe, prompts, device)
        del pipe  # the text encoders must leave host and GPU memory before the UNet loads
        free_memory()

    from diffusers import AutoencoderKL

    autoencoder = (load_component(AutoencoderKL, vae, dtype=vae_dtype) if vae
                   else load_component(AutoencoderKL, model, subfolder="vae", dtype=vae_dtype)).to(device).eval()
    scale = autoencoder.config.scaling_factor
    shift = getattr(autoencoder.config, "shift_factor", None) or 0.0

    def encode(path: Path, size: tuple[int, int]) -> torch.Tensor:
        pixels = _pixels(path, size)[None].to(device, dtype=vae_dtype)
        with torch.no_grad():
            latent = (autoencoder.encode(pixels).latent_dist.mean - shift) * scale
        latent = latent[0].float().cpu()
        if not torch.isfinite(latent).all():
            raise FloatingPointError(
                f"{path}: the VAE gave NaN/inf latents in {vae_dtype}; encode in fp32 or use the fp16-fix VAE "
                "(--vae madebyollin/sdxl-vae-fp16-fix)")
        return latent

    latents, weights, time_ids = [], [], []
    try:
        for im, size in tqdm(list(zip(images, sizes)), desc="encoding images", unit="image", disable=not progress):
            latents.append(encode(im.path, size))
            weights.append(_mask_weight(im.mask_path, size, background_weight) if use_masks and im.mask_path else None)
            original = im.original_size or (size[1], size[0])
            time_ids.append(_time_ids(original, im.crop_top_left, (size[1], size[0])))
        class_latents, class_time_ids = [], []
        square = (resolution, resolution)
        for path in tqdm(list(class_images), desc="encoding class images", unit="image", disable=not progress):
            class_latents.append(encode(path, square))
            class_time_ids.append(_time_ids(square, (0, 0), square))
    finally:
        del autoencoder
        free_memory()

    cache = TrainCache(
        latents=latents, weights=weights, time_ids=time_ids, prompt_ids=[prompts.index(im.caption) for im in images],
        sizes=sizes, prompts=prompts, prompt_embeds=prompt_embeds, pooled_embeds=pooled,
        class_latents=class_latents, class_time_ids=class_time_ids,
        class_prompt_ids=[prompts.index(p) for p in class_prompts], fingerprint=fingerprint,
    )
    cache.save(cache_dir, {"model": model, "vae": vae, "resolution": resolution})
    return cache
