"""One photo, start to finish: read it, find the face, measure it, plan the crop and render
the training image and mask.

:func:`process_photo` records every finding on a :class:`PhotoRecord` and stops early
(before the identity embedding, the aligned crop and the PNG encoding, the costly part)
once a photo is rejected. Checks that need the whole set come later, in
:mod:`lora_helpers.prepare.judge`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image

from lora_helpers.core.buckets import nearest_bucket
from lora_helpers.core.images import IMAGE_SUFFIXES, ImageLoadError
from lora_helpers.core.png import encode_png
from lora_helpers.prepare import align, quality
from lora_helpers.prepare.config import PrepareConfig
from lora_helpers.prepare.faces import FaceBackend, detect_faces
from lora_helpers.prepare.lazy_photo import open_photo
from lora_helpers.prepare.records import PhotoRecord

__all__ = ["process_photo"]


def _peek_mode(path: Path) -> str | None:
    try:
        with Image.open(path) as im:
            return im.mode
    except Exception:
        return None


def _thumbnail(image, side: int = 256, *, reduce_by: int | None = None) -> Image.Image:
    """A small copy for the contact sheet; ``reduce_by`` matches detection's shrink factor
    so a :class:`~lora_helpers.prepare.lazy_photo.LazyPhoto` reduces a 12-MP frame only once."""
    import cv2

    if not isinstance(image, np.ndarray):
        k = reduce_by or min(image.size) // (2 * side)
        image = np.asarray(image.reduce(k) if k >= 2 else image if isinstance(image, Image.Image) else image.convert("RGB"))
    scale = min(1.0, side / max(image.shape[:2]))
    size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
    # One area resize: half the time of PIL's bicubic, and the same perceptual hashes on our samples.
    return Image.fromarray(cv2.resize(image, size, interpolation=cv2.INTER_AREA))


def _align_spec(config: PrepareConfig) -> align.AlignSpec:
    return align.AlignSpec(eye_y=config.eye_y, face_fraction=config.face_fraction,
                           max_upscale=config.max_upscale, max_zoom=config.max_zoom)


def _micro_conditioning(alignment: align.Alignment, image_size: tuple[int, int]) -> dict:
    """SDXL ``original_size`` and ``crop_top_left`` for an aligned crop.

    The photo is taken at the crop's scale; ``crop_top_left`` is where the
    (unrotated) crop starts in that scaled photo, kept inside it.
    """
    s = alignment.scale
    iw, ih = image_size
    w, h = alignment.out_size
    oh, ow = round(ih * s), round(iw * s)
    centre = (alignment.inverse @ np.array([(w - 1) / 2.0, (h - 1) / 2.0, 1.0]))
    left = centre[0] * s - w / 2.0
    top = centre[1] * s - h / 2.0
    left = min(max(left, 0.0), max(ow - w, 0))
    top = min(max(top, 0.0), max(oh - h, 0))
    return {"original_size": [int(oh), int(ow)], "crop_top_left": [int(round(top)), int(round(left))]}


def process_photo(path: Path, name: str, config: PrepareConfig, backend: FaceBackend,
                  override: str | None) -> PhotoRecord:
    """Load, detect, measure and render one photo; set-level checks come later.

    Args:
        path: the photo file (only read).
        name: the file's name in the report (with its folder when two folders share a name).
        config: the stage's settings.
        backend: the face backend that detects and embeds faces.
        override: "accept", "reject" or None; an accepted photo is rendered whatever the
            checks find (without a face, as a plain centre crop).

    Returns:
        The photo's record: measures, issues, crop and, for photos still in the running,
        the rendered PNG bytes of crop and mask (verdict and reasons come later).
    """
    rec = PhotoRecord(file=name, path=path, override=override)
    if path.suffix.lower() not in IMAGE_SUFFIXES:
        rec.add("skip", f"not a photo ({path.suffix or 'no suffix'} file): ignored")
        return rec
    rec.mode = _peek_mode(path)
    try:
        image = open_photo(path)
    except ImageLoadError as exc:
        rec.add("reject", f"cannot be read: {exc.reason}")
        return rec
    width, height = image.size
    rec.original_size = (width, height)
    if rec.mode and rec.mode not in ("RGB",):
        rec.notes.append({"CMYK": "CMYK converted to RGB", "RGBA": "transparency composited onto white",
                          "P": "palette image converted to RGB", "LA": "transparency composited onto white",
                          "I;16": "16-bit image scaled to 8-bit", "I": "32-bit image scaled to 8-bit",
                          "L": "grey image converted to RGB"}.get(rec.mode, f"{rec.mode} converted to RGB"))
    rec.thumbnail = _thumbnail(image, reduce_by=math.ceil(max(width, height) / config.detect_max_side))

    short = min(width, height)
    rec.measures["short_side"] = short
    if short < config.min_short_side:
        rec.add("reject", f"image too small ({width}x{height} px; needs at least {config.min_short_side} px on the short side, {config.ideal_short_side} ideal)")
    elif short < config.ideal_short_side:
        rec.add("warn", f"low resolution ({width}x{height} px; {config.ideal_short_side} px on the short side is ideal)")
    if quality.is_grayscale(rec.thumbnail):
        rec.add("warn", "grayscale photo: colour is missing, so the LoRA may learn a grey face; prefer colour photos")
        rec.measures["grayscale"] = True

    faces = detect_faces(image, backend=backend, max_side=config.detect_max_side)
    rec.faces = len(faces)
    bucket = nearest_bucket(width, height, resolution=config.resolution, square_only=config.square_only)
    small = np.asarray(rec.thumbnail)
    rec.phash = quality.perceptual_hash(small)

    if not faces:
        # A face blurred beyond recognition still shows up as a faint detection.
        faint = detect_faces(image, backend=backend, max_side=config.detect_max_side, min_score=-0.5, verify=False)
        if faint and quality.measure_face(image, faint[0]).sharpness < config.min_sharpness:
            rec.add("reject", "face too blurry to use (it is barely detectable); use a sharp photo")
        else:
            rec.add("reject", "no face found; use photos where the face is visible and roughly frontal")
        if override == "accept":  # the user wants it anyway: a plain centre crop
            alignment = align.centre_alignment((width, height), bucket)
            rendered = align.warp(image, alignment, pad=config.padding)
            full = np.full(rendered.shape[:2], 255, np.uint8)
            _describe_crop(rec, alignment, (width, height))
            _store_render(rec, rendered, full)
        return rec

    face = faces[0]
    rec.face_box = tuple(round(v, 1) for v in face.box)
    rec.measures.update(detection_score=face.score, face_px=face.size, face_share=face.size / short, roll_degrees=face.roll_degrees)
    big = [f for f in faces[1:] if f.area >= config.second_face_ratio * face.area]
    if big:
        rec.add("reject", f"{1 + len(big)} large faces: unclear which person to learn; crop the photo to one person")
    elif len(faces) > 1:
        rec.add("warn", f"{len(faces) - 1} more small face(s) in the background; they stay in the training image")
    if face.size < config.min_face_px:
        rec.add("reject", f"face too small ({face.size:.0f} px across; needs {config.min_face_px:.0f}, {config.good_face_px:.0f}+ ideal)")
    elif face.size < config.good_face_px:
        rec.add("warn", f"small face ({face.size:.0f} px across; {config.good_face_px:.0f}+ px gives more detail)")
    elif face.size / short < 0.06:
        rec.add("warn", f"face small in the frame ({face.size / short:.0%} of the short side); a closer photo gives more detail")
    if abs(face.roll_degrees) > config.max_roll:
        rec.add("warn", f"head tilted {face.roll_degrees:+.0f} deg; levelled in the crop, but strong tilts look unnatural")

    fm = quality.measure_face(image, face)
    rec.measures.update(sharpness=fm.sharpness, brightness=fm.brightness, clipped=fm.clipped)
    b_rej_lo, b_warn_lo, b_warn_hi, b_rej_hi = config.brightness_limits
    if fm.brightness < b_rej_lo:
        rec.add("reject", f"face too dark (mean level {fm.brightness:.0f} of 255)")
    elif fm.brightness > b_rej_hi:
        rec.add("reject", f"face overexposed (mean level {fm.brightness:.0f} of 255)")
    elif fm.brightness < b_warn_lo:
        rec.add("warn", f"face underexposed (mean level {fm.brightness:.0f} of 255)")
    elif fm.brightness > b_warn_hi:
        rec.add("warn", f"face very bright (mean level {fm.brightness:.0f} of 255)")
    c_warn, c_rej = config.clipped_limits
    if fm.clipped > c_rej:
        rec.add("reject", f"{fm.clipped:.0%} of the face is blown out or black")
    elif fm.clipped > c_warn:
        rec.add("warn", f"{fm.clipped:.0%} of the face is blown out or black")
    if fm.sharpness < config.min_sharpness:
        rec.add("reject", f"face too blurry (sharpness {fm.sharpness:.0f}; needs {config.min_sharpness:.0f}, {config.good_sharpness:.0f}+ is sharp)")
    elif fm.sharpness < config.good_sharpness:
        rec.add("warn", f"face a little soft (sharpness {fm.sharpness:.0f}; {config.good_sharpness:.0f}+ is sharp)")
    alignment = align.plan_alignment(face, (width, height), bucket, _align_spec(config))
    _describe_crop(rec, alignment, (width, height))
    eyes = align.transform_points(alignment.matrix, np.stack([face.left_eye, face.right_eye]))
    rec.crop.update(eye_x=float(eyes[:, 0].mean() + 0.5) / bucket[0], eye_y=float(eyes[:, 1].mean() + 0.5) / bucket[1])
    _judge_resize(rec, alignment, config)

    # The costly part (identity embedding, aligned crop, PNG) only for photos still in the running.
    if any(level == "reject" for level, _ in rec.issues) and override != "accept":
        return rec
    rec.embedding = backend.embed(image, face)
    rendered = align.warp(image, alignment, pad=config.padding)
    if config.normalise:
        rendered = quality.normalise_colours(rendered)
    mask = align.face_mask(face, alignment, background=config.background_weight, kind=config.mask)
    _store_render(rec, rendered, mask)
    return rec


def _judge_resize(rec: PhotoRecord, alignment: align.Alignment, config: PrepareConfig) -> None:
    """Warn when less of the crop's detail is real than ``config.quality_threshold`` asks (enlarged or padded)."""
    score = rec.resize_quality
    if score is None or score >= config.quality_threshold:
        return
    w, h = alignment.out_size
    parts = []
    if alignment.scale > 1.0:
        parts.append(f"the face is enlarged {alignment.scale:.2f}x to fill {w}x{h} (limit {config.max_upscale:g}x)")
    if alignment.padding > 0:
        fill = {"blur": "blurred", "reflect": "mirrored"}[config.padding]
        parts.append(f"the crop runs past the photo, {alignment.padding:.0%} of it {fill} padding "
                     f"({', '.join(alignment.padding_sides)})")
    # three decimals: 0.946 must not read "0.95 is below 0.95"
    text = (f"resize quality {score:.3f} is below {config.quality_threshold:g}: {' and '.join(parts)}; "
            "a larger or closer photo gives more real detail")
    low_res = [i for i, (level, t) in enumerate(rec.issues) if t.startswith("low resolution")]
    if low_res:  # one reason, not two, for the same lack of pixels
        level, t = rec.issues[low_res[0]]
        rec.issues[low_res[0]] = (level, f"{t}: {text}")
    else:
        rec.add("warn", text)


def _describe_crop(rec: PhotoRecord, alignment: align.Alignment, size: tuple[int, int]) -> None:
    rec.crop.update(
        bucket=f"{alignment.out_size[0]}x{alignment.out_size[1]}",
        crop_box=alignment.crop_box(),
        rotation=round(alignment.angle, 2),
        scale=round(alignment.scale, 4),
        zoom=round(alignment.zoom, 3),
        padding=round(alignment.padding, 4),
        padding_sides=",".join(alignment.padding_sides),
        quad=alignment.crop_quad().round(1).tolist(),
    )
    rec.resize_quality = align.resize_quality(alignment)
    rec.metadata = _micro_conditioning(alignment, size)


def _store_render(rec: PhotoRecord, image: np.ndarray, mask: np.ndarray) -> None:
    rec.rendered = (encode_png(image), encode_png(mask))
    rec.crop_thumbnail = _thumbnail(image, 192)
