"""Evaluate: does the LoRA reproduce the face, and does it still follow the prompt?

Identity is measured with a face-recognition embedding (dlib's ResNet offline, ArcFace
through ``insightface`` where installed): the cosine similarity of the largest face in
each generated image to the mean embedding of the reference photos, and the share of
images that pass the same-person threshold. An image without a face scores 0 and
counts, so a LoRA that stops drawing faces cannot look good by being skipped.

Two bounds make the numbers readable: leave-one-out similarity among the reference
photos (the best a perfect likeness can score) and the base model without the LoRA on
the same prompts and seeds (scale 0: what no likeness scores).

Prompt adherence follows the DreamBooth paper: CLIP-T is the cosine of the image and
prompt embeddings with the identifier ("TOK") removed from the prompt, CLIP-I the
similarity to the reference photos, and diversity the mean pairwise CLIP distance of
one prompt's images across seeds. The metrics live in :mod:`lora_helpers.evaluate.metrics` and are
re-exported here; this module generates, scores whole runs, plots and chooses.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
from PIL import Image

from lora_helpers.core.fileio import write_json, write_text
from lora_helpers.core.images import list_images
from lora_helpers.core.lora_files import weights_digest
from lora_helpers.core.run_folder import (
    CONFIG_FILE, DEFAULT_CLASS_NOUN, DEFAULT_TOKEN, DEFAULT_TRIGGER, LORA_WEIGHT_NAME, find_checkpoints, read_run_config,
)
from lora_helpers.evaluate.metrics import (
    ReferenceSet, diversity, identity_scores, identity_summary, load_clip, reference_embeddings, remove_identifier,
)

__all__ = [
    "EvaluateConfig",
    "PROMPTS_PEOPLE",
    "EvalPrompt",
    "people_prompts",
    "evaluate_images",
    "summarize",
    "write_scores_csv",
    "read_scores_csv",
    "Choice",
    "best_checkpoint",
    "EvaluationResult",
    "evaluate_run",
    "identity_validation_hook",
    "format_summary",
    "add_cli_arguments",
    "run_cli",
]

# Standard prompts for a person, in the spirit of the DreamBooth paper's live-subject
# prompts: the same face must survive framing, places, activities, outfits and styles.
PROMPTS_PEOPLE: dict[str, tuple[str, ...]] = {
    "portrait": (
        "a close-up portrait photo of {subject}",
        "a headshot of {subject}, studio lighting, plain background",
        "a photo of {subject} smiling at the camera",
        "a black and white portrait photo of {subject}",
    ),
    "full_body": (
        "a full body photo of {subject} standing in a park",
        "a full body photo of {subject} walking down a city street",
    ),
    "place": (
        "a photo of {subject} on the beach",
        "a photo of {subject} in the snow",
        "a photo of {subject} in the jungle",
        "a photo of {subject} with a mountain in the background",
    ),
    "activity": (
        "a photo of {subject} reading a book in a cafe",
        "a photo of {subject} riding a bicycle",
        "a photo of {subject} cooking in a kitchen",
    ),
    "outfit": (
        "a photo of {subject} wearing a red hat",
        "a photo of {subject} in a chef outfit",
        "a photo of {subject} in a firefighter outfit",
    ),
    "style": (
        "an oil painting of {subject}",
        "a pencil sketch of {subject}",
        "a watercolor painting of {subject}",
        "a comic book illustration of {subject}",
    ),
}


@dataclass
class EvaluateConfig:
    """Settings for the evaluation stage.

    Attributes:
        face_backend: ``"dlib"`` (offline, default) or ``"insightface"`` (ArcFace, when installed).
        threshold: same-person cosine; None takes the backend's own (dlib 0.91, ArcFace 0.4).
        clip_model: CLIP hub id or folder; None takes ``resolve_models().clip``
            (ViT-L/14, or the tiny CLIP in smoke mode).
        use_clip: compute CLIP-T, CLIP-I and diversity (identity needs no CLIP).
        seeds: seeds per prompt; the same seeds for every checkpoint and scale.
        scales: LoRA scales; 0.0 is the base model (the lower bound), generated once.
        checkpoints: ``"all"`` (every ``checkpoint-<step>`` and the final weights),
            ``"final"``, or a list of checkpoint names or steps.
        max_checkpoints: with more, evenly spaced ones are evaluated (the last included).
        categories: prompt categories from :data:`PROMPTS_PEOPLE` (None: all).
        prompts_per_category: keep the first N prompts of each category (None: all).
        identity_weight: weight of identity against prompt adherence in :func:`best_checkpoint`.
        min_prompt_adherence: absolute CLIP-T floor for :func:`best_checkpoint`.
        min_adherence_vs_base: CLIP-T floor as a share of the base model's CLIP-T.
        num_inference_steps, guidance_scale, resolution: generation settings
            (None: the generate stage's defaults).
        batch_size: images per CLIP forward pass.
    """

    face_backend: str = "dlib"
    threshold: float | None = None
    clip_model: str | None = None
    use_clip: bool = True
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    scales: tuple[float, ...] = (0.0, 0.5, 0.8, 1.0)
    checkpoints: str | Sequence[str | int] = "all"
    max_checkpoints: int | None = 4
    categories: tuple[str, ...] | None = None
    prompts_per_category: int | None = None
    identity_weight: float = 0.7
    min_prompt_adherence: float | None = None
    min_adherence_vs_base: float | None = 0.9
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    resolution: int | None = None
    batch_size: int = 16


# --- prompts -----------------------------------------------------------------------


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: ``text`` is what the generator sees."""

    prompt_id: str
    category: str
    template: str
    text: str


def people_prompts(
    subject: str = DEFAULT_TRIGGER,
    *,
    categories: Iterable[str] | None = None,
    per_category: int | None = None,
    templates: Sequence[str] | None = None,
) -> list[EvalPrompt]:
    """The standard prompt set (or your own templates) filled in with ``subject``.

    Args:
        subject: identifier and class, e.g. ``"TOK person"``.
        categories: categories of :data:`PROMPTS_PEOPLE` to use (None: all).
        per_category: keep the first N prompts of each category.
        templates: your own prompts instead; ``{subject}`` is filled in when present.

    Returns:
        A list of :class:`EvalPrompt` with stable ids such as ``"place-01"``.
    """
    if templates is not None:
        return [EvalPrompt(f"custom-{i:02d}", "custom", t, t.replace("{subject}", subject)) for i, t in enumerate(templates)]
    chosen = list(categories) if categories is not None else list(PROMPTS_PEOPLE)
    unknown = [c for c in chosen if c not in PROMPTS_PEOPLE]
    if unknown:
        raise ValueError(f"unknown prompt categories {unknown}; choose from {list(PROMPTS_PEOPLE)}")
    out = []
    for cat in chosen:
        for i, t in enumerate(PROMPTS_PEOPLE[cat][:per_category]):
            out.append(EvalPrompt(f"{cat}-{i:02d}", cat, t, t.replace("{subject}", subject)))
    return out


# --- scoring images ----------------------------------------------------------------

def _png_text(path: Path) -> dict[str, str]:
    try:
        with Image.open(path) as im:
            return dict(getattr(im, "text", {}) or {})
    except Exception:
        return {}


def _png_meta(path: Path) -> dict:
    """prompt, seed, scale, checkpoint, step, category, prompt_id from PNG text, where present.

    Reads what our generate stage writes (``lora_scale``, ``lora`` = the weights file), so
    its scale sweeps and checkpoint grids can be scored as they are.
    """
    info = _png_text(path)
    meta: dict[str, Any] = {k: info[k] for k in ("prompt", "category", "prompt_id", "checkpoint") if info.get(k)}
    for key, cast in (("seed", int), ("step", int), ("scale", float)):
        value = info.get(key) or (info.get("lora_scale") if key == "scale" else None)
        try:
            meta[key] = cast(float(value)) if value not in (None, "", "null", "None") else None
        except ValueError:
            pass
    if "lora" in info and "checkpoint" not in meta:
        lora = info["lora"] if info["lora"] not in ("", "null", "None") else None
        meta["checkpoint"] = "base" if lora is None else (
            Path(lora).parent.name if Path(lora).parent.name.startswith("checkpoint-") else "final")
        if lora is None:
            meta["scale"] = 0.0
    return {k: v for k, v in meta.items() if v is not None}


def _score_items(items: list[dict], references: ReferenceSet, config: EvaluateConfig, identifier: str | None,
                 clip=None, progress: bool = True) -> list[dict]:
    """Fill identity and CLIP columns into rows that carry an ``"_image"`` (path or PIL)."""
    ids = identity_scores([r["_image"] for r in items], references, progress=progress)
    for r, s in zip(items, ids):
        r.update(face_found=s.face_found, faces=s.faces, identity=round(s.similarity, 5), identity_pass=s.passed)
        if s.error:
            r["error"] = s.error
    if config.use_clip and items:
        clip = load_clip(clip or config.clip_model, batch_size=config.batch_size)
        readable = [r for r in items if not r.get("error")]
        emb = clip.image_embeddings([r["_image"] for r in readable])
        ref = clip.image_embeddings(references.images)
        with_prompt = [i for i, r in enumerate(readable) if r.get("prompt")]
        txt = clip.text_embeddings([remove_identifier(readable[i]["prompt"], identifier) for i in with_prompt])
        for j, i in enumerate(with_prompt):
            readable[i]["clip_t"] = round(float(emb[i] @ txt[j]), 5)
        for i, r in enumerate(readable):
            r["clip_i"] = round(float((ref @ emb[i]).mean()), 5)
        groups: dict[tuple, list[int]] = {}
        for i, r in enumerate(readable):
            groups.setdefault((r.get("checkpoint"), r.get("scale"), r.get("prompt")), []).append(i)
        for idx in groups.values():
            d = diversity(emb[idx])
            for i in idx:
                readable[i]["diversity"] = None if math.isnan(d) else round(d, 5)
    for r in items:
        r.pop("_image", None)
    return items


def evaluate_images(
    folder_or_images: str | Path | Sequence,
    *,
    references: ReferenceSet | str | Path | Sequence,
    prompts: Sequence[str | None] | None = None,
    config: EvaluateConfig | None = None,
    identifier: str | None = DEFAULT_TOKEN,
    clip=None,
    progress: bool = True,
) -> list[dict]:
    """Score images made anywhere: identity, and CLIP-T / CLIP-I / diversity.

    Args:
        folder_or_images: a folder of images, or a list of paths or PIL images.
        references: a :class:`ReferenceSet` or what :func:`reference_embeddings` takes.
        prompts: one prompt per image (None: read the ``prompt`` PNG text field, as our
            generate stage writes it; images without one get identity and CLIP-I only).
        config: an :class:`EvaluateConfig` (face backend, threshold, CLIP model).
        identifier: word removed from prompts before CLIP-T.
        clip: a loaded :class:`ClipScorer` to reuse.
        progress: show progress bars.

    Returns:
        One dict per image: image, prompt, seed, scale, checkpoint, face_found, faces,
        identity, identity_pass, clip_t, clip_i, diversity (missing keys: not measured).
    """
    config = config or EvaluateConfig()
    refs = reference_embeddings(references, backend=config.face_backend, threshold=config.threshold, progress=progress)
    if isinstance(folder_or_images, (str, Path)):
        rows = [{"image": p.name, **_png_meta(p), "_image": p} for p in list_images(folder_or_images)]
        if not rows:
            raise ValueError(f"no images found in {folder_or_images}")
    else:
        rows = [{"image": getattr(x, "name", f"image-{i:03d}"), "_image": x} for i, x in enumerate(folder_or_images)]
    if prompts is not None:
        if len(prompts) != len(rows):
            raise ValueError(f"{len(rows)} images but {len(prompts)} prompts")
        for r, p in zip(rows, prompts):
            r["prompt"] = p
    return _score_items(rows, refs, config, identifier, clip=clip, progress=progress)


_COLUMNS = ["checkpoint", "step", "scale", "category", "prompt_id", "prompt", "seed", "image", "face_found", "faces",
            "identity", "identity_pass", "clip_t", "clip_i", "diversity", "error"]


def write_scores_csv(path: str | Path, rows: Sequence[dict]) -> Path:
    """Write score rows as CSV atomically (known columns first, then any others)."""
    extra = sorted({k for r in rows for k in r} - set(_COLUMNS))
    cols = [c for c in _COLUMNS if any(c in r for r in rows)] + extra
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    return write_text(path, buf.getvalue())


def _parse(v: str):
    if v == "":
        return None
    if v in ("True", "False"):
        return v == "True"
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v


def read_scores_csv(path: str | Path) -> list[dict]:
    """Read a ``scores.csv`` back into rows with numbers and booleans restored."""
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (v if k in ("prompt", "image", "checkpoint") else _parse(v)) for k, v in r.items()} for r in csv.DictReader(f)]


def _nanmean(values) -> float:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    return float(np.mean(vals)) if vals else float("nan")


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Aggregate per-image rows by (checkpoint, scale).

    Returns:
        Rows with checkpoint, step, scale, images, faces_found (share), identity_mean
        (no face counts 0), identity_pass_rate, clip_t_mean, clip_i_mean, diversity_mean;
        ordered by step, then scale.
    """
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("checkpoint"), r.get("scale")), []).append(r)
    out = []
    for (ckpt, scale), rs in groups.items():
        out.append({
            "checkpoint": ckpt, "step": rs[0].get("step"), "scale": scale, "images": len(rs),
            "faces_found": sum(bool(r.get("face_found")) for r in rs) / len(rs),
            "identity_mean": _nanmean(r.get("identity") or 0.0 for r in rs),
            "identity_pass_rate": sum(bool(r.get("identity_pass")) for r in rs) / len(rs),
            "clip_t_mean": _nanmean(r.get("clip_t") for r in rs),
            "clip_i_mean": _nanmean(r.get("clip_i") for r in rs),
            "diversity_mean": _nanmean(r.get("diversity") for r in rs),
        })
    big = float("inf")
    return sorted(out, key=lambda s: (s["step"] if isinstance(s["step"], (int, float)) else big,
                                      str(s["checkpoint"]), s["scale"] if s["scale"] is not None else -1))


# --- choosing a checkpoint ---------------------------------------------------------


@dataclass
class Choice:
    """The checkpoint and LoRA scale to use, and why."""

    checkpoint: str
    scale: float
    step: int | None
    score: float
    identity_mean: float
    identity_pass_rate: float
    clip_t_mean: float
    reason: str

    def __str__(self) -> str:
        return f"best: {self.checkpoint} at scale {self.scale:g} - {self.reason}"


def _is_base(s: dict) -> bool:
    return s.get("scale") in (0, 0.0) or s.get("checkpoint") == "base"


def best_checkpoint(
    rows: Sequence[dict],
    *,
    identity_weight: float = 0.7,
    min_prompt_adherence: float | None = None,
    min_adherence_vs_base: float | None = 0.9,
    upper_bound: float | None = None,
) -> Choice:
    """Pick the checkpoint and scale with the best combined identity and prompt adherence.

    Identity and CLIP-T live on different scales (identity ~0.7-1.0, CLIP-T ~0.2-0.35),
    so each is put on the scale of the bounds before mixing them as
    ``w * identity_gain + (1 - w) * adherence_kept``:

    * ``identity_gain = (identity - base) / (upper - base)``: the share of the gap between
      the base model (scale 0) and the references' leave-one-out similarity that the LoRA
      closes (base 0 and upper 1 when unknown);
    * ``adherence_kept = clip_t / base_clip_t``: the share of the base model's prompt
      adherence kept (the best candidate's CLIP-T when there is no base model).

    Candidates below the CLIP-T floor are dropped first: a LoRA that draws the face
    whatever the prompt says has overfitted. The base model is never a candidate.

    Args:
        rows: per-image rows (as in scores.csv) or :func:`summarize` rows.
        identity_weight: weight ``w`` of identity (the goal) against prompt adherence.
        min_prompt_adherence: absolute CLIP-T floor.
        min_adherence_vs_base: floor as a share of the base model's CLIP-T.
        upper_bound: the references' leave-one-out similarity (ReferenceSet.upper_bound).

    Returns:
        A :class:`Choice`; its ``reason`` quotes the numbers.

    Raises:
        ValueError: when there is no LoRA candidate.
    """
    summary = list(rows) if rows and "identity_mean" in rows[0] else summarize(rows)
    base = next((s for s in summary if _is_base(s)), None)
    cands = [s for s in summary if not _is_base(s)]
    if not cands:
        raise ValueError("no LoRA checkpoint among the rows (only the base model); evaluate at a scale above 0")
    has_clip = any(_finite(s["clip_t_mean"]) for s in cands)
    base_clip = base["clip_t_mean"] if base and _finite(base["clip_t_mean"]) else None
    floors = []
    if has_clip and min_prompt_adherence is not None:
        floors.append((min_prompt_adherence, f"CLIP-T {min_prompt_adherence:.3f}"))
    if has_clip and min_adherence_vs_base is not None and base_clip is not None:
        floors.append((min_adherence_vs_base * base_clip, f"{min_adherence_vs_base:.0%} of the base model's CLIP-T {base_clip:.3f}"))
    note = ""
    pool = cands
    if floors:
        floor, why = max(floors)
        kept = [s for s in cands if _finite(s["clip_t_mean"]) and s["clip_t_mean"] >= floor]
        note = f"; {len(cands) - len(kept)} of {len(cands)} dropped below {why}" if kept else f"; none reach {why}, so all were compared"
        pool = kept or cands

    lo = base["identity_mean"] if base else 0.0
    hi = upper_bound if upper_bound is not None and _finite(upper_bound) and upper_bound > lo else 1.0
    w = identity_weight if has_clip else 1.0
    ref_clip = base_clip or max((s["clip_t_mean"] for s in pool if _finite(s["clip_t_mean"])), default=1.0)
    scores = []
    for s in pool:
        gain = (s["identity_mean"] - lo) / max(hi - lo, 1e-6)
        kept_share = s["clip_t_mean"] / ref_clip if has_clip and _finite(s["clip_t_mean"]) and ref_clip else 0.0
        scores.append(w * gain + (1 - w) * kept_share)
    k = max(range(len(pool)), key=lambda j: (scores[j], pool[j]["identity_mean"]))
    b = pool[k]
    parts = [f"identity {b['identity_mean']:.3f} ({b['identity_pass_rate']:.0%} pass)"]
    if base:
        parts[0] += f" vs {lo:.3f} for the base model"
    if has_clip:
        parts.append(f"CLIP-T {b['clip_t_mean']:.3f}" + (f" vs {base_clip:.3f}" if base_clip is not None else ""))
    reason = (f"highest combined score {scores[k]:.2f} (identity weight {w:g}) of {len(pool)} candidates: "
              + ", ".join(parts) + note)
    return Choice(checkpoint=str(b["checkpoint"]), scale=float(b["scale"]), step=b.get("step"), score=float(scores[k]),
                  identity_mean=b["identity_mean"], identity_pass_rate=b["identity_pass_rate"],
                  clip_t_mean=b["clip_t_mean"], reason=reason)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# --- a whole run: generate, score, plot, choose -------------------------------------


@dataclass
class EvaluationResult:
    """What :func:`evaluate_run` or the CLI produced."""

    rows: list[dict]
    summary: list[dict]
    choice: Choice | None
    references: ReferenceSet
    out_dir: Path
    files: dict[str, Path]

    @property
    def lower_bound(self) -> float | None:
        """Identity mean of the base model without the LoRA (None when not generated)."""
        base = [s for s in self.summary if _is_base(s)]
        return base[0]["identity_mean"] if base else None


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


def _image_name(p: EvalPrompt, seed: int) -> str:
    return f"{p.prompt_id}-seed{seed}.png"


def _is_current(path: Path, want: dict) -> bool:
    """True when ``path`` exists and was generated with these settings and weights (resume check)."""
    if not path.is_file():
        return False
    meta = _png_text(path)
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
    from tqdm.auto import tqdm

    from lora_helpers.generate import images as gen
    from lora_helpers.generate.lora import load_lora
    from lora_helpers.generate.pipeline import choose_base_model, load_pipeline
    from lora_helpers.core.fileio import sha256_file
    from lora_helpers.core.grids import save_png_with_metadata
    from lora_helpers.core.runtime import free_memory

    defaults = gen.GenerateConfig()
    gcfg = gen.GenerateConfig(size=config.resolution, steps=config.num_inference_steps, subject=subject,
                              guidance=defaults.guidance if config.guidance_scale is None else config.guidance_scale)
    settings = {"steps": gen.resolve_steps(gcfg.steps), "width": gen.resolve_size(gcfg.size), "guidance": gcfg.guidance}
    todo = []
    for name, step, weights, scale in jobs:
        folder = image_dir / name / f"scale-{scale:g}"
        want = {**settings, "lora_sha256": sha256_file(weights) if weights is not None else None}
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
                items = gen.generate_images(pipe, [p.text], seeds, config=replace(gcfg, lora_scale=scale),
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
        references: the person's photos: dataset/, a folder, or a ReferenceSet.
        scales, checkpoints, seeds: override the config's.
        prompts: your own templates (``{subject}`` is filled in); None: the standard set.
        config: an :class:`EvaluateConfig`.
        out_dir: where to write (default ``run_dir/evaluation``).
        identifier: word removed before CLIP-T (default: the first word of the run's trigger).
        progress: show progress bars.

    Returns:
        An :class:`EvaluationResult`; ``scores.csv``, ``summary.csv``,
        ``identity_vs_prompt.png`` and ``evaluation.json`` are in ``out_dir``.
    """
    config = config or EvaluateConfig()
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{run_dir / CONFIG_FILE} not found: {run_dir} is not a training run "
                                "(score a folder of images with evaluate_images)")

    run_cfg = read_run_config(run_dir)
    scales = tuple(float(s) for s in (scales if scales is not None else config.scales))
    seeds = tuple(seeds if seeds is not None else config.seeds)
    config = replace(config, seeds=seeds)
    out_dir = Path(out_dir) if out_dir is not None else run_dir / "evaluation"
    default_identifier, subject = _subject_from_config(run_cfg)
    identifier = identifier or default_identifier
    plist = people_prompts(subject, categories=config.categories, per_category=config.prompts_per_category, templates=prompts)
    refs = reference_embeddings(references, backend=config.face_backend, threshold=config.threshold, progress=progress)

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
    rows = _score_items(rows, refs, config, identifier, progress=progress)
    return _write_outputs(rows, refs, config, out_dir, extra={"run_dir": str(run_dir), "subject": subject,
                                                                 "identifier": identifier})


def _write_outputs(rows: list[dict], refs: ReferenceSet, config: EvaluateConfig, out_dir: Path, *, extra: dict) -> EvaluationResult:
    from dataclasses import asdict

    from lora_helpers.evaluate.plots import plot_identity_vs_prompt

    summary = summarize(rows)
    choice = None
    if any(not _is_base(s) and s.get("scale") is not None for s in summary):
        choice = best_checkpoint(summary, identity_weight=config.identity_weight,
                                 min_prompt_adherence=config.min_prompt_adherence,
                                 min_adherence_vs_base=config.min_adherence_vs_base, upper_bound=refs.upper_bound)
    files = {"scores": write_scores_csv(out_dir / "scores.csv", rows),
             "summary": write_scores_csv(out_dir / "summary.csv", [{k: _round(v) for k, v in s.items()} for s in summary])}
    if any(s.get("scale") is not None for s in summary):
        files["plot"] = plot_identity_vs_prompt(summary, out_dir / "identity_vs_prompt.png", upper_bound=refs.upper_bound,
                                                threshold=refs.threshold, choice=choice)
    base = [s for s in summary if _is_base(s)]
    report = {
        **extra,
        "upper_bound_leave_one_out": _round(refs.upper_bound),
        "lower_bound_base_model": _round(base[0]["identity_mean"]) if base else None,
        "threshold": refs.threshold, "face_backend": refs.backend,
        "references": refs.names, "references_without_face": refs.without_face,
        "choice": asdict(choice) if choice else None, "summary": summary,
        "config": asdict(config),
    }
    files["report"] = write_json(out_dir / "evaluation.json", report)
    return EvaluationResult(rows=rows, summary=summary, choice=choice, references=refs, out_dir=out_dir, files=files)


def _round(v, nd: int = 5):
    return round(v, nd) if isinstance(v, float) and not math.isnan(v) else (None if isinstance(v, float) else v)


# --- during training ---------------------------------------------------------------


def identity_validation_hook(
    references: ReferenceSet | str | Path | Sequence,
    *,
    backend: str = "dlib",
    threshold: float | None = None,
    write_scores: bool = True,
) -> Callable[[int, list[Image.Image], Path | None], dict]:
    """A validation hook for the trainer: identity of the validation images at each step.

    The references are embedded on the first call (not at construction), so creating the
    hook costs nothing when validation never runs.

    Args:
        references: the person's photos (dataset/, a folder, paths or a ReferenceSet).
        backend: face backend name.
        threshold: same-person cosine (None: the backend's).
        write_scores: also write ``identity-<step>.json`` (per-image scores) beside the
            validation grids: into ``samples/`` of the run folder the trainer passes.

    Returns:
        ``hook(step, images, folder) -> {"identity_mean", "identity_pass_rate",
        "faces_found", "identity_upper_bound"}`` with plain floats, ready for log.jsonl.
    """
    state: dict[str, ReferenceSet] = {}

    def hook(step: int, images: list[Image.Image], folder: Path | None = None) -> dict:
        if "refs" not in state:
            state["refs"] = reference_embeddings(references, backend=backend, threshold=threshold, progress=False)
        refs = state["refs"]
        scores = identity_scores(images, refs, progress=False)
        stats = identity_summary(scores)
        stats["identity_upper_bound"] = refs.upper_bound
        if write_scores and folder is not None:
            folder = Path(folder) / "samples" if (Path(folder) / "samples").is_dir() else Path(folder)
            write_json(folder / f"identity-{int(step):06d}.json",
                       {"step": int(step), **stats, "threshold": refs.threshold,
                        "images": [{"identity": round(s.similarity, 5), "passed": s.passed, "face_found": s.face_found}
                                   for s in scores]})
        return {k: (None if math.isnan(v) else round(float(v), 5)) for k, v in stats.items()}

    return hook


# --- command line ------------------------------------------------------------------


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m lora_helpers evaluate``."""
    d = EvaluateConfig()
    parser.add_argument("target", type=Path, help="a training run folder (has config.json) or a folder of images")
    parser.add_argument("--references", type=Path, required=True,
                        help="the person's photos: a prepared dataset/ folder or a plain folder of photos")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: TARGET/evaluation)")
    parser.add_argument("--checkpoints", default="all", help="'all', 'final', or comma-separated names or steps")
    parser.add_argument("--max-checkpoints", type=int, default=d.max_checkpoints,
                        help="with 'all': at most this many, evenly spaced (0: no limit)")
    parser.add_argument("--scales", type=float, nargs="+", default=list(d.scales), help="LoRA scales (0 = base model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    parser.add_argument("--categories", nargs="+", default=None, choices=list(PROMPTS_PEOPLE))
    parser.add_argument("--prompts-per-category", type=int, default=None)
    parser.add_argument("--prompts-file", type=Path, default=None, help="one prompt template per line ({subject} is filled in)")
    parser.add_argument("--identifier", default=None, help="word removed from prompts before CLIP-T (default: the run's trigger, or TOK)")
    parser.add_argument("--clip-model", default=None, help="CLIP hub id or folder (default: ViT-L/14; tiny in smoke mode)")
    parser.add_argument("--no-clip", action="store_true", help="identity only")
    parser.add_argument("--face-backend", default=d.face_backend, choices=["dlib", "dlib5", "insightface"])
    parser.add_argument("--threshold", type=float, default=None, help="same-person cosine (default: the backend's)")
    parser.add_argument("--identity-weight", type=float, default=d.identity_weight)
    parser.add_argument("--min-prompt-adherence", type=float, default=None, help="absolute CLIP-T floor for the choice")
    parser.add_argument("--steps", type=int, default=None, help="inference steps (default: the generate stage's)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--resolution", type=int, default=None)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``python -m lora_helpers evaluate``; returns the exit code."""
    ckpts = args.checkpoints if args.checkpoints in ("all", "final") else [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    config = EvaluateConfig(
        face_backend=args.face_backend, threshold=args.threshold, clip_model=args.clip_model, use_clip=not args.no_clip,
        seeds=tuple(args.seeds), scales=tuple(args.scales), checkpoints=ckpts, max_checkpoints=args.max_checkpoints or None,
        categories=tuple(args.categories) if args.categories else None, prompts_per_category=args.prompts_per_category,
        identity_weight=args.identity_weight, min_prompt_adherence=args.min_prompt_adherence,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, resolution=args.resolution,
    )
    target: Path = args.target
    if not target.is_dir():
        print(f"error: {target} is not a folder (give a run folder or a folder of images)")
        return 2
    out = args.out or target / "evaluation"
    templates = None
    if args.prompts_file:
        templates = [l.strip() for l in args.prompts_file.read_text(encoding="utf-8").splitlines() if l.strip()]
    try:
        if (target / CONFIG_FILE).is_file():
            result = evaluate_run(target, references=args.references, prompts=templates, config=config, out_dir=out,
                                  identifier=args.identifier)
        else:
            refs = reference_embeddings(args.references, backend=config.face_backend, threshold=config.threshold)
            rows = evaluate_images(target, references=refs, config=config, identifier=args.identifier or DEFAULT_TOKEN)
            result = _write_outputs(rows, refs, config, Path(out), extra={"images": str(target)})
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as exc:
        print(f"error: {exc}")
        return 1
    print(format_summary(result))
    print(f"scores: {result.files['scores']}")
    return 0


def format_summary(result: EvaluationResult) -> str:
    """A short text table of the summary, the bounds and the choice."""
    refs = result.references
    lines = [f"references: {len(refs.names)} with a face"
             + (f", leave-one-out similarity {refs.upper_bound:.3f} (upper bound)" if refs.leave_one_out else "")
             + f"; same-person threshold {refs.threshold:.2f}"]
    lines.append(f"{'checkpoint':<18} {'scale':>5} {'images':>6} {'faces':>6} {'identity':>8} {'pass':>5} {'CLIP-T':>7} {'CLIP-I':>7} {'div':>6}")
    for s in result.summary:
        f = lambda v, w=7: f"{v:>{w}.3f}" if isinstance(v, float) and not math.isnan(v) else f"{'-':>{w}}"
        scale = "-" if s["scale"] is None else f"{s['scale']:g}"
        lines.append(f"{str(s['checkpoint'] or '-'):<18} {scale:>5} {s['images']:>6} {s['faces_found']:>6.0%} "
                     f"{f(s['identity_mean'], 8)} {s['identity_pass_rate']:>5.0%} {f(s['clip_t_mean'])} "
                     f"{f(s['clip_i_mean'])} {f(s['diversity_mean'], 6)}")
    if result.lower_bound is not None:
        lines.append(f"base model without the LoRA (lower bound): identity {result.lower_bound:.3f}")
    if result.choice:
        lines.append(str(result.choice))
    return "\n".join(lines)
