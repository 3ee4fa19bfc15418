"""Labelled image grids and PNG files that remember how they were made.

A grid is how people judge a LoRA: the same prompt across seeds, the same seed across
LoRA strengths, the same prompt across training checkpoints. Labels must stay readable
whether a cell is 64 px (smoke mode) or 1024 px, so the font scales with the cell and
never drops below a legible size; long prompts wrap and are cut with an ellipsis rather
than spilling over the pictures.

Every PNG we save carries its generation parameters as PNG text chunks, so a picture
found in a folder months later can be reproduced (``PIL.Image.open(path).text``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from lora_helpers.core.fileio import write_bytes
from lora_helpers.core.png import png_bytes

__all__ = [
    "GridLayout",
    "grid_layout",
    "make_grid",
    "save_png_with_metadata",
    "read_png_metadata",
]

_BACKGROUND = (255, 255, 255)
_INK = (20, 20, 20)
_EMPTY_CELL = (200, 200, 200)
_MIN_FONT_PX = 14  # below this, labels on smoke-mode 64 px grids become unreadable


@dataclass(frozen=True)
class GridLayout:
    """Where everything sits in a grid (pixel boxes are ``(left, top, right, bottom)``).

    Attributes:
        rows, cols: grid shape.
        cell_w, cell_h: size of one image cell.
        gap: pixels between cells.
        font_px: label font size.
        title_h: height of the title band (0 without a title).
        col_label_h: height of the column-label band (0 without column labels).
        row_label_w: width of the row-label column (0 without row labels).
        width, height: size of the whole grid image.
    """

    rows: int
    cols: int
    cell_w: int
    cell_h: int
    gap: int
    font_px: int
    title_h: int
    col_label_h: int
    row_label_w: int
    width: int
    height: int

    def cell_box(self, row: int, col: int) -> tuple[int, int, int, int]:
        """Box of the image cell at ``(row, col)``."""
        left = self.row_label_w + self.gap + col * (self.cell_w + self.gap)
        top = self.title_h + self.col_label_h + self.gap + row * (self.cell_h + self.gap)
        return left, top, left + self.cell_w, top + self.cell_h

    def row_label_box(self, row: int) -> tuple[int, int, int, int]:
        """Box of the label left of row ``row``."""
        _, top, _, bottom = self.cell_box(row, 0)
        return 0, top, self.row_label_w, bottom

    def col_label_box(self, col: int) -> tuple[int, int, int, int]:
        """Box of the label above column ``col``."""
        left, _, right, _ = self.cell_box(0, col)
        return left, self.title_h, right, self.title_h + self.col_label_h

    def title_box(self) -> tuple[int, int, int, int]:
        """Box of the title band."""
        return 0, 0, self.width, self.title_h


@lru_cache(maxsize=16)
def _font(px: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=px)  # scalable font bundled with Pillow >= 10.1 (FreeType)
    except (TypeError, OSError, ImportError):  # pragma: no cover - Pillow without FreeType
        return ImageFont.load_default()


def _line_height(font) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return int((bottom - min(top, 0)) * 1.2) + 1


def _text_width(font, text: str) -> float:
    return font.getlength(text) if hasattr(font, "getlength") else font.getbbox(text)[2]


def _wrap(text: str, font, max_width: int, max_lines: int) -> list[str]:
    """Wrap ``text`` to ``max_width`` pixels, keeping explicit newlines; cut with an ellipsis."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if _text_width(font, candidate) <= max_width:
                line = candidate
                continue
            if line:
                lines.append(line)
            # A single word wider than the box (a long token, a file name): break it by characters.
            while _text_width(font, word) > max_width and len(word) > 1:
                cut = len(word)
                while cut > 1 and _text_width(font, word[:cut]) > max_width:
                    cut -= 1
                lines.append(word[:cut])
                word = word[cut:]
            line = word
        lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        last = lines[-1]
        while last and _text_width(font, last + "…") > max_width:
            last = last[:-1]
        lines[-1] = last + "…"
    return lines


def grid_layout(
    rows: int,
    cols: int,
    cell_size: tuple[int, int],
    *,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
) -> GridLayout:
    """Compute the geometry of a grid (used by :func:`make_grid`; handy for tests and overlays).

    Args:
        rows, cols: grid shape (both at least 1).
        cell_size: ``(width, height)`` of one cell.
        row_labels: one label per row, or None for no row-label column.
        col_labels: one label per column, or None for no column-label band.
        title: text above the grid, or None.

    Returns:
        A :class:`GridLayout`.

    Raises:
        ValueError: for a shape below 1x1 or a label list of the wrong length.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"a grid needs at least one row and one column, got rows={rows}, cols={cols}")
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"got {len(row_labels)} row labels for {rows} rows")
    if col_labels is not None and len(col_labels) != cols:
        raise ValueError(f"got {len(col_labels)} column labels for {cols} columns")
    cell_w, cell_h = int(cell_size[0]), int(cell_size[1])
    # ~6 % of the cell: still legible when a notebook shrinks a 3 x 1024 px grid to its width
    font_px = max(_MIN_FONT_PX, round(min(cell_w, cell_h) * 0.06))
    font = _font(font_px)
    line_h = _line_height(font)
    pad = max(2, font_px // 3)
    gap = max(2, min(cell_w, cell_h) // 128)

    row_label_w = 0
    if row_labels is not None:
        # At most: a dozen characters even when cells are tiny, else half a cell; at least the longest label line.
        widest = max(12 * font_px, min(cell_w // 2, 24 * font_px))
        longest = max((_text_width(font, line) for lbl in row_labels for line in str(lbl).split("\n")), default=0)
        row_label_w = int(min(widest, longest + 2 * pad + 1))
    col_label_h = 0
    if col_labels is not None:
        n_lines = max(len(_wrap(lbl, font, cell_w - 2 * pad, 3)) for lbl in col_labels)
        col_label_h = n_lines * line_h + 2 * pad
    title_h = 0
    if title:
        title_font = _font(round(font_px * 1.25))
        width_guess = row_label_w + cols * (cell_w + gap) + gap
        n_lines = len(_wrap(title, title_font, width_guess - 2 * pad, 2))
        title_h = n_lines * _line_height(title_font) + 2 * pad

    width = row_label_w + gap + cols * (cell_w + gap)
    height = title_h + col_label_h + gap + rows * (cell_h + gap)
    return GridLayout(rows=rows, cols=cols, cell_w=cell_w, cell_h=cell_h, gap=gap, font_px=font_px,
                      title_h=title_h, col_label_h=col_label_h, row_label_w=row_label_w, width=width, height=height)


def make_grid(
    images: Sequence[Image.Image | None],
    *,
    rows: int,
    cols: int,
    row_labels: Sequence[str] | None = None,
    col_labels: Sequence[str] | None = None,
    title: str | None = None,
    cell_size: tuple[int, int] | None = None,
) -> Image.Image:
    """Paste images into a labelled grid, row by row.

    Args:
        images: up to ``rows * cols`` images in row-major order; None (a failed image)
            and missing trailing cells are drawn as grey placeholders.
        rows, cols: grid shape.
        row_labels: text left of each row (e.g. the prompt), or None.
        col_labels: text above each column (e.g. "seed 3", "scale 0.8"), or None.
        title: text above everything, or None.
        cell_size: ``(width, height)`` of each cell; default: the first image's size.
            Images of another size are resized to it.

    Returns:
        An RGB ``PIL.Image``; in a notebook it shows inline as the last expression of a cell.

    Raises:
        ValueError: with no images, more images than cells, or wrong label counts.
    """
    images = list(images)
    if not images or all(im is None for im in images):
        raise ValueError("make_grid got no images")
    if len(images) > rows * cols:
        raise ValueError(f"{len(images)} images do not fit a {rows}x{cols} grid")
    if cell_size is None:
        cell_size = next(im for im in images if im is not None).size
    layout = grid_layout(rows, cols, cell_size, row_labels=row_labels, col_labels=col_labels, title=title)
    grid = Image.new("RGB", (layout.width, layout.height), _BACKGROUND)
    draw = ImageDraw.Draw(grid)
    font = _font(layout.font_px)
    line_h = _line_height(font)
    pad = max(2, layout.font_px // 3)

    for index in range(rows * cols):
        r, c = divmod(index, cols)
        box = layout.cell_box(r, c)
        image = images[index] if index < len(images) else None
        if image is None:
            draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=_EMPTY_CELL)
            if index < len(images):  # a real slot whose image failed, not padding
                draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), "failed", fill=_INK, font=font, anchor="mm")
            continue
        if image.mode != "RGB":
            image = image.convert("RGB")
        if image.size != (layout.cell_w, layout.cell_h):
            image = image.resize((layout.cell_w, layout.cell_h), Image.LANCZOS)
        grid.paste(image, box[:2])

    if row_labels is not None:
        max_lines = max(1, (layout.cell_h - 2 * pad) // line_h)
        for r, label in enumerate(row_labels):
            left, top, right, bottom = layout.row_label_box(r)
            lines = _wrap(label, font, right - left - 2 * pad, max_lines)
            y = (top + bottom) / 2 - len(lines) * line_h / 2
            for line in lines:
                draw.text((left + pad, y), line, fill=_INK, font=font)
                y += line_h
    if col_labels is not None:
        for c, label in enumerate(col_labels):
            left, top, right, bottom = layout.col_label_box(c)
            lines = _wrap(label, font, right - left - 2 * pad, 3)
            y = bottom - pad - len(lines) * line_h
            for line in lines:
                draw.text(((left + right) / 2, y), line, fill=_INK, font=font, anchor="ma")
                y += line_h
    if title:
        title_font = _font(round(layout.font_px * 1.25))
        lines = _wrap(title, title_font, layout.width - 2 * pad, 2)
        y = pad
        for line in lines:
            draw.text((pad, y), line, fill=_INK, font=title_font)
            y += _line_height(title_font)
    return grid


def _to_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, default=str, ensure_ascii=False)


def save_png_with_metadata(path: str | os.PathLike, image: Image.Image, params: dict[str, Any]) -> Path:
    """Save ``image`` as PNG with ``params`` as text chunks, atomically.

    Args:
        path: destination; must end in ``.png`` (JPEG would drop the metadata).
        image: the picture.
        params: one text chunk per key; strings are stored as they are, anything else
            as JSON. Non-Latin-1 text (prompts in any language) goes to iTXt chunks.

    Returns:
        The path. ``PIL.Image.open(path).text`` gives the parameters back as strings.
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"{path}: generation parameters are stored as PNG text; use a .png file name")
    return write_bytes(path, png_bytes(image, text={str(key): _to_text(value) for key, value in params.items()}))


def read_png_metadata(path: str | os.PathLike) -> dict[str, str]:
    """Return the PNG text chunks of ``path`` (what :func:`save_png_with_metadata` wrote)."""
    with Image.open(path) as im:
        im.load()
        return dict(getattr(im, "text", {}) or {})
