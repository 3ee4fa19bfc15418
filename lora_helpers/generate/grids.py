"""Labelled grids for looking at a LoRA: does the face come through across prompts, seeds,
LoRA strengths and training steps?

After training, people look at grids: prompt × seed (does the person survive the
prompt?), LoRA scale 0 → 1.2 (how strong before it overcooks?), checkpoint × prompt
(when did training start to overfit?) and base vs LoRA (what did the LoRA change?).
Every cell is made by :func:`lora_helpers.generate.images.generate_images`, so the cache
and the per-seed noise work the same as for single images.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from lora_helpers import __version__
from lora_helpers.core.grids import GridLayout, grid_layout, make_grid
from lora_helpers.core.lora_files import LoraFileError, LoraNotFoundError, weights_digest
from lora_helpers.core.run_folder import LORA_WEIGHT_NAME, find_checkpoints, read_run_config
from lora_helpers.core.subjects import expand_subject
from lora_helpers.generate.cache import ImageCache
from lora_helpers.generate.combine import LoraSet
from lora_helpers.generate.images import GenerateConfig, GeneratedImage, PngResult, fill_subject, generate_images
from lora_helpers.generate.lora import LoraInfo, load_lora, run_subjects, unload_lora

__all__ = [
    "DEFAULT_SCALES", "GRID_KINDS", "GridResult",
    "prompt_seed_grid", "scale_sweep", "checkpoint_progress", "base_vs_lora",
]

DEFAULT_SCALES = (0.0, 0.25, 0.5, 0.75, 1.0, 1.2)
GRID_KINDS = ("prompt-seed", "scale", "checkpoints", "base-vs-lora")


@dataclass
class GridResult(PngResult):
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
        """Where each cell and label sits in :attr:`image`.

        Returns:
            The :class:`lora_helpers.core.grids.GridLayout` of this grid.
        """
        size = next(it.image.size for it in self.items if it is not None)
        return grid_layout(self.rows, self.cols, size, row_labels=self.row_labels, col_labels=self.col_labels,
                           title=self.title)

    def cell(self, row: int, col: int) -> Image.Image:
        """The picture in cell ``(row, col)``, cut out of the grid.

        Args:
            row: row index from 0.
            col: column index from 0.

        Returns:
            The cell's picture.
        """
        return self.image.crop(self.layout().cell_box(row, col))

    def metadata(self) -> dict[str, Any]:
        """PNG text: kind, labels, notes and every cell's parameters."""
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


def _per_person(prompts: str | Sequence[str], trigger: str | None, subjects: dict[str, str] | None) -> list[str]:
    """Prompts with ``{subject}`` once per person when several people and no one phrase are known (grids per person)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    return prompts if trigger or not subjects else expand_subject(prompts, list(subjects))


def _people_of(lora_info: LoraInfo | LoraSet | None, config: GenerateConfig) -> tuple[str | None, dict[str, str]]:
    """(phrase for {subject}, name -> trigger of each person) for a grid's prompts."""
    if lora_info is None:
        return config.subject, {}
    return config.subject or lora_info.trigger, dict(lora_info.subjects)


def prompt_seed_grid(pipe, prompts: str | Sequence[str], seeds: int | Sequence[int], *,
                     config: GenerateConfig | None = None, lora_info: LoraInfo | LoraSet | None = None,
                     cache: ImageCache | None = None) -> GridResult:
    """Grid with one row per prompt and one column per seed: does the person survive every prompt?

    Args:
        pipe: from :func:`lora_helpers.generate.pipeline.load_pipeline`.
        prompts: one prompt or several; ``{subject}`` becomes the trigger phrase (several people: one
            row per person), ``{<name>}`` that person's.
        seeds: one seed or several.
        config: generation settings (None: defaults).
        lora_info: the LoRA (or :class:`LoraSet`) to apply; None: the base model.
        cache: an :class:`ImageCache` to reuse images from.

    Returns:
        A :class:`GridResult` of kind ``"prompt-seed"``.
    """
    config = config or GenerateConfig()
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    prompts = _per_person(prompts, *_people_of(lora_info, config))
    items = generate_images(pipe, prompts, seeds, config=config, lora_info=lora_info, cache=cache)
    texts = list(dict.fromkeys(it.prompt for it in items))
    who = f"{lora_info.name} at scale {items[0].params['lora_scale']:g}" if lora_info else "base model"
    return _grid("prompt-seed", items, texts, [f"seed {s}" for s in seeds], f"{who} · {_settings(items)}")


def scale_sweep(pipe, lora_info: LoraInfo | LoraSet, prompts: str | Sequence[str], seeds: int | Sequence[int], *,
                scales: Sequence[float] = DEFAULT_SCALES, config: GenerateConfig | None = None,
                cache: ImageCache | None = None) -> GridResult:
    """Grid of LoRA strengths (columns) for each prompt × seed (rows): 0 is the base model.

    Look for the lowest scale where the face is clearly the person, and the scale where
    pictures start to look overcooked (stiff pose, burnt colours, prompt ignored).

    Args:
        pipe: the pipeline ``lora_info`` is loaded in.
        lora_info: from :func:`lora_helpers.generate.lora.load_lora`.
        prompts: one prompt or several.
        seeds: one seed or several.
        scales: LoRA strengths, one column each.
        config: generation settings (its ``lora_scale`` is replaced per column).
        cache: an :class:`ImageCache` to reuse images from.

    Returns:
        A :class:`GridResult` of kind ``"scale"``.

    Raises:
        ValueError: without a LoRA or without scales.
    """
    if lora_info is None:
        raise ValueError("scale_sweep needs a LoRA (lora_info from load_lora)")
    config = config or GenerateConfig()
    prompts = _per_person(prompts, *_people_of(lora_info, config))
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
        pipe: from :func:`lora_helpers.generate.pipeline.load_pipeline`.
        run_dir: a run folder with ``checkpoints/checkpoint-<step>/pytorch_lora_weights.safetensors``.
        prompts: one prompt or several; ``{subject}`` becomes the run's trigger phrase.
        seeds: one seed or several.
        config: generation settings (None: defaults).
        cache: an :class:`ImageCache` to reuse images from.
        scale: LoRA strength for every checkpoint.
        max_checkpoints: with more, evenly spaced ones are shown (first and last included).
        include_final: add the run's final LoRA as the last column.

    Returns:
        A :class:`GridResult` of kind ``"checkpoints"``; ``notes`` name the columns that could not be loaded.

    Raises:
        LoraNotFoundError: the run has no checkpoints and no final LoRA.
        LoraFileError: no checkpoint could be loaded.
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
    run_config = read_run_config(run_dir)
    subjects = run_subjects(run_config)  # a run of several people: {subject} rows once per person
    trigger = config.subject or (None if subjects else run_config.get("trigger"))
    prompts = _per_person(prompts, trigger, subjects)
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
    texts = [fill_subject(p, trigger, subjects) for p in prompts]
    rows, prompt_title = _row_labels(texts, seeds)
    title = f"training progress · {run_dir.name} · {prompt_title} · scale {scale:g} · {_settings(items)}".replace(" ·  · ", " · ")
    return _grid("checkpoints", items, rows, labels, title, notes)


def base_vs_lora(pipe, lora_info: LoraInfo | LoraSet, prompts: str | Sequence[str], seeds: int | Sequence[int], *,
                 config: GenerateConfig | None = None, cache: ImageCache | None = None) -> GridResult:
    """Two columns, base model and base + LoRA, for each prompt × seed (same seed, same noise).

    Args:
        pipe: the pipeline ``lora_info`` is loaded in.
        lora_info: from :func:`lora_helpers.generate.lora.load_lora`.
        prompts: one prompt or several.
        seeds: one seed or several.
        config: generation settings (None: defaults).
        cache: an :class:`ImageCache` to reuse images from.

    Returns:
        A :class:`GridResult` of kind ``"base-vs-lora"``.

    Raises:
        ValueError: without a LoRA.
    """
    if lora_info is None:
        raise ValueError("base_vs_lora needs a LoRA (lora_info from load_lora)")
    config = config or GenerateConfig()
    seeds = [seeds] if isinstance(seeds, int) else list(seeds)
    trigger, subjects = _people_of(lora_info, config)
    prompts = _per_person(prompts, trigger, subjects)
    # the base model gets the very words the LoRA gets, the people's phrases filled in
    base = generate_images(pipe, [fill_subject(p, trigger, subjects) for p in prompts], seeds,
                           config=replace(config, subject=None), cache=cache)
    with_lora = generate_images(pipe, prompts, seeds, config=config, lora_info=lora_info, cache=cache)
    items = [it for pair in zip(base, with_lora) for it in pair]
    rows, prompt_title = _row_labels([it.prompt for it in base[:: len(seeds)]], seeds)
    scale = with_lora[0].params["lora_scale"]
    title = f"base vs LoRA · {prompt_title} · {_settings(items)}".replace(" ·  · ", " · ")
    return _grid("base-vs-lora", items, rows, ["base model", f"LoRA, scale {scale:g}"], title)
