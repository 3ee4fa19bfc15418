"""Prior preservation: which class images each training image is paired with.

DreamBooth keeps the model's idea of the class ("a photo of a woman") by training on images
the base model made for that class prompt beside the person's photos. With several people of
different classes (a woman and a man), each person's photos are paired with class images of
their own class, so each class keeps its own prior; with one class prompt it is as it always was.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Callable, Sequence

from lora_helpers.core.images import list_images
from lora_helpers.train.data import TrainImage

__all__ = ["class_prompt_of", "prior_prompts", "class_image_sets"]


def class_prompt_of(noun: str | None) -> str:
    """The class prompt of a class noun: ``"a photo of a woman"``."""
    return f"a photo of a {noun or 'person'}"


def prior_prompts(images: Sequence[TrainImage], subjects: dict[str, dict], class_prompt: str | None) -> list[str]:
    """The class prompt each training image is paired with.

    Args:
        images: the training images (each with its person when there are several).
        subjects: person -> {"class_noun", ...} ({} for one person).
        class_prompt: one prompt for everyone (set by the person, or one class noun), or None:
            each person's own class noun.

    Returns:
        One class prompt per image.
    """
    if class_prompt:
        return [class_prompt] * len(images)
    return [class_prompt_of((subjects.get(im.subject) or {}).get("class_noun")) for im in images]


def _folder_name(prompt: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", prompt.lower()).strip("_")


def class_image_sets(folder: Path, prompts: Sequence[str], *, count: int, generate: Callable[..., None],
                     accelerator=None) -> tuple[list[Path], list[str]]:
    """The class images for each distinct class prompt, made where missing.

    One prompt uses ``folder`` itself (as runs always have); several use a subfolder each
    (``class_images/a_photo_of_a_woman/``).

    Args:
        folder: the class-image folder of the run.
        prompts: the class prompts in use (repeats are fine).
        count: images per prompt.
        generate: ``generate(folder, prompt=, start=, count=)`` makes the missing images.
        accelerator: with several processes, the main one makes them while the others wait.

    Returns:
        ``(paths, prompt of each path)``.
    """
    distinct = list(dict.fromkeys(prompts))
    paths, of = [], []
    for prompt in distinct:
        where = folder if len(distinct) == 1 else folder / _folder_name(prompt)
        have = list_images(where) if where.is_dir() else []
        if len(have) < count:
            with accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext():
                if accelerator is None or accelerator.is_main_process:
                    generate(where, prompt=prompt, start=len(have), count=count - len(have))
            have = list_images(where)
        paths += have[:count]
        of += [prompt] * len(have[:count])
    return paths, of
