"""What a run trains on: the images with their captions and masks, their aspect buckets, and the batch order.

Rows that preparation marked ``"held_out": true`` are never trained on (evaluation scores
likeness on them), and crops whose ``resize_quality`` is below ``min_resize_quality`` are
skipped; a row without the field counts as 1.0. With ``weight_by_resize_quality`` each
image's loss is scaled by its score (:func:`loss_weights`).

The batch order is a pure function of (seed, epoch) (:func:`batch_plan`), so a resumed run
sees at step N exactly the batch an uninterrupted run saw; nothing about it is checkpointed.

Several people in one dataset: each row names its person (``"subject": "ada"``); an epoch then
draws every person equally often, repeating the photos of those with fewer, so one LoRA learns
each face equally well whatever their photo counts.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from lora_helpers.caption import load_captions, read_metadata
from lora_helpers.core.images import list_images
from lora_helpers.core.embeddings import pivotal_token_count
from lora_helpers.core.run_folder import (CAPTION_CONFIG_FILE, HELD_OUT_FIELD, METADATA_FILE, RESIZE_QUALITY_FIELD,
                                          SUBJECT_FIELD, SUBJECTS_KEY, read_caption_config)
from lora_helpers.core.subjects import SUBJECT_PLACEHOLDER, expand_subject, fill_subjects
from lora_helpers.core.runtime import say

__all__ = ["TrainImage", "read_training_images", "loss_weights", "batch_plan", "subject_counts", "read_subjects",
           "common_class_noun", "subject_prompts"]


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
        resize_quality: share of the crop's detail that is real (1.0 when the dataset does not say).
        subject: the person's slug in a dataset of several people ("ada"); None: the dataset's one person.
    """

    file_name: str
    path: Path
    caption: str
    mask_path: Path | None = None
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    resize_quality: float = 1.0
    subject: str | None = None


def _pair(value, default):
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return int(value[0]), int(value[1])
    return default


def _unreadable(path: Path) -> str | None:
    """Why an image file cannot be used, or None when it opens."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        return f"not a readable image ({type(exc).__name__})"
    return None


def _row_subject(row: dict, dataset_dir: Path) -> str | None:
    """The person a metadata.jsonl row shows (a slug), or None in a one-person dataset."""
    subject = row.get(SUBJECT_FIELD)
    if subject is None:
        return None
    if not isinstance(subject, str) or not subject.strip():
        raise ValueError(f"{dataset_dir / METADATA_FILE}: {row['file_name']}: {SUBJECT_FIELD} must be a person's "
                         f"name such as \"ada\", got {subject!r}; fix that row or re-run prepare")
    return subject.strip()


def _row_flags(row: dict, dataset_dir: Path) -> tuple[bool, float]:
    """(held out, resize quality) of a metadata.jsonl row; a row without them is a training photo of quality 1."""
    where = f"{dataset_dir / METADATA_FILE}: {row['file_name']}"
    held = row.get(HELD_OUT_FIELD, False)
    if not isinstance(held, bool):
        raise ValueError(f"{where}: {HELD_OUT_FIELD} must be true or false, got {held!r}; re-run prepare")
    quality = row.get(RESIZE_QUALITY_FIELD)
    if quality is None:
        return held, 1.0
    if isinstance(quality, bool) or not isinstance(quality, (int, float)) or not 0.0 <= quality <= 1.0:
        raise ValueError(f"{where}: {RESIZE_QUALITY_FIELD} must be a number from 0 to 1, got {quality!r}; "
                         "re-run prepare")
    return held, float(quality)


def read_training_images(dataset_dir: str | os.PathLike, *, instance_prompt: str | None = None,
                         use_captions: bool = True, min_resize_quality: float = 0.0) -> list[TrainImage]:
    """List the images to train on with their captions and micro-conditioning.

    Images come from ``metadata.jsonl`` (the prepare stage), else from ``images/`` or the
    folder itself. Captions come from :func:`lora_helpers.caption.load_captions`; with
    ``use_captions=False``, or when the dataset has no captions, every image gets
    ``instance_prompt``. A listed image that is missing is skipped with a warning. Held-out
    rows and crops below ``min_resize_quality`` are left out, with a printed line saying how
    many (and which crops were too poor).

    Args:
        dataset_dir: the dataset folder.
        instance_prompt: one prompt for every image (e.g. "a photo of TOK person").
        use_captions: prefer per-image captions when the dataset has them.
        min_resize_quality: skip crops whose ``resize_quality`` is below this (0: keep all).

    Returns:
        The images, in dataset order.

    Raises:
        FileNotFoundError: the folder does not exist.
        ValueError: no usable image; images without a caption and no ``instance_prompt``;
            a caption edited differently in its ``.txt`` file and in metadata.jsonl; a
            metadata.jsonl row that names a file outside the folder (with its line), or whose
            ``held_out`` or ``resize_quality`` is malformed.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {dataset_dir} (run the prepare and caption stages first)")
    meta = dataset_dir / METADATA_FILE
    if meta.is_file():
        # Refuses, naming the line, a row whose image, mask or caption lies outside the dataset:
        # a downloaded dataset must not make us train on (or read) files elsewhere.
        rows = read_metadata(dataset_dir)
    else:
        folder = dataset_dir / "images" if (dataset_dir / "images").is_dir() else dataset_dir
        rows = [{"file_name": p.relative_to(dataset_dir).as_posix()} for p in list_images(folder)]
    captions: dict[str, str] = {}
    if use_captions:
        try:
            captions = load_captions(dataset_dir)  # a hand edit wins, in the .txt file or in metadata.jsonl
        except ValueError as exc:  # CaptionError: some images lack a caption
            # A caption edited differently in both files needs a person, not the instance prompt.
            if not instance_prompt or getattr(exc, "undecided", None):
                raise ValueError(f"{exc}\nRun the caption stage, or train with one instance prompt "
                                 "(--instance-prompt 'a photo of TOK person')") from exc
            warnings.warn(f"captions incomplete in {dataset_dir}; every image uses the instance prompt "
                          f"{instance_prompt!r}")
            captions = {}
    images, held_out, too_poor = [], [], []
    for row in rows:
        name = row["file_name"]
        held, quality = _row_flags(row, dataset_dir)
        if held:  # evaluation scores likeness on these: a trained-on face would flatter the score
            held_out.append(name)
            continue
        if quality < min_resize_quality:
            too_poor.append(f"{name} ({quality:.2f})")
            continue
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
                                 crop_top_left=_pair(row.get("crop_top_left"), (0, 0)), resize_quality=quality,
                                 subject=_row_subject(row, dataset_dir)))
    if held_out:
        say(f"{len(held_out)} photo(s) held out of training for the likeness score: {', '.join(held_out)}")
    if too_poor:
        say(f"{len(too_poor)} crop(s) skipped, resize quality below min_resize_quality {min_resize_quality:g}: "
              f"{', '.join(too_poor)}")
    if not images:
        if held_out or too_poor:
            raise ValueError(f"no training images in {dataset_dir}: {len(held_out)} held out and {len(too_poor)} "
                             f"below min_resize_quality {min_resize_quality:g}; lower min_resize_quality, or re-run "
                             "prepare with more photos (or hold_out=0)")
        raise ValueError(f"no training images in {dataset_dir}; run the prepare stage (or put images in images/)")
    return images


def loss_weights(images: Sequence[TrainImage], *, by_resize_quality: bool) -> list[float] | None:
    """Per-image loss scales for :class:`lora_helpers.train.step.TrainStep`.

    Args:
        images: the images trained on, in cache order.
        by_resize_quality: scale each image's loss by its ``resize_quality``, so crops with
            less real detail (enlarged, padded) teach less.

    Returns:
        One weight per image, or None when every image weighs 1.
    """
    if not by_resize_quality:
        return None
    weights = [float(im.resize_quality) for im in images]
    return None if all(w == 1.0 for w in weights) else weights


def subject_counts(images: Sequence[TrainImage]) -> dict[str, int]:
    """Training photos per person, in order of first appearance ({} for a one-person dataset)."""
    counts: dict[str, int] = {}
    for im in images:
        if im.subject is not None:
            counts[im.subject] = counts.get(im.subject, 0) + 1
    return counts


def read_subjects(dataset_dir: str | os.PathLike, images: Sequence[TrainImage], *, trigger: str | None = None,
                  pivotal_tokens: int = 0) -> dict[str, dict]:
    """The people of a dataset of several: each one's trigger, class noun and training photos.

    Reads ``caption_config.json``'s "subjects" and checks it against the images' "subject" rows. An
    instance prompt with ``{subject}`` (images without captions) gets each image's own trigger.

    Args:
        dataset_dir: the dataset folder.
        images: from :func:`read_training_images` (their captions may be filled in here).
        trigger: a trigger phrase set in the training config (it cannot name several people).
        pivotal_tokens: unused (kept for callers); each person's new tokens are checked by training.

    Returns:
        ``{slug: {"trigger", "class_noun", "images"}}`` in caption_config order; {} for one person.

    Raises:
        ValueError: naming the file and what to do, when rows name people but caption_config.json
            does not (or the other way round), a row names a person it does not list, a person
            has no trigger, the run asks for one trigger, or some people are called by new tokens and
            others by a word.
    """
    dataset_dir = Path(dataset_dir)
    config_path = dataset_dir / CAPTION_CONFIG_FILE
    listed = read_caption_config(dataset_dir).get(SUBJECTS_KEY)
    named = subject_counts(images)
    if not listed and not named:
        return {}
    if not isinstance(listed, dict) or not listed:
        raise ValueError(f"{dataset_dir / METADATA_FILE} names several people ({', '.join(named)}) but {config_path} "
                         f"has no \"{SUBJECTS_KEY}\" with their trigger phrases; run the caption stage again")
    unnamed = [im.file_name for im in images if im.subject is None]
    if unnamed:
        raise ValueError(f"{config_path} lists several people but {len(unnamed)} photo(s) say not whose they are "
                         f"({', '.join(unnamed[:3])}); set \"{SUBJECT_FIELD}\" in their metadata.jsonl rows "
                         "or re-run prepare")
    unknown = sorted(set(named) - set(listed))
    if unknown:
        raise ValueError(f"{dataset_dir / METADATA_FILE} names {', '.join(unknown)}, who is not in {config_path} "
                         f"({', '.join(listed)}); run the caption stage again")
    if trigger:
        raise ValueError(f"the dataset holds several people ({', '.join(listed)}), each with their own trigger in "
                         f"{config_path}; leave the trigger setting empty (--trigger)")
    subjects: dict[str, dict] = {}
    for slug, entry in listed.items():
        phrase = entry.get("trigger") if isinstance(entry, dict) else None
        if not isinstance(phrase, str) or not phrase.strip():
            raise ValueError(f"{config_path}: {SUBJECTS_KEY} -> {slug} has no \"trigger\"; run the caption stage again")
        if named.get(slug):  # a person whose photos were all held out trains nothing
            subjects[slug] = {"trigger": phrase.strip(), "class_noun": entry.get("class_noun"), "images": named[slug]}
    kinds = {bool(pivotal_token_count(s["trigger"].split()[0])) for s in subjects.values()}
    if len(kinds) > 1:
        raise ValueError(f"{config_path}: some people are called by new tokens (<s0><s1>) and some by a word; "
                         "caption again with one identifier format for everyone")
    for im in images:  # one instance prompt for every image: each calls its own person
        im.caption = im.caption.replace(SUBJECT_PLACEHOLDER, subjects[im.subject]["trigger"])
    return subjects


def common_class_noun(subjects: dict[str, dict]) -> str | None:
    """The class noun all the people share ("person"), or None when they differ (each keeps its own prior).

    Args:
        subjects: from :func:`read_subjects`.
    """
    nouns = list(dict.fromkeys(s.get("class_noun") or "person" for s in subjects.values()))
    return nouns[0] if len(nouns) == 1 else None


def subject_prompts(prompts: Sequence[str], trigger: str | None, subjects: dict[str, dict]) -> list[str]:
    """Validation prompts as the model sees them: a ``{subject}`` prompt once per person, ``{<slug>}`` filled.

    Args:
        prompts: templates ("a photo of {subject}", "{ada} and {grace} at a cafe").
        trigger: the one person's trigger (None with several people).
        subjects: from :func:`read_subjects` ({} for one person).

    Returns:
        The prompts, in order.
    """
    triggers = {slug: s["trigger"] for slug, s in subjects.items()}
    return [fill_subjects(p, triggers, subject=trigger) for p in expand_subject(prompts, list(triggers))]


def _shares(total: int, counts: dict[tuple[int, int], int]) -> dict[tuple[int, int], int]:
    """``total`` split across buckets in proportion to ``counts`` (largest remainder, ties by bucket)."""
    n = sum(counts.values())
    quotas = {key: total * c // n for key, c in counts.items()}
    rest = sorted(counts, key=lambda key: (-(total * counts[key] % n), key))
    for key in rest[:total - sum(quotas.values())]:
        quotas[key] += 1
    return quotas


def _balanced_draws(subjects: Sequence[str | None], sizes: Sequence[tuple[int, int]],
                    rng: np.random.Generator) -> list[int]:
    """Image indices of one epoch in which every person appears as often as the one with most photos.

    A person with fewer photos has each drawn equally often, plus a few drawn once more: which ones
    changes with the epoch, how many of each size does not, so every epoch has the same number of
    batches (the step counter maps to (epoch, batch) with it). 6 photos and 2 give 6 draws of each.
    """
    people: dict[str | None, list[int]] = {}
    for i, subject in enumerate(subjects):
        people.setdefault(subject, []).append(i)
    most = max(len(idx) for idx in people.values())
    draws = []
    for subject in sorted(people, key=str):  # a fixed order: the draws depend on (seed, epoch) alone
        idx = people[subject]
        repeats, extra = divmod(most, len(idx))
        draws += idx * repeats
        buckets: dict[tuple[int, int], list[int]] = {}
        for i in idx:
            buckets.setdefault(tuple(sizes[i]), []).append(i)
        quotas = _shares(extra, {key: len(members) for key, members in buckets.items()})
        for key in sorted(buckets):
            members = buckets[key]
            draws += [members[j] for j in rng.permutation(len(members))[:quotas[key]]]
    return draws


def batch_plan(sizes: Sequence[tuple[int, int]], batch_size: int, *, seed: int, epoch: int,
               subjects: Sequence[str | None] | None = None) -> list[list[int]]:
    """One epoch of batches: images of one size per batch, order a function of (seed, epoch).

    Being a pure function of its arguments, the data order needs no state in a checkpoint:
    step N of a resumed run sees exactly the batch step N of an uninterrupted run saw.

    Args:
        sizes: (width, height) of each image.
        batch_size: images per batch (a bucket's last batch may be smaller).
        seed, epoch: what the order is a function of.
        subjects: the person of each image (several people in one dataset): the epoch then draws
            every person as often as the one with most photos, repeating the others' photos.
            None, or one person: every image once (the order of a one-person run).

    Returns:
        Lists of image indices.
    """
    rng = np.random.default_rng([seed, epoch])
    if subjects is not None and len(subjects) != len(sizes):
        raise ValueError(f"batch_plan: {len(subjects)} subjects for {len(sizes)} images")
    draws = (_balanced_draws(subjects, sizes, rng) if subjects is not None and len(set(subjects)) > 1
             else list(range(len(sizes))))
    groups: dict[tuple[int, int], list[int]] = {}
    for i in draws:
        groups.setdefault(tuple(sizes[i]), []).append(i)
    batches = []
    for key in sorted(groups):
        idx = [groups[key][j] for j in rng.permutation(len(groups[key]))]
        batches += [idx[i:i + batch_size] for i in range(0, len(idx), batch_size)]
    return [batches[j] for j in rng.permutation(len(batches))]
