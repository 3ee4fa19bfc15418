"""What a run trains on: the images with their captions and masks, their aspect buckets, and the batch order.

Rows that preparation marked ``"held_out": true`` are never trained on (evaluation scores
likeness on them), and crops whose ``resize_quality`` is below ``min_resize_quality`` are
skipped; a row without the field counts as 1.0. With ``weight_by_resize_quality`` each
image's loss is scaled by its score (:func:`loss_weights`).

The batch order is a pure function of (seed, epoch) (:func:`batch_plan`), so a resumed run
sees at step N exactly the batch an uninterrupted run saw; nothing about it is checkpointed.
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
from lora_helpers.core.run_folder import HELD_OUT_FIELD, METADATA_FILE, RESIZE_QUALITY_FIELD

__all__ = ["TrainImage", "read_training_images", "loss_weights", "batch_plan"]


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
    """

    file_name: str
    path: Path
    caption: str
    mask_path: Path | None = None
    original_size: tuple[int, int] | None = None
    crop_top_left: tuple[int, int] = (0, 0)
    resize_quality: float = 1.0


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
                                 crop_top_left=_pair(row.get("crop_top_left"), (0, 0)), resize_quality=quality))
    if held_out:
        print(f"{len(held_out)} photo(s) held out of training for the likeness score: {', '.join(held_out)}")
    if too_poor:
        print(f"{len(too_poor)} crop(s) skipped, resize quality below min_resize_quality {min_resize_quality:g}: "
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


def batch_plan(sizes: Sequence[tuple[int, int]], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """One epoch of batches: images of one size per batch, order a function of (seed, epoch).

    Being a pure function of its arguments, the data order needs no state in a checkpoint:
    step N of a resumed run sees exactly the batch step N of an uninterrupted run saw.

    Args:
        sizes: (width, height) of each image.
        batch_size: images per batch (a bucket's last batch may be smaller).
        seed, epoch: what the order is a function of.

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
