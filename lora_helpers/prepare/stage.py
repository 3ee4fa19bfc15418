"""Stage 1: check photos and turn them into aligned training crops, masks and a report.

``prepare_photos(photos_dir, out_dir)`` reads every file in ``photos_dir`` (never
modifying it) and writes, per the folder contract in DESIGN.md::

    out_dir/images/<stem>.png    face-centred, eye-levelled crops at SDXL bucket sizes
    out_dir/masks/<stem>.png     soft face masks (255 face, 0 background)
    out_dir/metadata.jsonl       one row per accepted photo (SDXL micro-conditioning)
    out_dir/report.csv           one row per input file: verdict, reasons, every measure
    out_dir/contact_sheet.png    every photo with its verdict colour and reasons

Each photo gets a verdict: ``pass``, ``warn`` (used, with a caveat), ``reject`` (not
used, with the reason) or ``skip`` (not used, nothing wrong with it: a near-duplicate,
or a file that is not a photo). Checks that need the whole set run after every photo
has been measured: sharpness against the set's median, near-duplicates, and identity
outliers (a friend's photo mixed in). A verdict can be overridden with ``overrides=``
or an ``overrides.json`` in ``out_dir`` (``{"IMG_1.jpg": "accept" | "reject"}``).

Background normalisation (replacing or evening out backgrounds) is deliberately left
out: doing it well needs a segmentation model, and a poor cut-out teaches the LoRA
halo artefacts. The face masks let the trainer down-weight the background instead.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_helpers.core import fileio
from lora_helpers.prepare.align import AlignSpec
from lora_helpers.core.images import IMAGE_SUFFIXES, ImageLoadError, list_images
from lora_helpers.prepare.lazy_photo import open_photo

__all__ = [
    "PrepareConfig",
    "PhotoRecord",
    "PrepareResult",
    "NoPhotosAcceptedError",
    "VERDICTS",
    "prepare_photos",
    "read_overrides",
    "write_overrides",
    "add_cli_arguments",
    "run_cli",
]

log = logging.getLogger(__name__)

VERDICTS = ("pass", "warn", "reject", "skip")
ACCEPTED = ("pass", "warn")
OVERRIDES_FILE = "overrides.json"


@dataclass
class PrepareConfig:
    """Settings for :func:`prepare_photos`; the defaults suit SDXL at 1024 px.

    Attributes:
        resolution: side of the square SDXL bucket; other buckets scale with it
            (64 in smoke mode gives 64x64, 56x72, ...).
        square_only: always crop 1:1 instead of the bucket nearest the photo's aspect.
        eye_y: eye midpoint height as a fraction of the output (eyes sit centred across).
        face_fraction: face size as a fraction of the output's short side.
        max_upscale: never enlarge a photo more than this.
        max_zoom: enlarge the face up to this much beyond ``face_fraction`` to avoid padding.
        padding: fill for crop areas outside the photo: "blur" or "reflect".
        ideal_short_side: photos with a shorter short side get a warning.
        min_short_side: photos below this are rejected (half of 1024: the whole photo
            would have to be enlarged more than 2x).
        min_face_px, good_face_px: face size (about its width) in photo pixels below
            which a photo is rejected / warned about.
        min_sharpness, good_sharpness: face sharpness limits (see
            :class:`lora_helpers.prepare.quality.FaceMeasures`).
        min_relative_sharpness, warn_relative_sharpness: face sharpness as a share of
            the set's median below which a photo is rejected / warned about.
        brightness_limits: (reject below, warn below, warn above, reject above) for
            the face's mean grey level.
        clipped_limits: (warn above, reject above) for the share of blown or crushed
            face pixels.
        clarity_pass: minimum ``face_clarity_score``.
        second_face_ratio: a second face at least this share of the main face's area
            is a second subject (reject); smaller ones only warn.
        max_roll: head tilt (degrees) above which a photo is warned about.
        duplicate_distance: perceptual-hash bits (of 64) within which photos are
            near-duplicates.
        identity_threshold: cosine similarity to the set below which a face is taken
            for someone else.
        background_weight: mask value outside the face (0..1); 0 keeps the contract
            (the trainer applies its own weight).
        mask: "hull" (landmark outline plus forehead) or "ellipse".
        normalise: gentle gray-world white balance and CLAHE on lightness.
        backend: face backend name for :func:`lora_helpers.prepare.faces.get_backend`.
        detect_max_side: longest side for the first face-detection pass.
    """

    resolution: int = 1024
    square_only: bool = False
    # Alignment defaults live in AlignSpec, so both stay the same.
    eye_y: float = AlignSpec.eye_y
    face_fraction: float = AlignSpec.face_fraction
    max_upscale: float = AlignSpec.max_upscale
    max_zoom: float = AlignSpec.max_zoom
    padding: str = "blur"
    ideal_short_side: int = 1024
    min_short_side: int = 512
    min_face_px: float = 64.0
    good_face_px: float = 128.0
    min_sharpness: float = 300.0
    good_sharpness: float = 900.0
    min_relative_sharpness: float = 0.3
    warn_relative_sharpness: float = 0.5
    brightness_limits: tuple[float, float, float, float] = (30.0, 60.0, 215.0, 235.0)
    clipped_limits: tuple[float, float] = (0.05, 0.25)
    clarity_pass: float = 0.9
    second_face_ratio: float = 0.25
    max_roll: float = 25.0
    duplicate_distance: int = 8
    identity_threshold: float | None = None
    background_weight: float = 0.0
    mask: str = "hull"
    normalise: bool = False
    backend: str = "dlib"
    detect_max_side: int = 1024

    def __post_init__(self):
        if self.padding not in ("blur", "reflect"):
            raise ValueError(f"padding must be 'blur' or 'reflect', got {self.padding!r}")
        if self.mask not in ("hull", "ellipse"):
            raise ValueError(f"mask must be 'hull' or 'ellipse', got {self.mask!r}")
        if self.resolution < 8:
            raise ValueError(f"resolution must be at least 8 px, got {self.resolution}")
        if not 0.0 <= self.background_weight <= 1.0:
            raise ValueError(f"background_weight must be within 0..1, got {self.background_weight}")


@dataclass
class PhotoRecord:
    """What preparation found and did for one input file (one row of ``report.csv``).

    ``measures`` holds the raw numbers (sharpness, brightness, ...), ``scores`` their
    0..1 scores; ``crop`` describes the transform (bucket, box, rotation, padding).
    """

    file: str
    path: Path
    verdict: str = "reject"
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mode: str | None = None
    original_size: tuple[int, int] | None = None
    faces: int | None = None
    face_box: tuple[float, float, float, float] | None = None
    measures: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    face_clarity_score: float | None = None
    crop: dict = field(default_factory=dict)
    duplicate_of: str | None = None
    image_file: str | None = None
    mask_file: str | None = None
    override: str | None = None
    stem: str | None = None
    thumbnail: object = field(default=None, repr=False)
    crop_thumbnail: object = field(default=None, repr=False)
    # (level, text) found by the checks; verdict and reasons are derived from them.
    issues: list[tuple[str, str]] = field(default_factory=list, repr=False)
    embedding: np.ndarray | None = field(default=None, repr=False)
    phash: int | None = field(default=None, repr=False)
    rendered: tuple[bytes, bytes] | None = field(default=None, repr=False)
    metadata: dict = field(default_factory=dict, repr=False)

    @property
    def accepted(self) -> bool:
        return self.verdict in ACCEPTED

    def add(self, level: str, text: str) -> None:
        """Record a finding: level is "warn", "reject" or "skip"."""
        self.issues.append((level, text))


@dataclass
class PrepareResult:
    """All records of a run, in input order, and where the outputs are."""

    out_dir: Path
    records: list[PhotoRecord]
    config: PrepareConfig
    # name -> (what the photo's processing depended on, the record before set-level checks):
    # lets a re-run after an override redo only the photos that changed.
    processed: dict = field(default_factory=dict, repr=False)
    reused: int = 0

    @property
    def accepted(self) -> list[PhotoRecord]:
        return [r for r in self.records if r.accepted]

    @property
    def rejected(self) -> list[PhotoRecord]:
        return [r for r in self.records if r.verdict == "reject"]

    @property
    def skipped(self) -> list[PhotoRecord]:
        return [r for r in self.records if r.verdict == "skip"]

    def record(self, file: str) -> PhotoRecord:
        """The record for an input file name."""
        for r in self.records:
            if r.file == file or r.path.name == file:
                return r
        raise KeyError(f"{file} is not among the prepared photos")

    def summary(self) -> str:
        """One line per photo: verdict, file and reasons."""
        lines = [f"{len(self.accepted)} of {len(self.records)} files accepted -> {self.out_dir}"
                 + (f" ({len(self.records) - self.reused} photos redone, {self.reused} unchanged)" if self.reused else "")]
        for r in self.records:
            why = "; ".join(r.reasons)
            lines.append(f"  {r.verdict:6s} {r.file}" + (f"  ({why})" if why else ""))
        return "\n".join(lines)


class NoPhotosAcceptedError(RuntimeError):
    """No photo passed; the message lists why each was rejected (report.csv has more)."""

    def __init__(self, result: PrepareResult):
        self.result = result
        if not result.records:
            super().__init__("the photo folder is empty: add 10-15 photos of one person (JPEG, PNG, WebP)")
            return
        lines = [f"none of the {len(result.records)} files in the photo folder can be used for training:"]
        for r in result.records:
            lines.append(f"  {r.file}: {r.verdict}: {'; '.join(r.reasons) or 'no reason recorded'}")
        lines.append(f"see {result.out_dir / 'report.csv'} and contact_sheet.png; add photos with one clear face each")
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------------------------
# Overrides


def read_overrides(out_dir: str | os.PathLike) -> dict[str, str]:
    """Verdict overrides saved in ``out_dir/overrides.json`` (empty when absent)."""
    path = Path(out_dir) / OVERRIDES_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc.msg}); fix or delete the file") from exc
    return _check_overrides(data, str(path))


def write_overrides(out_dir: str | os.PathLike, overrides: dict[str, str]) -> Path:
    """Save verdict overrides (``{"file name": "accept" | "reject"}``) for the next run."""
    clean = _check_overrides(overrides, "overrides")
    return fileio.write_json(Path(out_dir) / OVERRIDES_FILE, dict(sorted(clean.items())))


def _check_overrides(data, where: str) -> dict[str, str]:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected a mapping of file name to 'accept' or 'reject'")
    out = {}
    for name, value in data.items():
        value = str(value).strip().lower()
        if value in ("auto", "", "none"):
            continue
        if value not in ("accept", "reject"):
            raise ValueError(f"{where}: override for {name!r} must be 'accept' or 'reject', got {value!r}")
        out[str(name)] = value
    return out


# ---------------------------------------------------------------------------------------
# Per-photo work


def _encode_png(array: np.ndarray) -> bytes:
    import cv2

    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    # Level 1, RLE and the Paeth filter alone: 5x faster than PIL's default, and smaller
    # files (PNG encoding would otherwise be a fifth of the time per photo).
    params = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_STRATEGY, cv2.IMWRITE_PNG_STRATEGY_RLE]
    if hasattr(cv2, "IMWRITE_PNG_FILTER"):  # OpenCV >= 4.10
        params += [cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH]
    ok, buf = cv2.imencode(".png", array, params)
    if not ok:  # pragma: no cover - cv2 only fails on invalid arrays
        raise RuntimeError("PNG encoding failed")
    return buf.tobytes()


def _peek_mode(path: Path) -> str | None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode
    except Exception:
        return None


def _thumbnail(image, side: int = 256, *, reduce_by: int | None = None):
    """A small copy for the contact sheet; ``reduce_by`` matches detection's shrink factor
    so a :class:`~lora_helpers.prepare.lazy_photo.LazyPhoto` reduces a 12-MP frame only once."""
    from PIL import Image

    im = image if not isinstance(image, np.ndarray) else Image.fromarray(image)
    k = reduce_by or min(im.size) // (2 * side)
    im = im.reduce(k) if k >= 2 else im if isinstance(im, Image.Image) else im.convert("RGB")
    scale = min(1.0, side / max(im.size))
    size = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0)  # a new image: cached reductions stay intact


def _align_spec(config: PrepareConfig):
    return AlignSpec( eye_y=config.eye_y, face_fraction=config.face_fraction,
                     max_upscale=config.max_upscale, max_zoom=config.max_zoom)


def _micro_conditioning(alignment, image_size: tuple[int, int]) -> dict:
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


def _process_photo(path: Path, name: str, config: PrepareConfig, backend, override: str | None) -> PhotoRecord:
    """Load, detect, measure and render one photo; set-level checks come later."""
    from lora_helpers.prepare import align
    from lora_helpers.prepare import quality
    from lora_helpers.prepare.faces import detect_faces

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
    bucket = align.nearest_bucket(width, height, resolution=config.resolution, square_only=config.square_only)
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
    if alignment.scale > 1.0 + 1e-3:
        enlarged = f"enlarged {alignment.scale:.1f}x to fill {bucket[0]}x{bucket[1]} (limit {config.max_upscale:g}x)"
        low_res = [i for i, (level, text) in enumerate(rec.issues) if text.startswith("low resolution")]
        if low_res:  # one reason, not two, for the same lack of pixels
            level, text = rec.issues[low_res[0]]
            rec.issues[low_res[0]] = (level, f"{text}: {enlarged}")
        else:
            rec.add("warn", f"face {enlarged}; a closer or larger photo gives more detail")
    if alignment.padding > 0.1:
        fill = {"blur": "blurred", "reflect": "mirrored"}[config.padding]
        rec.add("warn", f"the crop runs past the photo: {alignment.padding:.0%} of the image is {fill} padding ({', '.join(alignment.padding_sides)})")

    # The costly part (identity embedding, Lanczos crop, PNG) only for photos still in the running.
    if any(level == "reject" for level, _ in rec.issues) and override != "accept":
        return rec
    rec.embedding = backend.embed(image, face)
    rendered = align.warp(image, alignment, pad=config.padding)
    if config.normalise:
        rendered = quality.normalise_colours(rendered)
    mask = align.face_mask(face, alignment, background=config.background_weight, kind=config.mask)
    _store_render(rec, rendered, mask)
    return rec


def _describe_crop(rec: PhotoRecord, alignment, size: tuple[int, int]) -> None:
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
    rec.metadata = _micro_conditioning(alignment, size)


def _store_render(rec: PhotoRecord, image: np.ndarray, mask: np.ndarray) -> None:
    rec.rendered = (_encode_png(image), _encode_png(mask))
    rec.crop_thumbnail = _thumbnail(image, 192)


# ---------------------------------------------------------------------------------------
# Set-level checks


def _judge_set(records: list[PhotoRecord], config: PrepareConfig) -> None:
    from lora_helpers.prepare import quality
    from lora_helpers.prepare.faces import SAME_PERSON_COSINE, cosine_similarity

    def rejected(r: PhotoRecord) -> bool:
        return any(level == "reject" for level, _ in r.issues)

    # Sharpness against the set: a photo far softer than the others is out of focus.
    with_face = [r for r in records if "sharpness" in r.measures]
    median = float(np.median([r.measures["sharpness"] for r in with_face])) if len(with_face) >= 3 else None
    for r in with_face:
        m = r.measures
        rel = m["sharpness"] / median if median else None
        m["sharpness_rel"] = rel
        if rel is not None and m["sharpness"] >= config.min_sharpness:
            if rel < config.min_relative_sharpness:
                r.add("reject", f"face much softer than the other photos ({rel:.0%} of their median sharpness)")
            elif rel < config.warn_relative_sharpness:
                r.add("warn", f"face softer than the other photos ({rel:.0%} of their median sharpness)")
        b = config.brightness_limits
        scores = {
            "sharpness": quality.ramp(m["sharpness"], config.min_sharpness / 8, config.min_sharpness, config.good_sharpness, log=True),
            "relative_sharpness": 1.0 if rel is None else quality.ramp(rel, 0.05, config.min_relative_sharpness, config.warn_relative_sharpness * 1.2),
            "face_size": quality.ramp(m["face_px"], config.min_face_px / 4, config.min_face_px, config.good_face_px, log=True),
            "exposure": min(quality.ramp(m["brightness"], 0.0, b[0], b[1]), quality.ramp(m["brightness"], 255.0, b[3], b[2])),
            "clipping": quality.ramp(m["clipped"], 0.6, config.clipped_limits[1], config.clipped_limits[0]),
        }
        r.scores = {k: round(v, 4) for k, v in scores.items()}
        limiting = min(scores, key=scores.get)
        r.face_clarity_score = round(min(scores.values()), 4)
        r.measures["limited_by"] = limiting if r.face_clarity_score < 1.0 else None
        if r.face_clarity_score < config.clarity_pass and not rejected(r):
            r.add("reject", f"face clarity {r.face_clarity_score:.2f} is below {config.clarity_pass:.2f} (limited by {limiting.replace('_', ' ')})")

    # Near-duplicates among usable photos: keep the sharper (then the larger) one.
    usable = [r for r in records if r.phash is not None and not rejected(r) and not any(l == "skip" for l, _ in r.issues)]
    for i, a in enumerate(usable):
        if a.duplicate_of:
            continue
        group = [a]
        for b in usable[i + 1:]:
            if b.duplicate_of or quality.hash_distance(a.phash, b.phash) > config.duplicate_distance:
                continue
            aspect_a = a.original_size[0] / a.original_size[1]
            aspect_b = b.original_size[0] / b.original_size[1]
            same_face = a.embedding is None or b.embedding is None or cosine_similarity(a.embedding, b.embedding) >= SAME_PERSON_COSINE
            if abs(math.log(aspect_a / aspect_b)) < 0.1 and same_face:
                group.append(b)
        if len(group) < 2:
            continue
        best = max(group, key=lambda r: r.measures.get("sharpness", 0.0))
        # Sharpness within 10 % is noise (recompression adds edges): prefer more pixels.
        close = [r for r in group if r.measures.get("sharpness", 0.0) >= 0.9 * best.measures.get("sharpness", 0.0)]
        keep = max(close, key=lambda r: (r.original_size[0] * r.original_size[1], r.measures.get("sharpness", 0.0)))
        why = "sharper" if len(close) == 1 else "larger"
        for r in group:
            if r is not keep:
                r.duplicate_of = keep.file
                r.add("skip", f"near-duplicate of {keep.file}; keeping that one ({why})")

    # Identity: a face far from the set's own is probably someone else.
    threshold = config.identity_threshold or SAME_PERSON_COSINE
    counted = [r for r in records if r.embedding is not None and not rejected(r) and not r.duplicate_of]
    others = [r for r in records if r.embedding is not None and r not in counted]
    people = counted
    if len(people) >= 2:
        sims = np.array([[cosine_similarity(a.embedding, b.embedding) for b in people] for a in people])
        same = sims >= threshold
        anchor = max(range(len(people)), key=lambda i: (same[i].sum(), sims[i].sum()))
        group = [j for j in range(len(people)) if same[anchor, j]]
        clear_majority = len(group) > len(people) / 2
        for i, r in enumerate(people):
            ref = [j for j in group if j != i]
            r.measures["identity_similarity"] = float(np.median(sims[i, ref])) if ref else 1.0
            if not clear_majority and len(group) < len(people):
                # No majority (e.g. two photos of two people): which one is wrong is unknowable.
                r.add("warn", "the photos do not agree on one person; check that they all show the same person")
            elif i not in group:
                r.add("reject", f"looks like a different person from the rest of the set (similarity {r.measures['identity_similarity']:.2f}; same person >= {threshold:.2f})")
        for r in others:
            r.measures["identity_similarity"] = float(np.median([cosine_similarity(r.embedding, people[j].embedding) for j in group]))


def _finalise(rec: PhotoRecord) -> None:
    """Verdict and reasons from the issues and the override."""
    levels = [level for level, _ in rec.issues]
    verdict = "reject" if "reject" in levels else "skip" if "skip" in levels else "warn" if "warn" in levels else "pass"
    order = {"reject": 0, "skip": 1, "warn": 2}
    reasons = [text for _, text in sorted(rec.issues, key=lambda it: order[it[0]])]
    if rec.override == "reject":
        verdict, reasons = "reject", ["rejected by override"] + reasons
    elif rec.override == "accept" and verdict in ("reject", "skip"):
        if rec.rendered is not None:
            verdict, reasons = "warn", ["accepted by override"] + reasons
        else:
            reasons = ["override ignored: there is no picture to crop"] + reasons
    rec.verdict, rec.reasons = verdict, reasons


# ---------------------------------------------------------------------------------------
# The stage


def _inputs(photos) -> tuple[list[Path], list[Path]]:
    """Files to look at and the folders they come from."""
    if isinstance(photos, (str, os.PathLike)):
        folder = Path(photos)
        return list_images(folder, include_all_files=True), [folder.resolve()]
    files = [Path(p) for p in photos]
    for p in files:
        if not p.is_file():
            raise FileNotFoundError(f"photo not found: {p}")
    return files, sorted({p.parent.resolve() for p in files})


def _output_names(records: list[PhotoRecord]) -> None:
    """``images/<stem>.png`` names, unique even for IMG_1.jpg next to IMG_1.png."""
    taken: set[str] = set()
    for r in records:
        stem = Path(r.file).stem
        name = stem if stem.lower() not in taken else f"{stem}_{Path(r.file).suffix.lstrip('.').lower()}"
        n = 2
        while name.lower() in taken:
            name, n = f"{stem}_{n}", n + 1
        taken.add(name.lower())
        r.stem = name


def prepare_photos(
    photos_dir,
    out_dir: str | os.PathLike,
    *,
    config: PrepareConfig | None = None,
    overrides: dict[str, str] | None = None,
    progress: bool = True,
    backend=None,
    previous: PrepareResult | None = None,
) -> PrepareResult:
    """Check every photo and write the training crops, masks, metadata and report.

    Args:
        photos_dir: a folder (every file in it is reported on, not recursive) or a
            list of photo files. Sources are only read.
        out_dir: the dataset folder to (re)write; must not be the photo folder.
            Re-running into the same folder gives the same files; stale crops of
            photos no longer accepted are removed.
        config: :class:`PrepareConfig`; default settings when None.
        overrides: ``{"file name": "accept" | "reject"}``; merged over ``overrides.json``
            in ``out_dir`` (what the notebook widgets save).
        progress: show a progress bar.
        backend: a face backend; default ``get_backend(config.backend)``.
        previous: the result of an earlier run on the same photos: photos whose file,
            settings and override are unchanged are not processed again (applying an
            override redoes only that photo; the set-level checks are always redone).

    Returns:
        :class:`PrepareResult` with one :class:`PhotoRecord` per input file.

    Raises:
        FileNotFoundError: the photo folder does not exist.
        ValueError: ``out_dir`` is the photo folder, or an override is malformed.
        NoPhotosAcceptedError: no photo can be used (after writing the report, so
            ``report.csv`` and ``contact_sheet.png`` explain why).
    """
    from tqdm.auto import tqdm

    from lora_helpers.prepare import report as prepare_report
    from lora_helpers.prepare.faces import get_backend

    config = config or PrepareConfig()
    out_dir = Path(out_dir)
    files, folders = _inputs(photos_dir)
    if out_dir.resolve() in folders:
        raise ValueError(f"out_dir {out_dir} is the photo folder; choose a separate folder such as dataset/")
    merged = {**read_overrides(out_dir), **_check_overrides(overrides or {}, "overrides")}
    backend = backend or get_backend(config.backend)

    records: list[PhotoRecord] = []
    # Report files by name; only when two folders hold the same name add the folder.
    names = [p.name for p in files]
    if len(set(names)) < len(names):
        names = [f"{p.parent.name}/{p.name}" for p in files]
    processed, reused = {}, 0
    for path, name in tqdm(list(zip(files, names)), desc="preparing photos", unit="photo", disable=not progress):
        override = merged.get(name) or merged.get(path.name)
        key = _photo_key(path, config, override)
        earlier = previous.processed.get(name) if previous is not None else None
        if earlier is not None and earlier[0] == key:
            rec, reused = copy.deepcopy(earlier[1]), reused + 1
        else:
            try:
                rec = _process_photo(path, name, config, backend, override)
            except Exception as exc:  # one bad photo never stops the batch
                log.exception("unexpected error while preparing %s", path)
                rec = PhotoRecord(file=name, path=path, override=override)
                rec.add("reject", f"unexpected error while processing ({type(exc).__name__}: {exc})")
        processed[name] = (key, copy.deepcopy(rec))  # before _judge_set adds set-level findings
        records.append(rec)

    _judge_set(records, config)
    for rec in records:
        _finalise(rec)
    _output_names(records)
    result = PrepareResult(out_dir=out_dir, records=records, config=config, processed=processed, reused=reused)
    _write_outputs(result)
    prepare_report.write_report(result)
    if not result.accepted:
        raise NoPhotosAcceptedError(result)
    return result


def _photo_key(path: Path, config: PrepareConfig, override: str | None) -> tuple:
    try:
        stat = path.stat()
        stamp = (stat.st_size, stat.st_mtime_ns)
    except OSError:
        stamp = None
    return (str(path.resolve()), stamp, repr(config), override)


def _write_if_changed(path: Path, data: bytes) -> None:
    # Skipping identical files keeps re-runs cheap and leaves timestamps alone.
    if path.exists() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    fileio.write_bytes(path, data)


def _write_outputs(result: PrepareResult) -> None:
    out = result.out_dir
    images, masks = out / "images", out / "masks"
    images.mkdir(parents=True, exist_ok=True)
    masks.mkdir(parents=True, exist_ok=True)
    old_rows = {row.get("source"): row for row in (fileio.read_jsonl(out / "metadata.jsonl") if (out / "metadata.jsonl").exists() else [])}
    rows, keep = [], set()
    for r in result.records:
        if not r.accepted or r.rendered is None:
            continue
        image_bytes, mask_bytes = r.rendered
        r.image_file, r.mask_file = f"images/{r.stem}.png", f"masks/{r.stem}.png"
        _write_if_changed(out / r.image_file, image_bytes)
        _write_if_changed(out / r.mask_file, mask_bytes)
        keep.add(r.stem)
        row = {"file_name": r.image_file, "mask_file": r.mask_file, **r.metadata,
               "source": r.file, "face_clarity_score": r.face_clarity_score}
        previous = old_rows.get(r.file)
        if previous and previous.get("file_name") == r.image_file and "text" in previous:
            row["text"] = previous["text"]  # keep captions from an earlier caption run
        rows.append(row)
    fileio.write_jsonl(out / "metadata.jsonl", rows)
    # Only now, with the new metadata in place, remove crops of photos no longer
    # accepted (an override, a removed photo) so nothing stale is trained on.
    for folder, suffixes in ((images, (".png", ".txt")), (masks, (".png",))):
        for p in folder.iterdir():
            if p.is_file() and p.suffix in suffixes and p.stem not in keep and not p.name.startswith("."):
                p.unlink()


# ---------------------------------------------------------------------------------------
# Command line


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags for ``python -m lora_helpers prepare``."""
    parser.add_argument("photos_dir", help="folder with the photos (only read)")
    parser.add_argument("out_dir", help="dataset folder to write (images/, masks/, metadata.jsonl, report.csv)")
    parser.add_argument("--resolution", type=int, default=None, help="square bucket side (default 1024; 64 in smoke mode)")
    parser.add_argument("--square", action="store_true", help="crop every photo 1:1 instead of the nearest SDXL aspect bucket")
    parser.add_argument("--normalise", action="store_true", help="gentle white balance and contrast (CLAHE) on the crops")
    parser.add_argument("--background-weight", type=float, default=0.0, help="mask value outside the face, 0..1 (default 0)")
    parser.add_argument("--clarity-pass", type=float, default=0.9, help="minimum face clarity score (default 0.9)")
    parser.add_argument("--face-fraction", type=float, default=0.35, help="face size as a share of the short side (default 0.35)")
    parser.add_argument("--accept", action="append", default=[], metavar="FILE", help="accept this photo whatever the checks say (repeatable)")
    parser.add_argument("--reject", action="append", default=[], metavar="FILE", help="reject this photo (repeatable)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_cli(args: argparse.Namespace) -> int:
    """Run the stage from parsed arguments; exit code 1 when no photo is usable."""
    from lora_helpers.core.config import default_resolution

    config = PrepareConfig(
        resolution=args.resolution or default_resolution(),
        square_only=args.square,
        normalise=args.normalise,
        background_weight=args.background_weight,
        clarity_pass=args.clarity_pass,
        face_fraction=args.face_fraction,
    )
    overrides = {**{f: "accept" for f in args.accept}, **{f: "reject" for f in args.reject}}
    try:
        result = prepare_photos(args.photos_dir, args.out_dir, config=config, overrides=overrides, progress=not args.no_progress)
    except NoPhotosAcceptedError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(result.summary())
    print(f"report: {result.out_dir / 'report.csv'}; contact sheet: {result.out_dir / 'contact_sheet.png'}")
    return 0
