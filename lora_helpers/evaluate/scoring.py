"""Scoring images: identity likeness and prompt adherence of each image, from any source.

Identity is measured with a face-recognition embedding (dlib's ResNet offline, ArcFace
through ``insightface`` where installed): the cosine similarity of the largest face in
each image to the mean embedding of the training photos, and whether it passes the
same-person threshold; beside it the same against photos held out of training, which
the model cannot have copied. Each image is also matched with its nearest training photo
and flagged when it is a near-copy of it (:mod:`lora_helpers.evaluate.memorisation`).
An image without a face scores 0 and counts, so a LoRA that stops drawing faces cannot
look good by being skipped. An unreadable file is the
opposite case: it says nothing about the LoRA, so it is named (``error``), gets no
scores, and is left out of every average.

Prompt adherence follows the DreamBooth paper: CLIP-T is the cosine of the image and
prompt embeddings with the identifier ("TOK") removed from the prompt, CLIP-I the
similarity to the reference photos, and diversity the mean pairwise CLIP distance of
one prompt's images across seeds. The metrics themselves live in
:mod:`lora_helpers.evaluate.metrics`; whole training runs are evaluated by
:mod:`lora_helpers.evaluate.run`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

from PIL import Image

from lora_helpers.core.images import list_images
from lora_helpers.core.run_folder import DEFAULT_TOKEN
from lora_helpers.evaluate.config import EvaluateConfig
from lora_helpers.evaluate.identity import ReferenceSet, identity_scores, reference_embeddings
from lora_helpers.evaluate.metrics import diversity, load_clip, remove_identifier

__all__ = ["png_text", "score_rows", "evaluate_images"]


def png_text(path: Path) -> dict[str, str]:
    """The PNG text fields of ``path`` (what the generate stage writes); {} for an unreadable file.

    Args:
        path: an image file.

    Returns:
        Field name -> text.
    """
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
    info = png_text(path)
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


def score_rows(items: list[dict], references: ReferenceSet, config: EvaluateConfig, identifier: str | None,
               clip=None, progress: bool = True) -> list[dict]:
    """Fill identity and CLIP columns into rows that carry an ``"_image"`` (path or PIL).

    Args:
        items: rows with ``"_image"``, and ``"prompt"`` where CLIP-T should be measured;
            diversity is grouped by checkpoint, scale and prompt.
        references: the person's reference set.
        config: face backend, CLIP model and batch size.
        identifier: word removed from prompts before CLIP-T.
        clip: a loaded :class:`lora_helpers.evaluate.metrics.ClipScorer` to reuse.
        progress: show progress bars.

    Returns:
        ``items``, updated in place, without ``"_image"``: ``identity`` against the training
        photos, ``identity_heldout`` against the held-out ones (None when there are none),
        ``nearest_training_photo``, ``copy_similarity`` and ``memorised`` (a near-copy of that
        photo); an unreadable image keeps empty scores and its reason in ``"error"``.

    Raises:
        ValueError: when not one image can be read (nothing to score).
    """
    ids = identity_scores([r["_image"] for r in items], references, progress=progress)
    for r, s in zip(items, ids):
        if s.error:  # unreadable: no scores at all, so no average can take it for "no face"
            r.update(face_found=None, faces=None, identity=None, identity_heldout=None, identity_pass=None,
                     error=s.error)
            continue
        # identity_heldout stays empty without held-out photos: the summary says why.
        r.update(face_found=s.face_found, faces=s.faces, identity=round(s.similarity, 5), identity_pass=s.passed,
                 identity_heldout=None if s.heldout_similarity is None else round(s.heldout_similarity, 5))
        if s.memorised is not None:
            r.update(nearest_training_photo=s.nearest_photo, copy_similarity=round(s.copy_similarity, 5),
                     memorised=s.memorised)
    if items and all(r.get("error") for r in items):
        raise ValueError(f"none of the {len(items)} images could be read (e.g. {items[0]['error']}); "
                         "check the folder holds the generated images")
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
        clip: a loaded :class:`lora_helpers.evaluate.metrics.ClipScorer` to reuse.
        progress: show progress bars.

    Returns:
        One dict per image: image, prompt, seed, scale, checkpoint, face_found, faces,
        identity, identity_heldout, identity_pass, nearest_training_photo, copy_similarity,
        memorised, clip_t, clip_i, diversity (missing keys: not measured);
        an unreadable file has ``error`` (naming it) and no scores.
    """
    config = config or EvaluateConfig()
    refs = reference_embeddings(references, backend=config.face_backend, threshold=config.threshold,
                                copy_threshold=config.copy_threshold, progress=progress)
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
    return score_rows(rows, refs, config, identifier, clip=clip, progress=progress)
