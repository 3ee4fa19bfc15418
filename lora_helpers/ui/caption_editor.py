"""A caption editor for notebooks: each image beside its caption, edited and saved back.

Saving goes through :func:`lora_helpers.caption.save_caption`, so the ``.txt`` sidecar and
``metadata.jsonl`` stay in step and a later caption run keeps the edits.
"""

from __future__ import annotations

import html
from pathlib import Path

from lora_helpers.caption import (
    CLIP_MAX_TOKENS, CaptionError, caption_table, clip_token_count, count_identifier, save_caption,
)
from lora_helpers.core.images import ImageLoadError, load_image
from lora_helpers.core.png import png_bytes
from lora_helpers.core.run_folder import read_caption_config

__all__ = ["caption_editor"]


def _thumbnail_png(path: Path, size: int) -> bytes:
    try:
        image = load_image(path)
    except ImageLoadError:
        from PIL import Image

        image = Image.new("RGB", (size, size), (200, 200, 200))  # placeholder; the status line says why
    image.thumbnail((size, size))
    return png_bytes(image)


def _status(text: str, identifier: str | None, tokenizer) -> str:
    text = text.strip()
    if not text:
        return "<span style='color:#b00'>empty caption: write one</span>"
    n = clip_token_count(text, tokenizer)
    parts = [f"{n} / {CLIP_MAX_TOKENS} CLIP tokens" + ("" if tokenizer is not None else " (estimate)")]
    colour = "#070"
    if n > CLIP_MAX_TOKENS:
        parts.append("too long: SDXL cuts the end off")
        colour = "#b00"
    if identifier:
        k = count_identifier(text, identifier)
        if k != 1:
            parts.append(f"{html.escape(identifier)} appears {k} times (want once)")
            colour = "#b00"
    return f"<span style='color:{colour}'>" + " · ".join(parts) + "</span>"


def caption_editor(dataset_dir: str | Path, *, identifier: str | None = None, tokenizer=None,
                   thumb_size: int = 192):
    """An ipywidgets editor: one row per image with a thumbnail, the caption and a save button.

    Args:
        dataset_dir: the captioned dataset folder.
        identifier: the word each caption needs once; None reads ``caption_config.json``.
        tokenizer: CLIP tokenizer for token counts; None shows estimates.
        thumb_size: thumbnail size in pixels.

    Returns:
        An ``ipywidgets.VBox`` (display it, or let it be a cell's last expression).
    """
    import ipywidgets as w

    dataset_dir = Path(dataset_dir)
    rows = caption_table(dataset_dir, identifier=identifier, tokenizer=tokenizer)
    if identifier is None:
        identifier = read_caption_config(dataset_dir).get("identifier")
    editors = []
    boxes = []
    for row in rows:
        area = w.Textarea(value=row.text or "", layout=w.Layout(width="100%", height="5em"))
        status = w.HTML(_status(area.value, identifier, tokenizer) if row.path.is_file()
                        else "<span style='color:#b00'>image file missing</span>")
        button = w.Button(description="Save", icon="save", layout=w.Layout(width="8em"))

        def on_change(change, status=status):
            status.value = _status(change["new"], identifier, tokenizer)

        def on_save(_, area=area, status=status, name=row.file_name):
            try:
                area.value = save_caption(dataset_dir, name, area.value)
                status.value = _status(area.value, identifier, tokenizer) + " · saved"
            except CaptionError as exc:
                status.value = f"<span style='color:#b00'>{html.escape(str(exc))}</span>"

        area.observe(on_change, names="value")
        button.on_click(on_save)
        editors.append((area, button))
        image = w.Image(value=_thumbnail_png(row.path, thumb_size), format="png",
                        layout=w.Layout(width=f"{thumb_size}px", min_width=f"{thumb_size}px"))
        right = w.VBox([w.HTML(f"<b>{html.escape(row.file_name)}</b>"), area, w.HBox([button, status])],
                       layout=w.Layout(width="100%"))
        boxes.append(w.HBox([image, right], layout=w.Layout(margin="0 0 8px 0")))

    save_all = w.Button(description="Save all", icon="save", button_style="primary")

    def on_save_all(_):
        for _area, button in editors:
            button.click()

    save_all.on_click(on_save_all)
    header = w.HTML("<b>Edit, press Save, then run the next cell.</b> Under <i>Run all</i> the next cell "
                    "has already checked the captions as they were: run it again after editing.")
    return w.VBox([header, save_all, *boxes])
