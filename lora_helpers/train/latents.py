"""Training inputs computed once: VAE latents, face-mask weights, text embeddings.

SDXL fits in 8 GB for training only if the VAE and both text encoders are gone before
the UNet arrives. So the training images are encoded to latents (fp32 VAE, or the
fp16-fix VAE: the original VAE overflows in fp16 and gives NaN), the captions to
prompt embeddings (plus the pooled embedding), then those models are deleted from GPU
*and* host memory, one at a time (Colab has 12.7 GB of host RAM). The results live in
``run/cache/`` with a fingerprint of everything they depend on, so a resumed run reuses
them and a changed dataset or caption rebuilds them.

Images keep their aspect bucket: each becomes a latent of its own size, and batches
are drawn from one size at a time (:func:`batch_plan`).
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

from lora_helpers.core.fileio import atomic_path, read_jsonl, sha256_file, write_json

__all__ = [
    "CACHE_VERSION",
    "TrainImage",
    "TrainCache",
    "read_training_images",
    "bucket_size",
    "batch_plan",
    "load_component",
    "encode_prompts",
    "build_cache",
]

CACHE_VERSION = 1
_CACHE_FILE = "cache.safetensors"
_MANIFEST = "cache.json"


@dataclass
class TrainImage:
    """One training image and what preparation recorded about it.

    Attributes:
        file_name: path relative to the dataset folder (the key in metadata.jsonl).
        path: the image file.
        caption: its training caption.
        mask_path: face mask (L mode, 255 on the face), or None.
        original_size: (height, width) of the photo it was cut from; None: the image's size.
        crop_top_left: (top, left) of the crop, for SDXL's micro-conditioning.
    """

    file_name: str
    path: Path
    caption: str
    mask_path: Path | None = None
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)


def _pair(value, default):
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return default


def _captions(dataset_dir: Path) -> dict[str, str]:
    """Captions through the caption stage's reader (sidecar wins over metadata.jsonl)."""
    from lora_helpers.caption.stage import load_captions

    return load_captions(dataset_dir)


def _unreadable(path: Path) -> str | None:
    """Why an image file cannot be used, or None when it opens."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"not a readable image ({type(exc).__name__})"
    return None


def read_training_images(dataset_dir: str | os.PathLike, *, instance_prompt: str | None = None,
                         use_captions: bool = True) -> list[TrainImage]:
    """List the images to train on with their captions and micro-conditioning.

    Images come from ``metadata.jsonl`` (the prepare stage), else from ``images/`` or the
    folder itself. Captions come from :func:`lora_helpers.caption.stage.load_captions`; with
    ``use_captions=False``, or when the dataset has no captions, every image gets
    ``instance_prompt``. A listed image that is missing is skipped with a warning.

    Args:
        dataset_dir: the dataset folder.
        instance_prompt: one prompt for every image (e.g. "a photo of TOK person").
        use_captions: prefer per-image captions when the dataset has them.

    Returns:
        The images, in dataset order.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no usable image, or images without a caption and no ``instance_prompt``.
    """
    from lora_helpers.core.images import list_images

    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {dataset_dir} (run the prepare and caption stages first)")
    meta = dataset_dir / "metadata.jsonl"
    if meta.is_file():
        rows = [r for r in read_jsonl(meta) if isinstance(r.get("file_name"), str)]
    else:
        folder = dataset_dir / "images" if (dataset_dir / "images").is_dir() else dataset_dir
        rows = [{"file_name": p.relative_to(dataset_dir).as_posix()} for p in list_images(folder)]
    captions: dict[str, str] = {}
    if use_captions:
        try:
            captions = _captions(dataset_dir)
        except ValueError as exc:  # CaptionError: some images lack a caption
            if not instance_prompt:
                raise ValueError(f"{exc}\nRun the caption stage, or train with one instance prompt "
                                 "(--instance-prompt 'a photo of TOK person')") from exc
            warnings.warn(f"captions incomplete in {dataset_dir}; every image uses the instance prompt "
                          f"{instance_prompt!r}")
            captions = {}
    images = []
    for row in rows:
        name = row["file_name"]
        path = dataset_dir / name
        if not path.is_file():
            warnings.warn(f"{name}: listed in metadata.jsonl but missing; skipped (re-run prepare)")
            continue
        reason = _unreadable(path)
        if reason:
            warnings.warn(f"{name}: {reason}; skipped (re-run prepare, or remove it from metadata.jsonl)")
            continue
        caption = captions.get(name) or instance_prompt
        if not caption:
            raise ValueError(f"{name}: no caption; run the caption stage or pass an instance prompt")
        mask = row.get("mask_file")
        mask_path = dataset_dir / mask if isinstance(mask, str) and (dataset_dir / mask).is_file() else None
        if mask_path is not None and _unreadable(mask_path):
            warnings.warn(f"{mask}: {_unreadable(mask_path)}; {name} trains without its face mask")
            mask_path = None
        images.append(TrainImage(file_name=name, path=path, caption=caption, mask_path=mask_path,
                                 original_size=_pair(row.get("original_size"), None),
                                 crop_top_left=_pair(row.get("crop_top_left"), (0, 0))))
    if not images:
        raise ValueError(f"no training images in {dataset_dir}; run the prepare stage (or put images in images/)")
    return images


def bucket_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (width, height) an image trains at: its aspect ratio at about ``resolution``² pixels.

    Sides are multiples of 64 at SDXL sizes (8 below 512 px, for the tiny models). An
    image already at such a size (what the prepare stage writes) keeps it.
    """
    step = 64 if resolution >= 512 else 8
    if width % step == 0 and height % step == 0 and abs(width * height / resolution**2 - 1) <= 0.15:
        return width, height
    scale = resolution / (width * height) ** 0.5
    return max(step, round(width * scale / step) * step), max(step, round(height * scale / step) * step)


def batch_plan(sizes: Sequence[tuple[int, int]], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of batches: images of one size per batch, order a function of (seed, epoch).

    Being a pure function of its arguments, the data order needs no state in a checkpoint:
    step N of a resumed run sees exactly the batch step N of an uninterrupted run saw.

    Returns:
        Lists of image indices.
    """
    rng = np.random.default_rng([seed, epoch])
    groups: dict[tuple[int, int], list[int]] = {}
    for i, size in enumerate(sizes):
        groups.setdefault(tuple(size), []).append(i)
    batches = []
    for key in sorted(groups):
        idx = [groups[key][j] for j in rng.permutation(len(groups[key]))]
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))]


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
    from PIL import ImageOps

    return image if image.size == tuple(size) else ImageOps.fit(image, tuple(size), resample)


def _pixels(path: Path, size: tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    from lora_helpers.core.images import load_image

    image = _fit(load_image(path), size, Image.Resampling.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def _mask_weight(path: Path, size: tuple[int, int], background_weight: float) -> torch.Tensor:
    """Face mask at latent size (area average), mapped to loss weights in [background_weight, 1]."""
    from PIL import Image

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
        from safetensors.torch import save_file

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
                                        "prompt_ids": self.prompt_ids, "sizes": self.sizes,
                                        "n_images": len(self.latents), "n_class": len(self.class_latents)})

    @classmethod
    def load(cls, folder: Path, fingerprint: str) -> "TrainCache | None":
        """The cache in ``folder`` if its fingerprint matches, else None."""
        from safetensors.torch import load_file

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
            class_time_ids=[t[f"class_time_ids.{i}"] for i in range(nc)], fingerprint=fingerprint,
        )


def _fingerprint(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _time_ids(original: tuple[int, int], crop: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    return torch.tensor([*original, *crop, *target], dtype=torch.float32)


def build_cache(cache_dir: str | os.PathLike, *, model: str, images: Sequence[TrainImage], resolution: int,
                device: torch.device | str, vae: str | None = None, vae_dtype: torch.dtype = torch.float32,
                text_dtype: torch.dtype = torch.float32, extra_prompts: Sequence[str] = (),
                class_images: Sequence[Path] = (), class_prompt: str | None = None, use_masks: bool = True,
                background_weight: float = 0.5, encode_text: bool = True, progress: bool = True) -> TrainCache:
    """Encode the training set once, or reuse the cache when nothing it depends on changed.

    Text encoders are loaded first and freed, then the VAE, so at most one of them is
    in host or GPU memory at a time.

    Args:
        cache_dir: where ``cache.safetensors`` and ``cache.json`` go (``run/cache``).
        model: SDXL hub id or folder.
        images: from :func:`read_training_images`.
        resolution: training resolution (each image keeps its aspect bucket).
        device: where the encoders run.
        vae: a separate VAE (e.g. the fp16-fix VAE) instead of the model's.
        vae_dtype: fp32, or fp16 with the fp16-fix VAE only (the original gives NaN in fp16).
        text_dtype: text encoder dtype.
        extra_prompts: also encode these (validation and class prompts).
        class_images: prior-preservation images, trained square at ``resolution``.
        class_prompt: their prompt.
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
    from tqdm.auto import tqdm

    from lora_helpers.core.runtime import free_memory

    cache_dir = Path(cache_dir)
    device = torch.device(device)
    prompts = list(dict.fromkeys([im.caption for im in images] + ([class_prompt] if class_prompt else [])
                                 + [p for p in extra_prompts if p]))
    sizes = []
    for im in images:
        from PIL import Image

        with Image.open(im.path) as probe:
            sizes.append(bucket_size(*probe.size, resolution))
    parts = {
        "version": CACHE_VERSION, "model": model, "vae": vae, "vae_dtype": str(vae_dtype), "text_dtype": str(text_dtype),
        "resolution": resolution, "use_masks": use_masks, "background_weight": background_weight,
        "encode_text": encode_text, "prompts": prompts, "class_prompt": class_prompt,
        "images": [(im.file_name, sha256_file(im.path), sha256_file(im.mask_path) if im.mask_path else None,
                    im.caption, im.original_size, im.crop_top_left) for im in images],
        "class_images": [sha256_file(p) for p in class_images],
    }
    fingerprint = _fingerprint(parts)
    cached = TrainCache.load(cache_dir, fingerprint)
    if cached is not None:
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
        class_latents=class_latents, class_time_ids=class_time_ids, fingerprint=fingerprint,
    )
    cache.save(cache_dir, {"model": model, "vae": vae, "resolution": resolution})
    return cache
