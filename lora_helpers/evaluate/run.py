"""Evaluating a training run: generate the standard prompts for each checkpoint and LoRA
scale, score the images, and write the outputs.

Two bounds make the numbers readable: leave-one-out similarity among the reference
photos (the best a perfect likeness can score) and the base model without the LoRA on
the same prompts and seeds (scale 0: what no likeness scores). Images are generated
with the generate stage and kept on disk with their settings in PNG text, so an
interrupted evaluation resumes where it stopped.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import replace
from pathlib import Path
from typing import Sequence

from tqdm.auto import tqdm

from lora_helpers.core.grids import save_png_with_metadata
from lora_helpers.core.lora_files import weights_digest
from lora_helpers.core.run_folder import (
    CONFIG_FILE, DEFAULT_CLASS_NOUN, DEFAULT_TRIGGER, LORA_WEIGHT_NAME, find_checkpoints, read_run_config,
)
from lora_helpers.core.runtime import free_memory
from lora_helpers.evaluate.config import EvaluateConfig
from lora_helpers.evaluate.identity import ReferenceSet, reference_embeddings, without_trained_photos
from lora_helpers.evaluate.prompts import EvalPrompt, people_prompts
from lora_helpers.evaluate.report import EvaluationResult, write_evaluation
from lora_helpers.evaluate.scoring import png_text, score_rows
from lora_helpers.generate import (
    GenerateConfig, choose_base_model, generate_images, load_lora, load_pipeline, lora_digest, resolve_size,
    resolve_steps,
)

__all__ = ["evaluate_run"]


def _evenly(items: list, k: int) -> list:
    """``k`` evenly spaced items, the last always included."""
    n = len(items)
    picks = sorted({round(n - 1 - i * (n - 1) / max(k - 1, 1)) for i in range(k)}) if k > 1 else [n - 1]
    return [items[i] for i in picks]


def _run_checkpoints(run_dir: Path, which: str | Sequence[str | int], max_count: int | None = None,
                     ) -> list[tuple[str, int | None, Path]]:
    """(name, step, weights file) of the run's checkpoints, in step order, final last."""
    found = [(f"checkpoint-{step}", step, path) for step, path in find_checkpoints(run_dir)]
    final = run_dir / LORA_WEIGHT_NAME
    if final.is_file():
        # The trainer also keeps a checkpoint at the last step: score those weights once.
        # Compare tensors, not file bytes: two saves of one LoRA may order their header differently.
        def digest(path: Path) -> str | None:
            try:
                return weights_digest(path)
            except Exception:  # damaged: reported when it is loaded
                return None

        final_digest = digest(final)
        same = [c for c in found if final_digest and digest(c[2]) == final_digest]
        step = same[-1][1] if same else None
        found = [c for c in found if c not in same] + [("final", step, final)]
    if not found:
        raise FileNotFoundError(f"no LoRA weights in {run_dir} (expected {LORA_WEIGHT_NAME} or checkpoints/checkpoint-<step>/); "
                                "train first (notebook 03 or `python -m lora_helpers train`)")
    if which == "all":
        return found if not max_count or len(found) <= max_count else _evenly(found, max_count)
    if which == "final":
        return found[-1:]
    wanted = {str(w) for w in ([which] if isinstance(which, (str, int)) else which)}
    chosen = [c for c in found if c[0] in wanted or str(c[1]) in wanted]
    if not chosen:
        raise ValueError(f"checkpoints {sorted(wanted)} not found in {run_dir}; have {[c[0] for c in found]}")
    return chosen


def _subject_from_config(cfg: dict) -> tuple[str, str]:
    """(identifier removed before CLIP-T, subject phrase for ``{subject}``) from run/config.json."""
    subject = str(cfg.get("trigger") or DEFAULT_TRIGGER).strip()
    if len(subject.split()) == 1 and not subject.startswith("@"):
        subject = f"{subject} {cfg.get('class_noun') or DEFAULT_CLASS_NOUN}"  # a bare token needs its class word
    return subject.split()[0], subject


def _trained_sha256(cfg: dict) -> set[str]:
    """SHA-256 of the images the run trained on, as training records them in config.json (empty: not recorded)."""
    dataset = cfg.get("dataset")
    images = dataset.get("images") if isinstance(dataset, dict) else None
    return {row["sha256"] for row in images or [] if isinstance(row, dict) and isinstance(row.get("sha256"), str)}


def _image_name(p: EvalPrompt, seed: int) -> str:
    return f"{p.prompt_id}-seed{seed}.png"


def _is_current(path: Path, want: dict) -> bool:
    """True when ``path`` exists and was generated with these settings and weights (resume check)."""
    if not path.is_file():
        return False
    meta = png_text(path)
    return all(_same(meta.get(k), v) for k, v in want.items())


def _same(stored: str | None, value) -> bool:
    if value is None:
        return stored in (None, "", "null", "None")
    if isinstance(value, (int, float)):
        try:
            return stored is not None and math.isclose(float(stored), float(value))
        except ValueError:
            return False
    return stored == str(value)


def _generate_missing(run_dir: Path, subject: str, jobs: list[tuple[str, int | None, Path | None, float]],
                      prompts: list[EvalPrompt], config: EvaluateConfig, image_dir: Path, progress: bool) -> None:
    """Generate every (checkpoint, scale, prompt, seed) image not yet on disk, with the generate stage."""
    defaults = GenerateConfig()
    gcfg = GenerateConfig(size=config.resolution, steps=config.num_inference_steps, subject=subject,
                          guidance=defaults.guidance if config.guidance_scale is None else config.guidance_scale)
    settings = {"steps": resolve_steps(gcfg.steps), "width": resolve_size(gcfg.size), "guidance": gcfg.guidance}
    todo = []
    for name, step, weights, scale in jobs:
        folder = image_dir / name / f"scale-{scale:g}"
        want = {**settings, "lora_sha256": lora_digest(weights) if weights is not None else None}
        missing = [(p, s) for p in prompts for s in config.seeds
                   if not _is_current(folder / _image_name(p, s), {**want, "prompt": p.text})]
        if missing:
            todo.append((name, step, weights, scale, folder, missing))
    total = sum(len(t[-1]) for t in todo)
    if not total:
        return
    pipe = load_pipeline(choose_base_model(run_dir))
    bar = tqdm(total=total, desc="generating", unit="image", disable=not progress)
    try:
        info, loaded = None, None
        for name, step, weights, scale, folder, missing in todo:
            if weights is not None and loaded != weights:
                info = load_lora(pipe, weights, trigger=subject)  # replaces the previous checkpoint
                loaded = weights
            by_prompt: dict[EvalPrompt, list[int]] = {}
            for p, s in missing:
                by_prompt.setdefault(p, []).append(s)
            for p, seeds in by_prompt.items():
                items = generate_images(pipe, [p.text], seeds, config=replace(gcfg, lora_scale=scale),
                                        lora_info=info if weights is not None else None, progress=False)
                for item in items:
                    meta = {**item.metadata(), "checkpoint": name, "step": step, "scale": scale,
                            "category": p.category, "prompt_id": p.prompt_id}
                    save_png_with_metadata(folder / _image_name(p, item.seed), item.image, meta)
                    bar.update(1)
    finally:
        bar.close()
        del pipe
        free_memory()


def evaluate_run(
    run_dir: str | Path,
    *,
    references: ReferenceSet | str | Path | Sequence,
    scales: Sequence[float] | None = None,
    checkpoints: str | Sequence[str | int] | None = None,
    seeds: Sequence[int] | None = None,
    prompts: Sequence[str] | None = None,
    config: EvaluateConfig | None = None,
    out_dir: str | Path | None = None,
    identifier: str | None = None,
    progress: bool = True,
) -> EvaluationResult:
    """Generate the standard prompts × seeds for each checkpoint and LoRA scale, then score.

    Scale 0 is the base model without the LoRA, generated once: the lower bound. Images
    already in ``out_dir/images`` are reused, so an interrupted evaluation resumes. The
    generator is freed before CLIP is loaded (one big model in memory at a time).
    Cost: prompts × seeds × (checkpoints × scales above 0, + 1) images.

    Args:
        run_dir: a training run (``config.json``, LoRA weights, ``checkpoints/``).
        references: the person's photos: dataset/ (its photos held out of training are scored
            against separately), a folder, or a ReferenceSet.
        scales, checkpoints, seeds: override the config's.
        prompts: your own templates (``{subject}`` is filled in); None: the standard set.
        config: an :class:`EvaluateConfig`.
        out_dir: where to write (default ``run_dir/evaluation``).
        identifier: word removed before CLIP-T (default: the first word of the run's trigger).
        progress: show progress bars.

    Returns:
        An :class:`EvaluationResult`; ``scores.csv``, ``summary.csv``,
        ``identity_vs_prompt.png`` and ``evaluation.json`` are in ``out_dir``.

    Raises:
        FileNotFoundError: not a run folder, or no LoRA weights in it.
        ValueError: a bad setting or override (named), or no face in the references.
        LoraFileError: a damaged LoRA file, or one holding NaN/inf (named).
    """
    config = config or EvaluateConfig()
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE} not found: {run_dir} is not a training run "
                                "(score a folder of images with evaluate_images)")

    run_cfg = read_run_config(run_dir)
    # replace() checks the overrides as EvaluateConfig checks its own (before any model loads).
    config = replace(config, seeds=tuple(seeds if seeds is not None else config.seeds),
                     scales=tuple(scales if scales is not None else config.scales))
    scales, seeds = config.scales, config.seeds
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    default_identifier, subject = _subject_from_config(run_cfg)
    identifier = identifier or default_identifier
    plist = people_prompts(subject, categories=config.categories, per_category=config.prompts_per_category, templates=prompts)
    refs = reference_embeddings(references, backend=config.face_backend, threshold=config.threshold,
                                copy_threshold=config.copy_threshold, progress=progress)
    refs = without_trained_photos(refs, _trained_sha256(run_cfg))

    ckpts = _run_checkpoints(run_dir, checkpoints if checkpoints is not None else config.checkpoints, config.max_checkpoints)
    jobs: list[tuple[str, int | None, Path | None, float]] = []
    if 0.0 in scales:
        jobs.append(("base", 0, None, 0.0))
    jobs += [(n, st, w, sc) for (n, st, w), sc in itertools.product(ckpts, scales) if sc > 0]
    image_dir = out_dir / "images"
    _generate_missing(run_dir, subject, jobs, plist, config, image_dir, progress)

    rows = []
    for (name, step, _, scale), p, seed in itertools.product(jobs, plist, seeds):
        path = image_dir / name / f"scale-{scale:g}" / _image_name(p, seed)
        rows.append({"checkpoint": name, "step": step, "scale": scale, "category": p.category, "prompt_id": p.prompt_id,
                     "prompt": p.text, "seed": seed, "image": str(path.relative_to(out_dir)), "_image": path})
    rows = score_rows(rows, refs, config, identifier, progress=progress)
    return write_evaluation(rows, refs, config, out_dir, extra={"run_dir": str(run_dir), "subject": subject,
                                                                "identifier": identifier})
