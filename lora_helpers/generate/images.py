"""Generate and inspect: does the face come through across prompts, seeds and LoRA strengths?

After training, people look at grids: prompt × seed (does the person survive the
prompt?), LoRA scale 0 → 1.2 (how strong before it overcooks?), checkpoint × prompt
(when did training start to overfit?) and base vs LoRA (what did the LoRA change?).

Reproducibility: each image has its own ``torch.Generator`` on the CPU seeded with its
seed, so an image depends on its seed alone — not on its position in a batch, on the
other seeds asked for, or on the GPU model (CPU noise is the same everywhere).
``{subject}`` in a prompt becomes the run's trigger phrase ("TOK person").

Loading, LoRA checks, scale and fusing live in :mod:`lora_helpers.generate.pipeline` and are
re-exported here.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import sys
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Sequence

from PIL import Image

from lora_helpers import __version__
from lora_helpers.core.config import default_resolution, smoke_mode
from lora_helpers.core.grids import GridLayout, grid_layout, make_grid, save_png_with_metadata
from lora_helpers.generate.cache import ImageCache, cache_key
from lora_helpers.core.lora_files import LoraFileError, LoraNotFoundError, weights_digest
from lora_helpers.core.run_folder import LORA_WEIGHT_NAME, find_checkpoints, read_run_config
from lora_helpers.generate.pipeline import (
    MEMORY_SAVING_MODES, LoraInfo, activate_lora, choose_base_model, find_lora_file, fuse_lora, load_lora,
    load_pipeline, unload_lora,
)

__all__ = [
    "DEFAULT_SCALES", "GRID_KINDS", "SCHEDULERS", "GenerateConfig", "GeneratedImage", "GridResult",
    "resolve_size", "resolve_steps", "fill_subject", "generate_images", "save_images",
    "prompt_seed_grid", "scale_sweep", "checkpoint_progress", "base_vs_lora",
    "add_cli_arguments", "run_cli",
]

DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.2)
GRID_KINDS = ("prompt-seed", "scale", "checkpoints", "base-vs-lora")
# Short names people type; any diffusers scheduler class name works too.
SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@dataclass
class GenerateConfig:
    """Generation settings (one per request; change with ``dataclasses.replace``).

    Attributes:
        negative_prompt: what to steer away from ("" = none: SDXL then uses zero embeddings).
        size: square side in px, e.g. 512 or 1024; None: 1024 (64 in smoke mode, where
            every size maps to the tiny model's 64 px).
        steps: denoising steps; None: 30 (2 in smoke mode).
        guidance: classifier-free guidance scale.
        lora_scale: LoRA strength; None: the LoRA's own (``LoraInfo.scale``).
        scheduler: None keeps the pipeline's; or a name from :data:`SCHEDULERS` / a diffusers class name.
        subject: replaces ``{subject}``; None: the LoRA run's trigger phrase.
        batch_size: images per pipeline call. 1 keeps every image bit-identical to a
            re-run of its seed alone; larger batches are faster on big GPUs but may change
            the last bits of some pixels (different kernels).
    """

    negative_prompt: str = ""
    size: int | None = None
    steps: int | None = None
    guidance: float = 5.0
    lora_scale: float | None = None
    scheduler: str | None = None
    subject: str | None = None
    batch_size: int = 1


def resolve_size(size: int | None = None, *, smoke: bool | None = None) -> int:
    """Pixel size to generate at: ``size``, or the default; in smoke mode always the tiny model's size."""
    smoke = smoke_mode() if smoke is None else smoke
    # A bad size is reported in smoke mode too, so a notebook fails in CI as it would in Colab.
    if size is not None and (int(size) < 64 or int(size) % 8):
        raise ValueError(f"size must be a multiple of 8 and at least 64 (SDXL: 512 or 1024), got {size}")
    if size is None or smoke:
        return default_resolution(smoke)
    return int(size)


def resolve_steps(steps: int | None = None, *, smoke: bool | None = None) -> int:
    """Denoising steps: ``steps``, or 30 (2 in smoke mode)."""
    if steps is None:
        return 2 if (smoke_mode() if smoke is None else smoke) else 30
    if int(steps) < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return int(steps)


def fill_subject(prompt: str, subject: str | None) -> str:
    """Replace ``{subject}`` with the trigger phrase.

    Raises:
        ValueError: when the prompt uses ``{subject}`` and no phrase is known.
    """
    if "{subject}" not in prompt:
        return prompt
    if not subject:
        raise ValueError(f"prompt {prompt!r} uses {{subject}} but no trigger phrase is known: load the LoRA from its "
                         "run folder (config.json has 'trigger'), pass trigger= to load_lora, or set GenerateConfig.subject")
    return prompt.replace("{subject}", subject)


class _PngResult:
    """Shared by results that hold ``image`` and ``metadata()``: PNG saving and notebook display."""

    def save(self, path: str | Path) -> Path:
        """Write a PNG with the parameters as text metadata (atomic)."""
        return save_png_with_metadata(path, self.image, self.metadata())

    def _repr_png_(self) -> bytes:
        buffer = io.BytesIO()
        self.image.save(buffer, format="PNG")
        return buffer.getvalue()


@dataclass
class GeneratedImage(_PngResult):
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
        lora = f", Lora: {Path(p['lora']).name} x{p['lora_scale']:g} ({p['lora_sha256'][:12]})" if p.get("lora") else ""
        a1111 = (f"{p['prompt']}\nNegative prompt: {p['negative_prompt']}\nSteps: {p['steps']}, "
                 f"Sampler: {p['scheduler']}, CFG scale: {p['guidance']:g}, Seed: {p['seed']}, "
                 f"Size: {p['width']}x{p['height']}, Model: {p['base_model']}{lora}")
        return {**p, "parameters": a1111}



def _scheduler_for(pipe, name: str | None):
    """A scheduler instance for ``name`` built from the pipeline's config, or None to keep the pipeline's."""
    if not name:
        return None
    import diffusers

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
    import torch

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
    lora_info: LoraInfo | None = None,
    cache: ImageCache | None = None,
    progress: bool = True,
) -> list[GeneratedImage]:
    """Generate every prompt × seed, reusing cached images.

    Args:
        pipe: from :func:`load_pipeline`.
        prompts: one prompt or several; ``{subject}`` is replaced by the trigger phrase.
        seeds: one seed or several; each image gets its own generator seeded with its seed.
        config: a :class:`GenerateConfig` (None: defaults).
        lora_info: the LoRA to apply (from :func:`load_lora`); None: the base model alone.
        cache: an :class:`ImageCache`; a hit returns the stored image without running the model.
        progress: show a progress bar when more than one image is generated.

    Returns:
        :class:`GeneratedImage` items, prompt-major: ``[p0s0, p0s1, ..., p1s0, ...]``.

    Raises:
        ValueError: no prompts, no seeds, a blank prompt, or ``{subject}`` without a trigger phrase.
    """
    import torch
    from tqdm.auto import tqdm

    config = config or GenerateConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] if isinstance(seeds, int) else [int(s) for s in seeds]
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt, e.g. 'a photo of {subject}'")
    if not seeds:
        raise ValueError("no seeds given: pass at least one seed, e.g. [0, 1, 2]")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt #{i + 1} is empty; write a prompt such as 'a photo of {{subject}} in a park'")
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {config.batch_size}")
    size = resolve_size(config.size)
    steps = resolve_steps(config.steps)
    subject = config.subject or (lora_info.trigger if lora_info else None)
    scale = None
    if lora_info is not None:
        scale = float(lora_info.scale if config.lora_scale is None else config.lora_scale)
    texts = [fill_subject(p, subject) for p in prompts]
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
                        warnings.warn(f"seed {params['seed']} gave a black image: the VAE overflowed in "
                                      f"{identity['dtype']} (use the fp16-fix VAE: load_pipeline(vae='auto')) or float32")
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
    """Save images as ``<prefix><index>_seed<seed>_<prompt>.png`` with their parameters; skips None."""
    out_dir = Path(out_dir)
    paths = []
    for i, item in enumerate(items):
        if item is not None:
            paths.append(item.save(out_dir / f"{prefix}{i:03d}_seed{item.seed}_{_slug(item.prompt)}.png"))
    return paths


# --------------------------------------------------------------------------- grids


@dataclass
class GridResult(_PngResult):
    """A labelled grid and the images in it (row-major; None for a cell that failed).

    Shows inline as the last expression of a notebook cell; ``save(path)`` writes a PNG
    whose text metadata lists every cell's parameters.
    """

    image: Image.Image
    items: list[GeneratedImage | None]
    kind: str
    rows: int
    cols: int
    row_labels: list[str]
    col_labels: list[str]
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def layout(self) -> GridLayout:
        """Where each cell and label sits in :attr:`image`."""
        size = next(it.image.size for it in self.items if it is not None)
        return grid_layout(self.rows, self.cols, size, row_labels=self.row_labels, col_labels=self.col_labels,
                           title=self.title)

    def cell(self, row: int, col: int) -> Image.Image:
        """The picture in cell ``(row, col)``, cut out of the grid."""
        return self.image.crop(self.layout().cell_box(row, col))

    def metadata(self) -> dict[str, Any]:
        return {"grid": self.kind, "rows": self.rows, "cols": self.cols, "title": self.title,
                "row_labels": self.row_labels, "col_labels": self.col_labels, "notes": self.notes,
                "images": [it.params if it is not None else None for it in self.items],
                "software": f"lora_helpers {__version__}"}



def _grid(kind: str, items: list[GeneratedImage | None], row_labels: list[str], col_labels: list[str],
          title: str, notes: list[str] | None = None) -> GridResult:
    image = make_grid([it.image if it is not None else None for it in items], rows=len(row_labels),
                      cols=len(col_labels), row_labels=row_labels, col_labels=col_labels, title=title)
    return GridResult(image=image, items=items, kind=kind, rows=len(row_labels), cols=len(col_labels),
                      row_labels=row_labels, col_labels=col_labels, title=title, notes=notes or [])


def _settings(items: Sequence[GeneratedImage | None]) -> str:
    p = next(it.params for it in items if it is not None)
    return f"{p['width']} px · {p['steps']} steps · CFG {p['guidance']:g} · {p['scheduler'].removesuffix('Scheduler')}"


def _row_labels(texts: Sequence[str], seeds: Sequence[int]) -> tuple[list[str], str]:
    """Labels for rows of (prompt, seed) pairs; what is the same in every row goes into the title."""
    if len(set(texts)) == 1:
        return [f"seed {s}" for _ in texts for s in seeds], f"“{texts[0]}”"
    if len(seeds) == 1:
        return list(texts), f"seed {seeds[0]}"
    return [f"{t}\nseed {s}" for t in texts for s in seeds], ""


def prompt_seed_grid(pipe, prompts: str | Sequence[str], seeds: int | Sequence[int], *,
                     config: GenerateConfig | None = None, lora_info: LoraInfo | None = None,
                     cache: ImageCache | None = None) -> GridResult:
    """Grid with one row per prompt and one column per seed: does the person survive every prompt?"""
    config = config or GenerateConfig()
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    items = generate_images(pipe, prompts, seeds, config=config, lora_info=lora_info, cache=cache)
    texts = list(dict.fromkeys(it.prompt for it in items))
    who = f"{lora_info.name} at scale {items[0].params['lora_scale']:g}" if lora_info else "base model"
    return _grid("prompt-seed", items, texts, [f"seed {s}" for s in seeds], f"{who} · {_settings(items)}")


def scale_sweep(pipe, lora_info: LoraInfo, prompts: str | Sequence[str], seeds: int | Sequence[int], *,
                scales: Sequence[float] = DEFAULT_SCALES, config: GenerateConfig | None = None,
                cache: ImageCache | None = None) -> GridResult:
    """Grid of LoRA strengths (columns) for each prompt × seed (rows): 0 is the base model.

    Look for the lowest scale where the face is clearly the person, and the scale where
    pictures start to look overcooked (stiff pose, burnt colours, prompt ignored).
    """
    if lora_info is None:
        raise ValueError("scale_sweep needs a LoRA (lora_info from load_lora)")
    config = config or GenerateConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    if not scales:
        raise ValueError("no scales given, e.g. scales=(0, 0.5, 1.0)")
    columns = [generate_images(pipe, prompts, seeds, config=replace(config, lora_scale=float(s)), lora_info=lora_info,
                               cache=cache) for s in scales]
    n = len(columns[0])
    items = [columns[c][r] for r in range(n) for c in range(len(scales))]
    rows, prompt_title = _row_labels([it.prompt for it in columns[0][:: len(seeds)]], seeds)
    title = f"LoRA scale sweep · {lora_info.name} · {prompt_title} · {_settings(items)}".replace(" ·  · ", " · ")
    return _grid("scale", items, rows, [f"scale {s:g}" for s in scales], title)


def _pick_evenly(seq: list, k: int) -> list:
    if len(seq) <= k:
        return seq
    idx = sorted({round(i * (len(seq) - 1) / (k - 1)) for i in range(k)})
    return [seq[i] for i in idx]


def checkpoint_progress(pipe, run_dir: str | Path, prompts: str | Sequence[str], *, seeds: int | Sequence[int] = (0,),
                        config: GenerateConfig | None = None, cache: ImageCache | None = None,
                        scale: float = 1.0, max_checkpoints: int = 8, include_final: bool = True) -> GridResult:
    """Grid of training checkpoints (columns) for each prompt × seed (rows): training progress.

    Each checkpoint is loaded as its own adapter, used, and removed again, so the
    pipeline's own LoRA (if any) is left as it was. A checkpoint that cannot be loaded
    becomes a grey column with a note; the others still appear.

    Args:
        run_dir: a run folder with ``checkpoints/checkpoint-<step>/pytorch_lora_weights.safetensors``.
        max_checkpoints: with more, evenly spaced ones are shown (first and last included).
        include_final: add the run's final LoRA as the last column.
    """
    run_dir = Path(run_dir)
    config = config or GenerateConfig()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    columns: list[tuple[str, Path]] = [(f"step {step}", path) for step, path in
                                       _pick_evenly(find_checkpoints(run_dir), max(2, max_checkpoints))]
    if include_final and (run_dir / LORA_WEIGHT_NAME).is_file():
        def digest(path: Path) -> str | None:
            try:
                return weights_digest(path)
            except Exception:  # a damaged file gets its grey column below, with the reason
                return None

        final = digest(run_dir / LORA_WEIGHT_NAME)
        # the checkpoint at the last step holds the final weights: one column, named for both
        columns = [(f"{label} (final)", path) if final and digest(path) == final else (label, path)
                   for label, path in columns]
        if not any(label.endswith("(final)") for label, _ in columns):
            columns.append(("final", run_dir / LORA_WEIGHT_NAME))
    if not columns:
        raise LoraNotFoundError(run_dir, "no checkpoints/checkpoint-<step>/ folders with LoRA weights and no final LoRA; "
                                         "train with checkpointing on, or pass the run folder")
    trigger = config.subject or read_run_config(run_dir).get("trigger")
    n = len(prompts) * len(seeds)
    per_column: list[list[GeneratedImage | None]] = []
    notes: list[str] = []
    labels = []
    for i, (label, path) in enumerate(columns):
        try:
            info = load_lora(pipe, path, adapter_name=f"progress_{i}", scale=scale, trigger=trigger)
        except LoraFileError as exc:
            notes.append(f"{label}: {exc}")
            warnings.warn(f"skipping {label}: {exc}")
            per_column.append([None] * n)
            labels.append(f"{label} (unreadable)")
            continue
        try:
            per_column.append(generate_images(pipe, prompts, seeds, config=config, lora_info=info, cache=cache))
        finally:
            unload_lora(pipe, info)
        labels.append(label)
    if all(it is None for col in per_column for it in col):
        raise LoraFileError(run_dir, "no checkpoint of this run could be loaded: " + "; ".join(notes))
    items = [per_column[c][r] for r in range(n) for c in range(len(columns))]
    texts = [fill_subject(p, trigger) for p in prompts]
    rows, prompt_title = _row_labels(texts, seeds)
    title = f"training progress · {run_dir.name} · {prompt_title} · scale {scale:g} · {_settings(items)}".replace(" ·  · ", " · ")
    return _grid("checkpoints", items, rows, labels, title, notes)


def base_vs_lora(pipe, lora_info: LoraInfo, prompts: str | Sequence[str], seeds: int | Sequence[int], *,
                 config: GenerateConfig | None = None, cache: ImageCache | None = None) -> GridResult:
    """Two columns, base model and base + LoRA, for each prompt × seed (same seed, same noise)."""
    if lora_info is None:
        raise ValueError("base_vs_lora needs a LoRA (lora_info from load_lora)")
    config = config or GenerateConfig()
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    base_cfg = replace(config, subject=config.subject or lora_info.trigger)
    base = generate_images(pipe, prompts, seeds, config=base_cfg, cache=cache)
    with_lora = generate_images(pipe, prompts, seeds, config=config, lora_info=lora_info, cache=cache)
    items = [it for pair in zip(base, with_lora) for it in pair]
    rows, prompt_title = _row_labels([it.prompt for it in base[:: len(seeds)]], seeds)
    scale = with_lora[0].params["lora_scale"]
    title = f"base vs LoRA · {prompt_title} · {_settings(items)}".replace(" ·  · ", " · ")
    return _grid("base-vs-lora", items, rows, ["base model", f"LoRA, scale {scale:g}"], title)


# --------------------------------------------------------------------------- command line


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m lora_helpers generate``."""
    parser.add_argument("source", help="run folder, or a LoRA .safetensors file (diffusers or kohya/A1111 layout)")
    parser.add_argument("--prompt", "-p", dest="prompts", action="append", required=True,
                        help="prompt; repeat for several. {subject} becomes the run's trigger phrase")
    parser.add_argument("--negative-prompt", default="", help="what to avoid (default: none)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default: 0)")
    parser.add_argument("--size", type=int, default=None, help="square size in px: 512 or 1024 (default 1024; 64 in smoke mode)")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default 30; 2 in smoke mode)")
    parser.add_argument("--guidance", type=float, default=GenerateConfig.guidance, help="guidance scale (default %(default)s)")
    parser.add_argument("--scale", type=float, default=1.0, help="LoRA strength (default 1.0)")
    parser.add_argument("--scales", type=float, nargs="+", default=list(DEFAULT_SCALES), help="strengths for --grid scale")
    parser.add_argument("--grid", choices=GRID_KINDS, default=None, help="also write a grid of this kind")
    parser.add_argument("--out", type=Path, default=Path("outputs/generate"), help="output folder (default %(default)s)")
    parser.add_argument("--base-model", default=None, help="SDXL hub id or folder (default: the run's, else SDXL base 1.0)")
    parser.add_argument("--vae", default="auto", help="VAE hub id or folder; 'auto' = fp16-fix VAE on GPU; 'none' = the base model's")
    parser.add_argument("--scheduler", default=None, help=f"one of {', '.join(SCHEDULERS)} or a diffusers class name")
    parser.add_argument("--trigger", default=None, help="phrase for {subject} (default: the run's config.json)")
    parser.add_argument("--fuse", action="store_true", help="fuse the LoRA into the weights (faster at one scale)")
    parser.add_argument("--memory-saving", choices=MEMORY_SAVING_MODES, default="auto", help="default %(default)s")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when present)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="image cache folder (default: OUT/cache)")
    parser.add_argument("--no-cache", action="store_true", help="always run the model")


def run_cli(args: argparse.Namespace) -> int:
    """Generate the requested images (and grid), print where they went; 2 on bad input."""
    try:
        base = choose_base_model(args.source, args.base_model)
        if args.grid == "checkpoints" and not Path(args.source).is_dir():
            raise ValueError("--grid checkpoints needs a run folder as SOURCE")
        find_lora_file(args.source)  # fail on a bad path before the slow model load
        pipe = load_pipeline(base, vae=None if str(args.vae).lower() == "none" else args.vae, device=args.device,
                             memory_saving=args.memory_saving)
        info = load_lora(pipe, args.source, scale=args.scale, trigger=args.trigger)
        if args.fuse:
            fuse_lora(pipe, info)
        cache = None if args.no_cache else ImageCache(args.cache_dir or args.out / "cache")
        config = GenerateConfig(negative_prompt=args.negative_prompt, size=args.size, steps=args.steps,
                                guidance=args.guidance, scheduler=args.scheduler)
        print(info)
        items = generate_images(pipe, args.prompts, args.seeds, config=config, lora_info=info, cache=cache)
        for path in save_images(items, args.out / "images"):
            print(path)
        if args.grid:
            if args.grid == "prompt-seed":
                grid = prompt_seed_grid(pipe, args.prompts, args.seeds, config=config, lora_info=info, cache=cache)
            elif args.grid == "scale":
                grid = scale_sweep(pipe, info, args.prompts, args.seeds, scales=args.scales, config=config, cache=cache)
            elif args.grid == "checkpoints":
                grid = checkpoint_progress(pipe, args.source, args.prompts, seeds=args.seeds, config=config,
                                           cache=cache, scale=args.scale)
            else:
                grid = base_vs_lora(pipe, info, args.prompts, args.seeds, config=config, cache=cache)
            print(grid.save(args.out / f"grid_{args.grid}.png"))
        hits = sum(it.cached for it in items)
        print(f"{len(items)} images in {args.out / 'images'} ({hits} from the cache)"
              + (f", grid in {args.out / f'grid_{args.grid}.png'}" if args.grid else ""))
        return 0
    except (LoraFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
