"""What a notebook needs from the stage before it, or a clear word on which notebook to run first.

Each notebook runs on its own: in smoke mode (CI, a first try on a CPU) a missing input is
made here with the library from ``sample_data/``, so every later cell runs the code a Colab
user runs; otherwise the person is told which notebook writes it. This is the only place
such stand-ins are made, so user-facing cells hold none of it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Literal, Sequence

from lora_helpers.caption import CaptionConfig, caption_dataset, load_captions, load_clip_tokenizer
from lora_helpers.core.config import default_resolution, smoke_mode
from lora_helpers.core.images import list_images
from lora_helpers.core.run_folder import CONFIG_FILE, LORA_WEIGHT_NAME, METADATA_FILE, list_checkpoints
from lora_helpers.prepare import PrepareConfig, prepare_photos
from lora_helpers.train import TrainConfig, train

__all__ = ["SAMPLE_DATA_ENV", "sample_photos_dir", "stage_input"]

SAMPLE_DATA_ENV = "LORA_HELPERS_SAMPLE_DATA"

Kind = Literal["photos", "dataset", "captions", "run"]
_WRITTEN_BY = {
    "photos": "upload them with the upload cell, or copy 5-15 photos of the person into that folder",
    "dataset": "run 01_prepare_photos first (same workspace)",
    "captions": "run 02_caption_photos first (same workspace)",
    "run": "run 03_train_lora first (same workspace)",
}


def sample_photos_dir(person: str = "person") -> Path | None:
    """``sample_data/<person>`` of this repository, wherever it can be found.

    Looked for in ``LORA_HELPERS_SAMPLE_DATA``, beside the package (a checkout), in the working
    folder and its parents, and in a clone folder inside the working folder (Colab's /content).

    Returns:
        The folder, or None when there is no copy of the repository at hand.
    """
    cwd = Path.cwd()
    candidates = [Path(os.environ[SAMPLE_DATA_ENV])] if os.environ.get(SAMPLE_DATA_ENV) else []
    candidates += [Path(__file__).resolve().parents[1] / "sample_data"]
    candidates += [folder / "sample_data" for folder in (cwd, *cwd.parents)]
    candidates += sorted(cwd.glob("*/sample_data"))
    for root in candidates:
        if (root / person).is_dir() and list_images(root / person):
            return root / person
    return None


def _smoke_photos() -> Path:
    photos = sample_photos_dir()
    if photos is None:
        raise FileNotFoundError(f"smoke mode needs the repository's sample_data/ folder; set {SAMPLE_DATA_ENV}")
    return photos


def _two_people(folder: Path, subjects: str) -> Path:
    """The sample astronaut and Grace Hopper copied beside ``folder``: a subfolder each ("folders") or mixed ("group")."""
    target = folder.parent / f"sample_two_people_{subjects}"
    for person, source in (("astronaut", _smoke_photos()), ("grace_hopper", sample_photos_dir("other_person"))):
        if source is None:
            raise FileNotFoundError(f"two people in smoke mode need sample_data/other_person/; set {SAMPLE_DATA_ENV}")
        into = target / person if subjects == "folders" else target
        into.mkdir(parents=True, exist_ok=True)
        for photo in list_images(source):
            if not (into / photo.name).is_file():
                shutil.copyfile(photo, into / photo.name)  # copies: the sample photos stay as they are
    return target


def _captions_problem(dataset_dir: Path) -> str | None:
    if not (dataset_dir / METADATA_FILE).is_file():
        return f"{dataset_dir} has no {METADATA_FILE}"
    try:
        load_captions(dataset_dir)
    except (ValueError, FileNotFoundError) as problem:
        return str(problem)
    return None


def _has_run(run_dir: Path) -> bool:
    return (run_dir / CONFIG_FILE).is_file() and (
        (run_dir / LORA_WEIGHT_NAME).is_file() or bool(list_checkpoints(run_dir, resumable=False)))


def stage_input(kind: Kind, folder: str | os.PathLike, *, dataset_dir: str | os.PathLike | None = None,
                validation_hook: Callable | Sequence[Callable] | None = None, subjects: str = "auto") -> Path:
    """Check that a notebook's input is there; in smoke mode make it when it is not.

    Args:
        kind: "photos" (a folder of photos), "dataset" (prepared by 01), "captions" (a
            dataset captioned by 02) or "run" (a run folder trained by 03).
        folder: where the notebook expects it.
        dataset_dir: for "run": the dataset a stand-in run is trained on.
        validation_hook: for "run": passed to the stand-in run's ``train``.
        subjects: for "photos" in smoke mode: "folders" or "group" stand in two people (the sample
            astronaut and Grace Hopper, copied into a subfolder each, or into one mixed folder, beside
            ``folder``); anything else the one sample person.

    Returns:
        The folder to use: ``folder``, or for "photos" in smoke mode with none there, the
        sample photos.

    Raises:
        FileNotFoundError: the input is missing outside smoke mode; says which notebook writes it.
    """
    folder = Path(folder)
    smoke = smoke_mode()
    if kind == "photos":
        if folder.is_dir() and list_images(folder):
            return folder
        if smoke and subjects in ("folders", "group"):
            photos = _two_people(folder, subjects)
            print(f"smoke mode: no photos in {folder}; using two sample people in {photos}")
            return photos
        if smoke:
            photos = _smoke_photos()
            print(f"smoke mode: no photos in {folder}; using the sample photos in {photos}")
            return photos
        raise FileNotFoundError(f"no photos in {folder}: {_WRITTEN_BY['photos']}")
    if kind == "dataset":
        if (folder / "images").is_dir() and (folder / METADATA_FILE).is_file():
            return folder
        if not smoke:
            raise FileNotFoundError(f"{folder} holds no prepared photos: {_WRITTEN_BY['dataset']}")
        print(f"smoke mode: preparing the sample photos into {folder}")
        prepare_photos(_smoke_photos(), folder, config=PrepareConfig(resolution=default_resolution()), progress=False)
        return folder
    if kind == "captions":
        stage_input("dataset", folder)
        problem = _captions_problem(folder)
        if problem is None:
            return folder
        if not smoke:
            raise FileNotFoundError(f"{problem}: {_WRITTEN_BY['captions']}")
        print(f"smoke mode: captioning {folder} with the tiny BLIP")
        caption_dataset(folder, config=CaptionConfig(), tokenizer=load_clip_tokenizer(download=False), progress=False)
        return folder
    if kind == "run":
        if _has_run(folder):
            return folder
        if not smoke:
            raise FileNotFoundError(f"{folder} holds no trained LoRA: {_WRITTEN_BY['run']}")
        if dataset_dir is None:
            raise ValueError("stage_input('run', ...) in smoke mode needs dataset_dir= to train a stand-in run")
        dataset = stage_input("captions", dataset_dir)
        print(f"smoke mode: training a tiny stand-in run into {folder}")
        config = TrainConfig.from_preset("cpu-smoke", max_train_steps=6, checkpointing_steps=3, validation_steps=3)
        train(dataset, folder, config=config, resume="latest", validation_hook=validation_hook)
        return folder
    raise ValueError(f"kind must be photos, dataset, captions or run, not {kind!r}")
