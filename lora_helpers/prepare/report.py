"""What preparation shows a person: report.csv, a contact sheet and grids of the photos.

The contact sheet puts every input file on one page with its verdict colour (green
pass, orange warn, red reject, grey skip), the face box, the crop outline and the
reasons, so a bad photo is spotted at a glance; a blue "HELD OUT" tag marks the photos
kept out of training for the held-out likeness score. With several people the sheet is
ordered by person, each tile labelled with its person's name in that person's colour, and
report.csv names the person of each photo. report.csv has every number behind it.
"""

from __future__ import annotations

import csv
import io
import textwrap
from pathlib import Path

import numpy as np

from lora_helpers.core import fileio

__all__ = [
    "REPORT_COLUMNS",
    "VERDICT_COLOURS",
    "report_rows",
    "write_report",
    "contact_sheet",
    "accepted_grid",
    "rejected_grid",
]

VERDICT_COLOURS = {"pass": (46, 160, 67), "warn": (230, 145, 20), "reject": (210, 40, 40), "skip": (130, 130, 130)}
HELD_OUT_COLOUR = (40, 90, 200)
HELD_OUT_TAG = "HELD OUT"
# One colour per person on the contact sheet, in order of their first photo (repeats after eight).
SUBJECT_COLOURS = [(120, 60, 170), (0, 128, 128), (180, 70, 120), (90, 110, 30), (150, 90, 40), (60, 60, 160),
                   (20, 120, 60), (160, 50, 50)]

REPORT_COLUMNS = [
    "file", "subject", "verdict", "held_out", "reasons", "notes", "override", "mode", "original_width", "original_height", "faces",
    "face_box", "detection_score", "face_clarity_score", "resize_quality", "limited_by", "score_sharpness", "score_relative_sharpness",
    "score_face_size", "score_exposure", "score_clipping", "sharpness", "sharpness_rel", "brightness",
    "clipped", "face_px", "face_share", "roll_degrees", "identity_similarity", "duplicate_of", "bucket", "crop_box",
    "rotation", "scale", "zoom", "padding", "padding_sides", "eye_x", "eye_y", "image", "mask",
]


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}f}".rstrip("0").rstrip(".") if abs(value) < 1e6 else f"{value:.0f}"
    if isinstance(value, (tuple, list)):
        return " ".join(_fmt(v, 1) for v in value)
    return str(value)


def report_rows(result) -> list[dict[str, str]]:
    """One dict per input file with the :data:`REPORT_COLUMNS` (strings, as in the CSV)."""
    rows = []
    for r in result.records:
        m, c = r.measures, r.crop
        w, h = r.original_size or (None, None)
        row = {
            "file": r.file, "subject": r.subject, "verdict": r.verdict, "held_out": r.held_out if r.accepted else None,
            "reasons": "; ".join(r.reasons), "notes": "; ".join(r.notes),
            "override": r.override, "mode": r.mode, "original_width": w, "original_height": h, "faces": r.faces,
            "face_box": r.face_box, "detection_score": m.get("detection_score"),
            "face_clarity_score": r.face_clarity_score, "resize_quality": r.resize_quality,
            "limited_by": m.get("limited_by"),
            **{f"score_{k}": r.scores.get(k) for k in ("sharpness", "relative_sharpness", "face_size", "exposure", "clipping")},
            "sharpness": m.get("sharpness"), "sharpness_rel": m.get("sharpness_rel"), "brightness": m.get("brightness"),
            "clipped": m.get("clipped"), "face_px": m.get("face_px"), "face_share": m.get("face_share"),
            "roll_degrees": m.get("roll_degrees"), "identity_similarity": m.get("identity_similarity"),
            "duplicate_of": r.duplicate_of, "bucket": c.get("bucket"), "crop_box": c.get("crop_box"),
            "rotation": c.get("rotation"), "scale": c.get("scale"), "zoom": c.get("zoom"), "padding": c.get("padding"),
            "padding_sides": c.get("padding_sides"), "eye_x": c.get("eye_x"), "eye_y": c.get("eye_y"),
            "image": r.image_file, "mask": r.mask_file,
        }
        rows.append({k: _fmt(row[k]) for k in REPORT_COLUMNS})
    return rows


def write_report(result) -> None:
    """Write ``report.csv`` and ``contact_sheet.png`` into ``result.out_dir``."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=REPORT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(report_rows(result))
    fileio.write_text(Path(result.out_dir) / "report.csv", buf.getvalue())
    fileio.save_image(Path(result.out_dir) / "contact_sheet.png", contact_sheet(result))


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap font
        return ImageFont.load_default()


def _tile(image, title: str, lines: list[str], colour, *, width: int = 240, image_height: int = 180, text_lines: int = 6,
          tag: str | None = None, label: tuple[str, tuple[int, int, int]] | None = None):
    """A framed picture with a title and wrapped text under it, ``tag`` on a blue label at its top left and
    ``label`` (text, colour) at its top right."""
    from PIL import Image, ImageDraw

    pad, line_h = 6, 14
    tile = Image.new("RGB", (width, image_height + 2 * pad + (text_lines + 1) * line_h + pad), (255, 255, 255))
    draw = ImageDraw.Draw(tile)
    draw.rectangle([0, 0, tile.width - 1, tile.height - 1], outline=colour, width=4)
    if image is not None:
        im = image.copy()
        im.thumbnail((width - 2 * pad, image_height))
        tile.paste(im, ((width - im.width) // 2, pad + (image_height - im.height) // 2))
    else:
        draw.rectangle([pad, pad, width - pad, pad + image_height], fill=(235, 235, 235))
    y = image_height + 2 * pad
    draw.text((pad + 2, y), title[:34], fill=(0, 0, 0), font=_font(12))
    wrapped = [w for line in lines for w in textwrap.wrap(line, 38)] or [""]
    if len(wrapped) > text_lines:
        wrapped = wrapped[: text_lines - 1] + ["..."]
    for i, text in enumerate(wrapped):
        draw.text((pad + 2, y + (i + 1) * line_h), text, fill=(60, 60, 60), font=_font(11))
    if tag:
        _label(draw, tag, HELD_OUT_COLOUR, x=4)
    if label:
        _label(draw, label[0][:24], label[1], x=-(width - 4))
    return tile


def _label(draw, text: str, colour, *, x: int) -> None:
    """White text on a coloured box 4 px below the top; ``x`` >= 0 is its left edge, < 0 its right edge (negated)."""
    font = _font(12)
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    w = right - left + 10
    x0 = x if x >= 0 else -x - w
    draw.rectangle([x0, 4, x0 + w, 4 + bottom - top + 8], fill=colour)
    draw.text((x0 + 5 - left, 8 - top), text, fill=(255, 255, 255), font=font)


def _held_out(r) -> bool:
    return r.accepted and r.held_out


def _grid(tiles: list, columns: int, gap: int = 6):
    from PIL import Image

    if not tiles:
        return Image.new("RGB", (240, 60), (255, 255, 255))
    w, h = max(t.width for t in tiles), max(t.height for t in tiles)
    columns = max(1, min(columns, len(tiles)))
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (w + gap) + gap, rows * (h + gap) + gap), (255, 255, 255))
    for i, t in enumerate(tiles):
        sheet.paste(t, (gap + (i % columns) * (w + gap), gap + (i // columns) * (h + gap)))
    return sheet


def _annotated(r):
    """The photo's thumbnail with the face box and the crop outline drawn on it."""
    from PIL import ImageDraw

    if r.thumbnail is None:
        return None
    im = r.thumbnail.copy().convert("RGB")
    k = im.width / r.original_size[0]
    draw = ImageDraw.Draw(im)
    quad = r.crop.get("quad")
    if quad is not None:
        pts = [(x * k, y * k) for x, y in quad]
        draw.line(pts + pts[:1], fill=(255, 255, 255), width=1)
    if r.face_box:
        l, t, rr, b = (v * k for v in r.face_box)
        draw.rectangle([l, t, rr, b], outline=VERDICT_COLOURS[r.verdict], width=2)
    return im


def subject_colours(result) -> dict[str, tuple[int, int, int]]:
    """The contact sheet's colour of each person, in order of their first photo ({} for one person)."""
    people = list(dict.fromkeys(r.subject for r in result.records if r.subject))
    return {p: SUBJECT_COLOURS[i % len(SUBJECT_COLOURS)] for i, p in enumerate(people)}


def contact_sheet(result, *, columns: int = 5):
    """Every input file with its verdict colour, face box, crop outline and reasons; held-out photos tagged.

    With several people the tiles are ordered by person (photos of no known person last), each
    labelled with the person's name.

    Returns:
        A PIL image.
    """
    colours = subject_colours(result)
    order = list(colours) + [None]
    tiles = []
    for r in sorted(result.records, key=lambda r: order.index(r.subject)):
        score = f"  clarity {r.face_clarity_score:.2f}" if r.face_clarity_score is not None else ""
        held = ", held out of training" if _held_out(r) else ""
        lines = [f"{r.verdict.upper()}{score}{held}"] + r.reasons
        tiles.append(_tile(_annotated(r), r.file, lines, VERDICT_COLOURS[r.verdict],
                           tag=HELD_OUT_TAG if _held_out(r) else None,
                           label=(r.subject, colours[r.subject]) if r.subject else None))
    return _grid(tiles, columns)


def accepted_grid(result, *, columns: int = 4, masks: bool = False):
    """The accepted crops (as written to ``images/``) with their file names; held-out ones tagged.

    Args:
        result: a :class:`lora_helpers.prepare.records.PrepareResult`.
        columns: tiles per row.
        masks: dim everything outside the face mask, to show what the masked loss weights.

    Returns:
        A PIL image.
    """
    from PIL import Image

    tiles, colours = [], subject_colours(result)
    for r in result.accepted:
        path = Path(result.out_dir) / r.image_file if r.image_file else None
        im = Image.open(path).convert("RGB") if path and path.exists() else r.crop_thumbnail
        if masks and im is not None and r.mask_file and (Path(result.out_dir) / r.mask_file).exists():
            weight = np.asarray(Image.open(Path(result.out_dir) / r.mask_file).convert("L").resize(im.size), dtype=np.float32) / 255.0
            im = Image.fromarray((np.asarray(im, dtype=np.float32) * (0.25 + 0.75 * weight[..., None])).astype(np.uint8))
        if im is not None and im.width > 512:
            im = im.reduce(max(1, im.width // 256))
        tiles.append(_tile(im, r.file, [f"{r.verdict}  {r.crop.get('bucket', '')}"], VERDICT_COLOURS[r.verdict], text_lines=1,
                           tag=HELD_OUT_TAG if _held_out(r) else None,
                           label=(r.subject, colours[r.subject]) if r.subject else None))
    return _grid(tiles, columns)


def rejected_grid(result, *, columns: int = 4):
    """The photos not used (rejected or skipped), each with the reasons."""
    tiles = [_tile(_annotated(r), r.file, [r.verdict.upper()] + r.reasons, VERDICT_COLOURS[r.verdict])
             for r in result.records if not r.accepted]
    return _grid(tiles, columns)
