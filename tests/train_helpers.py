"""A small captioned dataset in the prepare/caption contract, for the training tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# (left, top, right, bottom) crops of skimage's astronaut around the face, and their output size:
# four square 64 px images and two 56x72 portrait ones, so the trainer sees two aspect buckets.
_CROPS = [
    ((120, 20, 320, 220), (64, 64)), ((140, 50, 300, 210), (64, 64)), ((100, 0, 360, 260), (64, 64)),
    ((160, 70, 290, 200), (64, 64)), ((150, 20, 310, 226), (56, 72)), ((130, 10, 320, 254), (56, 72)),
]
CAPTIONS = [
    "a photo of TOK person in a white suit", "a close up photo of TOK person smiling",
    "a photo of TOK person in front of a flag", "a portrait of TOK person",
    "a photo of TOK person with short hair", "a photo of TOK person, nasa astronaut suit",
]


def make_dataset(folder: Path, *, n: int = 6, with_captions: bool = True) -> Path:
    """Write images/, masks/, metadata.jsonl, .txt sidecars and caption_config.json into ``folder``."""
    from skimage import data

    astronaut = Image.fromarray(data.astronaut()[..., :3])
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (box, size) in enumerate(_CROPS[:n]):
        stem = f"astronaut_{i:02d}"
        image = astronaut.crop(box).resize(size, Image.Resampling.LANCZOS)
        image.save(folder / "images" / f"{stem}.png")
        mask = Image.new("L", size, 0)
        w, h = size
        ImageDraw.Draw(mask).ellipse((w * 0.25, h * 0.15, w * 0.75, h * 0.75), fill=255)
        mask.save(folder / "masks" / f"{stem}.png")
        row = {"file_name": f"images/{stem}.png", "mask_file": f"masks/{stem}.png",
               "original_size": [box[3] - box[1], box[2] - box[0]], "crop_top_left": [box[1], box[0]],
               "source": "astronaut.png"}
        if with_captions:
            row["text"] = CAPTIONS[i]
            (folder / "images" / f"{stem}.txt").write_text(CAPTIONS[i] + "\n", encoding="utf-8")
        rows.append(row)
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    if with_captions:
        (folder / "caption_config.json").write_text(json.dumps({"trigger": "TOK person", "class_noun": "person"}))
    return folder


TWO_PEOPLE = {"astronaut": {"trigger": "TOK1 person", "token": "TOK1", "class_noun": "person"},
              "grace": {"trigger": "TOK2 person", "token": "TOK2", "class_noun": "person"}}


def grace_hopper() -> Image.Image:
    """Matplotlib's public-domain photo of Grace Hopper: a second person beside the astronaut."""
    from matplotlib import cbook

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        return Image.open(f).convert("RGB")


def make_two_person_dataset(folder: Path, *, n_astronaut: int = 6, n_grace: int = 2) -> Path:
    """The astronaut dataset of :func:`make_dataset` plus crops of Grace Hopper, each row naming its person,
    and caption_config.json's "subjects" (TOK1 person, TOK2 person), as prepare and caption write them."""
    make_dataset(folder, n=n_astronaut)
    rows = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        row["subject"] = "astronaut"
        row["text"] = row["text"].replace("TOK person", "TOK1 person")
        (folder / row["file_name"]).with_suffix(".txt").write_text(row["text"] + "\n", encoding="utf-8")
    grace = grace_hopper()  # 512 x 600, face around (200, 150)-(330, 330)
    boxes = [(150, 80, 390, 320), (170, 110, 350, 290), (130, 60, 410, 340), (180, 100, 340, 260)]
    for i in range(n_grace):
        stem, box = f"grace_{i:02d}", boxes[i % len(boxes)]
        image = grace.crop(box).resize((64, 64), Image.Resampling.LANCZOS)
        if i % 2:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        image.save(folder / "images" / f"{stem}.png")
        mask = Image.new("L", (64, 64), 0)
        ImageDraw.Draw(mask).ellipse((16, 10, 48, 48), fill=255)
        mask.save(folder / "masks" / f"{stem}.png")
        text = ["a photo of TOK2 person in uniform", "a portrait of TOK2 person"][i % 2]
        (folder / "images" / f"{stem}.txt").write_text(text + "\n", encoding="utf-8")
        rows.append({"file_name": f"images/{stem}.png", "mask_file": f"masks/{stem}.png", "subject": "grace",
                     "original_size": [box[3] - box[1], box[2] - box[0]], "crop_top_left": [box[1], box[0]],
                     "source": "grace_hopper.jpg", "text": text})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "caption_config.json").write_text(json.dumps({"subjects": TWO_PEOPLE, "class_noun": "person"}))
    return folder


def image_diff(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference (0-255)."""
    return float(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).mean())


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())
