"""Generating images: one picture per prompt × seed, the cache, saving.

Reproducibility: each image has its own ``torch.Generator`` on the CPU seeded with its
seed, so an image depends on its seed alone — not on its position in a batch, on the
other seeds asked for, or on the GPU model (CPU noise is the same everywhere).
``{subject}`` in a prompt becomes the run's trigger phrase ("TOK person"); with several people
(a run of several, or a :class:`lora_helpers.generate.combine.LoraSet`) ``{<name>}`` calls each
("{ada} and {grace} at a cafe") and ``{subject}`` is refused, naming them.

The pipeline comes from :mod:`lora_helpers.generate.pipeline`, the LoRA from
:mod:`lora_helpers.generate.lora`, the settings and their checks from
:mod:`lora_helpers.generate.settings` (re-exported here); the grids people look at are in
:mod:`lora_helpers.generate.grids`.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from lora_helpers import __version__
from lora_helpers.core.grids import save_png_with_metadata
from lora_helpers.core.png import png_bytes
from lora_helpers.core.subjects import fill_subjects
from lora_helpers.generate.cache import ImageCache, cache_key
from lora_helpers.generate.combine import LoraSet
from lora_helpers.generate.lora import LoraInfo, activate_lora
from lora_helpers.generate.settings import (
    SCHEDULERS, GenerateConfig, check_number, check_prompts, check_seeds, resolve_size, resolve_steps,
)

__all__ = [
    "SCHEDULERS", "GenerateConfig", "PngResult", "GeneratedImage",
    "resolve_size", "resolve_steps", "fill_subject", "generate_images", "save_images",
]


def fill_subject(prompt: str, subject: str | None, subjects: dict[str, str] | None = None) -> str:
    """Replace ``{subject}`` with the trigger phrase, and ``{<name>}`` with that person's.

    Args:
        prompt: a prompt, with or without placeholders.
        subject: the trigger phrase, e.g. "TOK person" (None: unknown, or several people).
        subjects: name -> trigger of each person the LoRA(s) know ({} or None: one person).

    Returns:
        The prompt the model sees.

    Raises:
        ValueError: when the prompt uses ``{subject}`` and no phrase is known (with several people:
            naming the placeholders to use), or names a person the LoRA(s) do not know.
    """
    return fill_subjects(prompt, subjects, subject=subject)


class PngResult:
    """Base of results that hold ``image`` and ``metadata()``: PNG saving and notebook display."""

    def save(self, path: str | Path) -> Path:
        """Write a PNG with the parameters as text metadata (atomic).

        Args:
            path: the PNG file to write; its folder is created.

        Returns:
            ``path``.
        """
        return save_png_with_metadata(path, self.image, self.metadata())

    def _repr_png_(self) -> bytes:
        return png_bytes(self.image)


@dataclass
class GeneratedImage(PngResult):
    """One generated picture with everything needed to make it again.

    Attributes:
        image: the picture (RGB).
        params: prompt, negative prompt, seed, size, steps, guidance, scheduler, LoRA file,
            hash and scale, base model, VAE, dtype, device (what PNG metadata holds).
        key: its cache key.
        cached: True when it came from the cache without running the model.
        seconds: generation time (0 for a cache hit).
    """

    image: Image.Image
    params: dict[str, Any]
    key: str
    cached: bool = False
    seconds: float = 0.0

    @property
    def prompt(self) -> str:
        return self.params["prompt"]

    @property
    def seed(self) -> int:
        return self.params["seed"]

    def metadata(self) -> dict[str, Any]:
        """PNG text: every parameter plus an A1111-style ``parameters`` line that other tools read."""
        p = self.params
        names = " + ".join(Path(f).name for f in str(p.get("lora") or "").split(" + "))  # a set: "a + b"
        lora = f", Lora: {names} x{p['lora_scale']:g} ({p['lora_sha256'][:12]})" if p.get("lora") else ""
        a1111 = (f"{p['prompt']}\nNegative prompt: {p['negative_prompt']}\nSteps: {p['steps']}, "
                 f"Sampler: {p['scheduler']}, CFG scale: {p['guidance']:g}, Seed: {p['seed']}, "
                 f"Size: {p['width']}x{p['height']}, Model: {p['base_model']}{lora}")
        return {**p, "parameters": a1111}


def _scheduler_for(pipe, name: str | None):
    """A scheduler instance for ``name`` built from the pipeline's config, or None to keep the pipeline's."""
    if not name:
        return None
    import diffusers  # seconds to import; only a request for another scheduler needs it here

    cls_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, cls_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ValueError(f"unknown scheduler {name!r}; use one of {sorted(SCHEDULERS)} or a diffusers scheduler class name")
    if type(pipe.scheduler).__name__ == cls_name:
        return None
    return cls.from_config(pipe.scheduler.config)


def _pipeline_identity(pipe) -> dict[str, Any]:
    return {
        "base_model": str(pipe.name_or_path),
        "vae": str(pipe.vae.config.get("_name_or_path", "")),
        "dtype": str(pipe.unet.dtype).removeprefix("torch."),
        "device": pipe._execution_device.type,
        "vae_tiling": bool(getattr(pipe.vae, "use_tiling", False)),
    }


def _scheduler_config(scheduler) -> dict[str, Any]:
    return {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}


# Below this many UNet parameters (test-size models) one CPU thread is several times faster than
# two: the per-op threading overhead dwarfs the work (measured 0.2 s vs 0.8-2 s per 64 px image).
_SMALL_MODEL_PARAMS = 20_000_000


@contextlib.contextmanager
def _cpu_threads_for(pipe) -> Iterator[None]:
    small = sum(p.numel() for p in pipe.unet.parameters()) < _SMALL_MODEL_PARAMS
    if pipe._execution_device.type != "cpu" or not small or torch.get_num_threads() == 1:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# Fields of params that do not change pixels (so they stay out of the cache key).
_NOT_IN_KEY = {"prompt_template", "lora", "requested_size", "software", "generator"}


def generate_images(
    pipe,
    prompts: str | Sequence[str],
    seeds: int | Sequence[int],
    *,
    config: GenerateConfig | None = None,
    lora_info: LoraInfo | LoraSet | None = None,
    cache: ImageCache | None = None,
    progress: bool = True,
) -> list[GeneratedImage]:
    """Generate every prompt × seed, reusing cached images.

    Args:
        pipe: from :func:`lora_helpers.generate.pipeline.load_pipeline`.
        prompts: one prompt or several; ``{subject}`` is replaced by the trigger phrase.
        seeds: one seed or several; each image gets its own generator seeded with its seed.
        config: a :class:`GenerateConfig` (None: defaults).
        lora_info: the LoRA to apply (from :func:`lora_helpers.generate.lora.load_lora`), or several at their
            weights (:func:`lora_helpers.generate.combine.load_loras`); None: the base model alone.
        cache: an :class:`ImageCache`; a hit returns the stored image without running the model.
        progress: show a progress bar when more than one image is generated.

    Returns:
        :class:`GeneratedImage` items, prompt-major: ``[p0s0, p0s1, ..., p1s0, ...]``.

    Raises:
        ValueError: no prompts, no seeds, a blank prompt, a seed outside 0..2**64-1, a bad
            setting, or ``{subject}`` without a trigger phrase.
    """
    config = config or GenerateConfig()
    config.check()  # fields may have been set after construction
    prompts = check_prompts(prompts)
    seeds = check_seeds(seeds)
    size = resolve_size(config.size)
    steps = resolve_steps(config.steps)
    subject = config.subject or (lora_info.trigger if lora_info else None)
    scale = None
    if lora_info is not None:
        scale = check_number(lora_info.scale if config.lora_scale is None else config.lora_scale, "LoRA scale", "1.0")
    texts = [fill_subject(p, subject, getattr(lora_info, "subjects", None)) for p in prompts]
    if lora_info is not None and lora_info.trigger:
        for text in dict.fromkeys(texts):
            if lora_info.trigger.lower() not in text.lower():
                warnings.warn(f"prompt {text!r} does not mention the trigger {lora_info.trigger!r} (write {{subject}}); "
                              "the person may not appear", stacklevel=2)
    scheduler = _scheduler_for(pipe, config.scheduler)
    scheduler_used = scheduler or pipe.scheduler
    identity = _pipeline_identity(pipe)

    items: list[GeneratedImage | None] = []
    todo: list[tuple[int, dict[str, Any]]] = []
    for template, text in zip(prompts, texts):
        for seed in seeds:
            params = {
                "prompt": text, "prompt_template": template, "negative_prompt": config.negative_prompt, "seed": seed,
                "width": size, "height": size, "steps": steps, "guidance": float(config.guidance),
                "scheduler": type(scheduler_used).__name__,
                "lora": str(lora_info.path) if lora_info else None,
                "lora_sha256": lora_info.sha256 if lora_info else None, "lora_scale": scale,
                **identity, "generator": "torch.Generator('cpu').manual_seed(seed)",
                "software": f"lora_helpers {__version__}",
            }
            if config.size is not None and config.size != size:
                params["requested_size"] = config.size
            key = cache_key({**{k: v for k, v in params.items() if k not in _NOT_IN_KEY},
                             "scheduler_config": _scheduler_config(scheduler_used)})
            hit = cache.get(key) if cache is not None else None
            if hit is not None:
                items.append(GeneratedImage(image=hit.convert("RGB") if hit.mode != "RGB" else hit, params=params,
                                            key=key, cached=True))
            else:
                items.append(None)
                todo.append((len(items) - 1, params | {"_key": key}))
    if not todo:
        return items  # type: ignore[return-value]

    batches: list[list[tuple[int, dict]]] = []
    for index, params in todo:  # batches never mix prompts
        if batches and len(batches[-1]) < config.batch_size and batches[-1][0][1]["prompt"] == params["prompt"]:
            batches[-1].append((index, params))
        else:
            batches.append([(index, params)])

    activate_lora(pipe, lora_info, scale)
    old_scheduler = pipe.scheduler
    if scheduler is not None:
        pipe.scheduler = scheduler
    bar = tqdm(total=len(todo), desc="generating", unit="image", disable=not progress or len(todo) < 2)
    try:
        with _cpu_threads_for(pipe):
            for batch in batches:
                first = batch[0][1]
                start = time.perf_counter()
                out = pipe(
                    prompt=[first["prompt"]] * len(batch),
                    negative_prompt=[first["negative_prompt"]] * len(batch) if first["negative_prompt"] else None,
                    height=size, width=size, num_inference_steps=steps, guidance_scale=first["guidance"],
                    generator=[torch.Generator("cpu").manual_seed(p["seed"]) for _, p in batch],
                ).images
                seconds = (time.perf_counter() - start) / len(batch)
                for (index, params), image in zip(batch, out):
                    key = params.pop("_key")
                    if image.getextrema() == ((0, 0), (0, 0), (0, 0)):
                        # NaN pixels become black. In fp16 the usual cause is the VAE; in fp32 it is not,
                        # and blaming it would send people after the wrong thing.
                        cause = (f"the VAE overflowed in {identity['dtype']} (use the fp16-fix VAE: "
                                 "load_pipeline(vae='auto'), or float32)" if identity["dtype"] == "float16" else
                                 "the model computed NaN/inf (check the base model's weights)")
                        warnings.warn(f"seed {params['seed']} gave a black image: {cause}")
                    items[index] = GeneratedImage(image=image, params=params, key=key, seconds=seconds)
                    if cache is not None:
                        cache.put(key, image, params)
                    bar.update(1)
    finally:
        bar.close()
        pipe.scheduler = old_scheduler
    return items  # type: ignore[return-value]


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].rstrip("-") or "image"


def save_images(items: Sequence[GeneratedImage | None], out_dir: str | Path, *, prefix: str = "") -> list[Path]:
    """Save images as ``<prefix><index>_seed<seed>_<prompt>.png`` with their parameters; skips None.

    Args:
        items: from :func:`generate_images` (or a grid's ``items``).
        out_dir: folder to write to.
        prefix: put before every file name.

    Returns:
        The paths written, in order.
    """
    out_dir = Path(out_dir)
    paths = []
    for i, item in enumerate(items):
        if item is not None:
            paths.append(item.save(out_dir / f"{prefix}{i:03d}_seed{item.seed}_{_slug(item.prompt)}.png"))
    return paths
