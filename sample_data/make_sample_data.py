"""Regenerate sample_data/ from public-domain photos that ship inside pip packages.

Sources (both public domain, no download needed):
  * scikit-image ``skimage.data.astronaut()``: NASA portrait of astronaut Eileen Collins.
  * matplotlib ``mpl-data/sample_data/grace_hopper.jpg``: US Navy portrait of Grace Hopper.

Writes, next to this script:
  person/        photos of one person (the astronaut) as a user might bring them:
                 different crops, zoom, small head tilts, lighting, one mirrored, one
                 12-MP phone JPEG stored sideways with EXIF Orientation=6.
  other_person/  Grace Hopper (a different person, for identity tests).
  problems/      one file per problem a photo-preparation stage must handle.
  manifest.json  role, problem kind, expected faces and verdict for every file.

Run from the repository root:  python sample_data/make_sample_data.py
Everything is deterministic (fixed seeds). Files are built in a temporary folder,
checked, and only then moved into place, so a failure leaves the old files untouched.
When dlib is installed, every photo is also checked with dlib's HOG face detector.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageFilter, ImageOps

HERE = Path(__file__).resolve().parent
OUTPUT_DIRS = ("person", "other_person", "problems")

# dlib HOG boxes (left, top, right, bottom) in the source pictures, upsample 0; every
# derived photo's expected face box is this box pushed through the same transform.
ASTRONAUT_FACE = (179, 83, 267, 171)
HOPPER_FACE = (161, 137, 377, 353)

ASTRONAUT = {
    "person": "eileen_collins",
    "source": "scikit-image skimage.data.astronaut() (NASA photo of astronaut Eileen Collins)",
    "licence": "public domain (NASA)",
}
HOPPER = {
    "person": "grace_hopper",
    "source": "matplotlib mpl-data/sample_data/grace_hopper.jpg (US Navy photo of Grace Hopper)",
    "licence": "public domain (US Navy)",
}
COFFEE = {
    "person": None,
    "source": "scikit-image skimage.data.coffee() (photo by Rachel Michetti, courtesy of Pikolo Espresso Bar)",
    "licence": "public domain (CC0 dedication by the photographer)",
}


# --------------------------------------------------------------------------- sources


def _astronaut() -> np.ndarray:
    """The astronaut photo with the mission patch and name tag painted out.

    dlib's HOG detector scores the round mission patch on the chest (and, less often,
    the name tag) as a borderline face (-0.1 to +0.3 depending on scale), so with them
    in frame a photo holds one or two faces by chance. Painted out, every crop of this
    photo has exactly one face with a wide margin.
    """
    from skimage import data

    img = np.ascontiguousarray(data.astronaut()[..., :3])
    mask = np.zeros(img.shape[:2], np.uint8)
    cv2.circle(mask, (172, 385), 44, 255, -1)  # mission patch
    cv2.rectangle(mask, (277, 338), (330, 379), 255, -1)  # name tag
    clean = cv2.inpaint(img, mask, 9, cv2.INPAINT_NS).astype(np.float32)
    # Inpainting leaves a flat fill; fabric has a little grain, so add some back.
    grain = np.random.default_rng(7).normal(0.0, 2.5, img.shape).astype(np.float32)
    grain = cv2.GaussianBlur(grain, (0, 0), 0.7)
    clean = np.where(mask[..., None] > 0, clean + grain, clean)
    return np.clip(clean + 0.5, 0, 255).astype(np.uint8)


def _hopper_path() -> Path:
    import matplotlib

    path = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not path.is_file():  # older layouts: ask cbook
        from matplotlib import cbook

        path = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    return path


def _hopper() -> np.ndarray:
    with Image.open(_hopper_path()) as im:
        return np.asarray(im.convert("RGB"))


# --------------------------------------------------------------------------- image ops


@dataclass
class Shot:
    """One rendering of a source photo: where the face lands, how big, tilt, light."""

    size: tuple[int, int]  # (width, height) of the upright photo
    scale: float  # output pixels per source pixel
    centre: tuple[float, float]  # source point (after mirroring) at the middle of the frame
    angle: float = 0.0  # head tilt in degrees, counter-clockwise as seen
    mirror: bool = False
    # Source pixels of soft edge (left, right, top) where the photo may meet a painted
    # backdrop; 0 means the frame must stay inside the source on that side.
    feather: tuple[float, float, float] = (0.0, 0.0, 0.0)
    grade: dict = field(default_factory=dict)  # kwargs for _grade


def _backdrop(width: int, height: int, colour: np.ndarray, seed: int) -> np.ndarray:
    """A smooth mottled studio backdrop (float RGB in 0..1) around ``colour``.

    Low-frequency only, so a large frame stays small as a JPEG.
    """
    rng = np.random.default_rng(seed)
    gh, gw = max(2, height // 400), max(2, width // 400)
    mottle = rng.normal(0.0, 1.0, (gh + 2, gw + 2)).astype(np.float32)
    mottle = cv2.resize(mottle, (width, height), interpolation=cv2.INTER_CUBIC)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    light = 1.06 - 0.12 * (yy / height) - 0.05 * (xx / width)  # key light from top-left
    r = np.hypot((xx - width / 2) / width, (yy - height / 2) / height)
    vignette = 1.0 - 0.25 * r**2
    base = colour[None, None, :] * (light * vignette)[..., None]
    return np.clip(base + 0.022 * mottle[..., None], 0.0, 1.0)


def _source_mask(height: int, width: int, feather: tuple[float, float, float]) -> np.ndarray:
    """1 inside the source, fading to 0 over ``feather`` px at the left, right and top.

    The bottom edge stays hard: bodies continue below the frame in portraits.
    """
    left, right, top = feather
    x = np.arange(width, dtype=np.float32)
    y = np.arange(height, dtype=np.float32)
    fx = np.clip(x / left, 0, 1) if left > 0 else np.ones_like(x)
    fx = fx * (np.clip((width - 1 - x) / right, 0, 1) if right > 0 else 1.0)
    fy = np.clip(y / top, 0, 1) if top > 0 else np.ones_like(y)
    mask = fy[:, None] * fx[None, :]
    return mask * mask * (3 - 2 * mask)  # smoothstep: no visible seam


def _affine(shot: Shot) -> np.ndarray:
    """2x3 source->output matrix: rotate and scale about ``shot.centre``, put it mid-frame."""
    m = cv2.getRotationMatrix2D(shot.centre, shot.angle, shot.scale)
    w, h = shot.size
    m[0, 2] += w / 2.0 - shot.centre[0]
    m[1, 2] += h / 2.0 - shot.centre[1]
    return m


def _check_frame(shot: Shot, src_w: int, src_h: int) -> None:
    """The frame may leave the source only on sides with a feather, never at the bottom."""
    inv = cv2.invertAffineTransform(_affine(shot))
    w, h = shot.size
    pts = np.array([[0, 0, 1], [w, 0, 1], [0, h, 1], [w, h, 1]], np.float64) @ inv.T
    (x0, y0), (x1, y1) = pts.min(axis=0), pts.max(axis=0)
    left, right, top = shot.feather
    bad = []
    if x0 < -0.5 and not left:
        bad.append(f"left by {-x0:.0f}")
    if x1 > src_w + 0.5 and not right:
        bad.append(f"right by {x1 - src_w:.0f}")
    if y0 < -0.5 and not top:
        bad.append(f"top by {-y0:.0f}")
    if y1 > src_h + 0.5:
        bad.append(f"bottom by {y1 - src_h:.0f}")
    if bad:
        raise ValueError(f"{shot} leaves the source photo: " + ", ".join(bad))


def _face_box_out(m: np.ndarray, box: tuple[int, int, int, int]) -> list[int]:
    """Axis-aligned box around ``box`` (source coordinates) after the transform ``m``."""
    left, top, right, bottom = box
    pts = np.array([[left, top, 1], [right, top, 1], [left, bottom, 1], [right, bottom, 1]], np.float64)
    out = pts @ m.T
    return [int(round(v)) for v in (out[:, 0].min(), out[:, 1].min(), out[:, 0].max(), out[:, 1].max())]


def _grade(
    rgb: np.ndarray,
    *,
    exposure: float = 1.0,
    gamma: float = 1.0,
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0),
    saturation: float = 1.0,
) -> np.ndarray:
    """Lighting change on float RGB (0..1): exposure, gamma, white balance, saturation."""
    x = np.power(np.clip(rgb, 0, 1), gamma) * exposure * np.asarray(tint, np.float32)
    luma = x @ np.array([0.299, 0.587, 0.114], np.float32)
    x = luma[..., None] + saturation * (x - luma[..., None])
    return np.clip(x, 0, 1)


def _render(src: np.ndarray, face: tuple[int, int, int, int], shot: Shot, seed: int) -> tuple[Image.Image, list[int]]:
    """Render ``shot`` of ``src``; returns the RGB photo and its expected face box."""
    h0, w0 = src.shape[:2]
    box = face
    if shot.mirror:
        src = src[:, ::-1]
        box = (w0 - 1 - face[2], face[1], w0 - 1 - face[0], face[3])
    _check_frame(shot, w0, h0)
    m = _affine(shot)
    w, h = shot.size
    # Lanczos for the upscale keeps the face as sharp as an upscale can be.
    photo = cv2.warpAffine(
        np.ascontiguousarray(src), m, (w, h), flags=cv2.INTER_LANCZOS4, borderMode=cv2.BORDER_REPLICATE
    ).astype(np.float32) / 255.0
    mask = cv2.warpAffine(_source_mask(h0, w0, shot.feather), m, (w, h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_REPLICATE)
    if mask.min() < 1.0:
        colour = _backdrop_colour(src)
        bg = _backdrop(w, h, colour, seed)
        photo = photo * mask[..., None] + bg * (1.0 - mask[..., None])
    photo = _grade(photo, **shot.grade)
    return Image.fromarray((photo * 255.0 + 0.5).astype(np.uint8), "RGB"), _face_box_out(m, box)


def _backdrop_colour(src: np.ndarray) -> np.ndarray:
    """Median colour of the studio backdrop above the head (same spot mirrored or not)."""
    w = src.shape[1]
    strip = np.concatenate([src[2:40, 110:170], src[2:40, w - 170 : w - 110]], axis=1)
    return np.median(strip.reshape(-1, 3), axis=0).astype(np.float32) / 255.0


def _dhash(image: Image.Image) -> int:
    """64-bit difference hash: small Hamming distance = near-duplicate picture."""
    g = np.asarray(image.convert("L").resize((9, 8), Image.Resampling.BOX), np.int16)
    bits = (g[:, 1:] > g[:, :-1]).flatten()
    return int("".join("1" if b else "0" for b in bits), 2)


# --------------------------------------------------------------------------- writers


def _jpeg_bytes(image: Image.Image, quality: int = 85, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=quality, optimize=True, **kw)
    return buf.getvalue()


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


class _Builder:
    """Collects files into a temporary folder plus their manifest entries."""

    def __init__(self, root: Path):
        self.root = root
        self.entries: dict[str, dict] = {}
        self.hashes: dict[str, int] = {}

    def add(self, rel: str, data: bytes, entry: dict, image: Image.Image | None = None) -> None:
        path = self.root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        self.entries[rel] = entry
        if image is not None:
            self.hashes[rel] = _dhash(image)


# --------------------------------------------------------------------------- content

PERSON_SHOTS: list[tuple[str, str, Shot]] = [
    (
        "astronaut_01_headshot.jpg",
        "tight head-and-shoulders portrait, backdrop extended above the head, neutral light",
        Shot(size=(768, 960), scale=2.4, centre=(233, 190), feather=(0, 0, 14)),
    ),
    (
        "astronaut_02_full_bright.jpg",
        "the whole studio portrait at 2x, brighter exposure",
        Shot(size=(1024, 1024), scale=2.0, centre=(256, 256), grade=dict(exposure=1.12, gamma=0.85)),
    ),
    (
        "astronaut_03_tilt_left_dark.jpg",
        "waist-up landscape crop, head tilted 9 deg, underexposed",
        Shot(
            size=(1024, 768),
            scale=2.3,
            centre=(256, 192),
            angle=9.0,
            feather=(0, 0, 14),
            grade=dict(exposure=0.72, gamma=1.25),
        ),
    ),
    (
        "astronaut_04_tilt_right_warm.jpg",
        "chest-up portrait, head tilted -7 deg, warm tungsten white balance",
        Shot(
            size=(720, 960),
            scale=2.1,
            centre=(238, 222),
            angle=-7.0,
            feather=(0, 0, 14),
            grade=dict(tint=(1.10, 1.0, 0.80), saturation=1.1),
        ),
    ),
    (
        "astronaut_05_mirrored_cool.jpg",
        "mirrored (selfie camera), square medium crop, cool light",
        Shot(size=(800, 800), scale=1.8, centre=(272, 228), mirror=True, grade=dict(tint=(0.92, 1.0, 1.08))),
    ),
    (
        "astronaut_06_offcentre_wide.jpg",
        "wide frame, person on the right, backdrop extended to the left, head tilted 5 deg",
        Shot(
            size=(1536, 1024),
            scale=2.0,
            centre=(72, 222),
            angle=5.0,
            feather=(40, 0, 30),
            grade=dict(exposure=1.03),
        ),
    ),
    (
        "astronaut_07_closeup_tilt.jpg",
        "close-up of the face, head tilted -10 deg, bright",
        Shot(size=(640, 640), scale=3.0, centre=(223, 150), angle=-10.0, grade=dict(exposure=1.08, gamma=0.9)),
    ),
]

# 12 MP phone photo: upright 4000x3000, stored 3000x4000 with EXIF Orientation=6.
PHONE_NAME = "astronaut_08_phone_exif_rotated.jpg"
PHONE_SHOT = Shot(
    size=(4000, 3000),
    scale=5.0,
    centre=(383, 190),
    feather=(45, 45, 45),
    grade=dict(tint=(1.04, 1.0, 0.94)),
)

# Problem images that contain the astronaut use crops unlike every person/ photo.
PROBLEM_SHOTS = {
    "grayscale": Shot(size=(560, 720), scale=1.42, centre=(203, 256)),
    "cmyk": Shot(size=(600, 720), scale=1.5, centre=(300, 244), grade=dict(tint=(1.0, 0.97, 0.95))),
    "sixteen_bit": Shot(size=(704, 528), scale=1.6, centre=(242, 200), angle=-4.0),
    "rgba": Shot(size=(528, 800), scale=1.57, centre=(228, 256)),
    "blurry": Shot(size=(640, 800), scale=2.0, centre=(250, 214), angle=3.0),
    "too_small": Shot(size=(160, 200), scale=0.62, centre=(225, 168)),
}

VERDICTS = {
    "blurry": ("reject", "face too blurry (heavy Gaussian blur)"),
    "too_small": ("reject", "image too small (160x200 px; short side below 512)"),
    "no_face": ("reject", "no face found"),
    "two_faces": ("reject", "two large faces; unclear which person to learn"),
    "near_duplicate": ("skip", "near-duplicate of {dup}; keep one"),
    "grayscale": ("warn", "grayscale photo: loads as RGB, but colour is missing"),
    "cmyk": ("ok", "CMYK JPEG: converted to RGB when loading"),
    "sixteen_bit": ("warn", "16-bit grayscale PNG: scaled to 8-bit RGB; colour is missing"),
    "rgba": ("ok", "RGBA PNG: transparent background composited onto white"),
    "truncated": ("reject", "truncated JPEG: cannot be read (ImageLoadError)"),
    "empty": ("reject", "empty file, 0 bytes (ImageLoadError)"),
    "not_an_image": ("reject", "not an image despite the .jpg suffix (ImageLoadError)"),
    "not_image_suffix": ("skip", "no image suffix: not listed as a photo"),
}


def _problem_entry(
    kind: str, faces: int | None, loads: bool, mode: str | None, size, how: str, src: dict | None, **extra
) -> dict:
    """Manifest entry for a problems/ file; ``extra`` keys are added as they are."""
    verdict, reason = VERDICTS[kind]
    reason = reason.format(dup=extra.pop("dup", ""))
    entry = {
        "role": "problem",
        "problem": kind,
        "faces": faces,
        "loads": loads,
        "mode": mode,
        "size": list(size) if size else None,
        "verdict": verdict,
        "reason": reason,
        "made": how,
    }
    if src:
        entry.update(src)
    else:
        entry.update({"person": None, "source": "written by make_sample_data.py", "licence": "public domain (CC0)"})
    entry.update(extra)
    return entry


def build(root: Path) -> _Builder:
    """Write every sample file under ``root`` and return the builder with the manifest."""
    astro = _astronaut()
    hopper = _hopper()
    b = _Builder(root)

    # ---- person/: the subject
    for i, (name, how, shot) in enumerate(PERSON_SHOTS):
        photo, box = _render(astro, ASTRONAUT_FACE, shot, seed=100 + i)
        b.add(
            f"person/{name}",
            _jpeg_bytes(photo, 88),
            {"role": "subject", "problem": None, "faces": 1, "loads": True, "mode": "RGB",
             "size": list(photo.size), "face_box": box, "made": how, **ASTRONAUT},
            photo,
        )

    upright, box = _render(astro, ASTRONAUT_FACE, PHONE_SHOT, seed=200)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # sideways, as the sensor wrote it
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 deg clockwise to display
    exif[0x0110] = "sample phone"  # Model
    b.add(
        f"person/{PHONE_NAME}",
        _jpeg_bytes(stored, 80, exif=exif.tobytes()),
        {"role": "subject", "problem": None, "faces": 1, "loads": True, "mode": "RGB",
         "size": list(upright.size), "stored_size": list(stored.size), "exif_orientation": 6,
         "face_box": box,
         "made": "12 MP phone photo: person off-centre on an extended studio backdrop, warm light; "
         "pixels stored sideways (3000x4000) with EXIF Orientation=6",
         **ASTRONAUT},
        upright,
    )

    # ---- other_person/: Grace Hopper
    hopper_bytes = _hopper_path().read_bytes()
    with Image.open(io.BytesIO(hopper_bytes)) as im:
        hopper_img = im.convert("RGB")
    b.add(
        "other_person/grace_hopper_01.jpg",
        hopper_bytes,
        {"role": "other", "problem": None, "faces": 1, "loads": True, "mode": "RGB",
         "size": list(hopper_img.size), "face_box": list(HOPPER_FACE),
         "made": "the original file, copied unchanged", **HOPPER},
        hopper_img,
    )
    hop_shot = Shot(size=(640, 800), scale=1.5, centre=(256, 300), angle=6.0, mirror=True,
                    grade=dict(exposure=0.95, tint=(1.05, 1.0, 0.92)))
    hop2, hbox = _render(hopper, HOPPER_FACE, hop_shot, seed=300)
    b.add(
        "other_person/grace_hopper_02.jpg",
        _jpeg_bytes(hop2, 88),
        {"role": "other", "problem": None, "faces": 1, "loads": True, "mode": "RGB",
         "size": list(hop2.size), "face_box": hbox,
         "made": "mirrored, closer crop, head tilted 6 deg, warmer", **HOPPER},
        hop2,
    )

    # ---- problems/
    def render(kind: str, seed: int) -> tuple[Image.Image, list[int]]:
        return _render(astro, ASTRONAUT_FACE, PROBLEM_SHOTS[kind], seed)

    img, box = render("blurry", 400)
    img = img.filter(ImageFilter.GaussianBlur(5))
    b.add("problems/blurry.jpg", _jpeg_bytes(img, 85),
          _problem_entry("blurry", 1, True, "RGB", img.size,
                         "astronaut crop, Gaussian blur radius 5 px (the face is still detectable)", ASTRONAUT,
                         face_box=box), img)

    img, box = render("too_small", 401)
    b.add("problems/too_small.jpg", _jpeg_bytes(img, 90),
          _problem_entry("too_small", 1, True, "RGB", img.size, "astronaut downscaled to 160x200", ASTRONAUT,
                         face_box=box), img)

    from skimage import data

    img = Image.fromarray(data.coffee())
    b.add("problems/no_face.jpg", _jpeg_bytes(img, 85),
          _problem_entry("no_face", 0, True, "RGB", img.size, "skimage coffee cup photo", COFFEE), img)

    # Two people side by side, faces of similar, large size.
    left, lbox = _render(astro, ASTRONAUT_FACE, Shot(size=(512, 640), scale=2.3, centre=(223, 150)), 402)
    right, rbox = _render(hopper, HOPPER_FACE, Shot(size=(512, 640), scale=1.07, centre=(256, 300)), 403)
    img = Image.new("RGB", (1024, 640))
    img.paste(left, (0, 0))
    img.paste(right, (512, 0))
    rbox = [rbox[0] + 512, rbox[1], rbox[2] + 512, rbox[3]]
    b.add("problems/two_faces.jpg", _jpeg_bytes(img, 85),
          _problem_entry("two_faces", 2, True, "RGB", img.size, "astronaut and Grace Hopper side by side",
                         {"person": "eileen_collins+grace_hopper",
                          "source": ASTRONAUT["source"] + "; " + HOPPER["source"],
                          "licence": "public domain (NASA; US Navy)"}, face_boxes=[lbox, rbox]), img)

    dup_src = "person/astronaut_04_tilt_right_warm.jpg"
    with Image.open(root / dup_src) as im:
        orig = im.convert("RGB")
    img = orig.resize((round(orig.width * 0.96), round(orig.height * 0.96)), Image.Resampling.LANCZOS)
    b.add("problems/near_duplicate.jpg", _jpeg_bytes(img, 72),
          _problem_entry("near_duplicate", 1, True, "RGB", img.size,
                         f"{dup_src} resized to 96 % and re-encoded at JPEG quality 72", ASTRONAUT,
                         dup=dup_src, duplicate_of=dup_src,
                         face_box=[round(v * img.width / orig.width) for v in b.entries[dup_src]["face_box"]]), img)

    img, box = render("grayscale", 404)
    img = img.convert("L")
    b.add("problems/grayscale.jpg", _jpeg_bytes(img, 85),
          _problem_entry("grayscale", 1, True, "L", img.size, "astronaut crop saved as 8-bit grayscale (mode L) JPEG",
                         ASTRONAUT, face_box=box), img)

    img, box = render("cmyk", 405)
    cmyk = img.convert("CMYK")
    b.add("problems/cmyk.jpg", _jpeg_bytes(cmyk, 85),
          _problem_entry("cmyk", 1, True, "CMYK", img.size, "astronaut crop saved as a CMYK JPEG", ASTRONAUT,
                         face_box=box), img)

    img, box = render("sixteen_bit", 406)
    # A real 16-bit scan uses the full range and fine steps, not 8-bit values times 257.
    lum = np.asarray(img, np.float32) @ np.array([0.299, 0.587, 0.114], np.float32) / 255.0
    lum16 = (np.clip(lum, 0, 1) * 65535.0 + 0.5).astype(np.uint16)
    lum16 = (lum16 // 16) * 16  # 12-bit depth like many scanners: keeps the PNG small
    img16 = Image.fromarray(lum16)  # mode I;16
    b.add("problems/sixteen_bit.png", _png_bytes(img16),
          _problem_entry("sixteen_bit", 1, True, img16.mode, img16.size,
                         "astronaut crop as a 16-bit grayscale PNG (mode I;16, 12 significant bits)", ASTRONAUT,
                         face_box=box), img16)

    img, box = render("rgba", 407)
    w, h = img.size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    # Cut-out: an oval around the head and shoulders, the rest transparent.
    d = ((xx - w * 0.5) / (w * 0.48)) ** 2 + ((yy - h * 0.52) / (h * 0.56)) ** 2
    alpha = np.clip((1.0 - d) / 0.04, 0, 1)
    rgba = np.dstack([np.asarray(img), (alpha * 255 + 0.5).astype(np.uint8)])
    rgba[alpha == 0, :3] = 0  # hidden pixels carry nothing (and compress to nothing)
    img_rgba = Image.fromarray(rgba, "RGBA")
    b.add("problems/rgba.png", _png_bytes(img_rgba),
          _problem_entry("rgba", 1, True, "RGBA", img.size,
                         "astronaut cut out in an oval; corners fully transparent", ASTRONAUT, face_box=box), img_rgba)

    # Unreadable files.
    full = (root / "person/astronaut_05_mirrored_cool.jpg").read_bytes()
    b.add("problems/truncated.jpg", full[: len(full) // 2],
          _problem_entry("truncated", None, False, None, None,
                         "first half of the bytes of person/astronaut_05_mirrored_cool.jpg", ASTRONAUT))
    b.add("problems/empty.jpg", b"",
          _problem_entry("empty", None, False, None, None, "a 0-byte file", None))
    b.add("problems/not_an_image.jpg", b"This is a text file, not a photo.\nIt only has a .jpg name.\n",
          _problem_entry("not_an_image", None, False, None, None, "a text file named .jpg", None))
    b.add("problems/notes.txt", b"Photos of the astronaut: person/. Problem files: problems/.\n",
          _problem_entry("not_image_suffix", None, False, None, None, "a plain text file (.txt)", None))
    return b


# --------------------------------------------------------------------------- checks


def _check_files(b: _Builder) -> None:
    """Structural checks that need no face detector."""
    root = b.root
    phone = root / "person" / PHONE_NAME
    with Image.open(phone) as im:
        assert im.size == (3000, 4000), im.size
        assert im.getexif().get(0x0112) == 6
        assert ImageOps.exif_transpose(im).size == (4000, 3000)
    with Image.open(root / "problems/cmyk.jpg") as im:
        assert im.mode == "CMYK", im.mode
    with Image.open(root / "problems/sixteen_bit.png") as im:
        assert im.mode.startswith("I;16"), im.mode
    with Image.open(root / "problems/grayscale.jpg") as im:
        assert im.mode == "L"
    for rel, e in b.entries.items():
        if e.get("person") == "eileen_collins" and e["problem"] not in ("too_small", "truncated") and e["size"]:
            assert min(e["size"]) >= 512, (rel, e["size"])
    # Near-duplicates: only the one we made on purpose.
    dup = "problems/near_duplicate.jpg"
    target = b.entries[dup]["duplicate_of"]
    dist = bin(b.hashes[dup] ^ b.hashes[target]).count("1")
    assert dist <= 4, f"near_duplicate is {dist} bits from {target}"
    names = [n for n in b.hashes if n != dup]
    closest = min(
        (bin(b.hashes[x] ^ b.hashes[y]).count("1"), x, y) for i, x in enumerate(names) for y in names[i + 1 :]
    )
    print(f"dHash: near_duplicate vs {target}: {dist} bits; "
          f"closest other pair: {closest[0]} bits ({closest[1]}, {closest[2]})")
    assert closest[0] >= 12, f"unintended near-duplicates: {closest}"


def _hog_input(path: Path) -> tuple[np.ndarray, float, int]:
    """Upright 8-bit RGB at most 1024 px, the downscale factor and the full width."""
    with Image.open(path) as im:
        img = ImageOps.exif_transpose(im)
        if img.mode.startswith("I;16"):  # PIL's own convert would clip 16-bit to white
            img = Image.fromarray((np.asarray(img, np.float32) / 257.0 + 0.5).astype(np.uint8), "L")
        img = img.convert("RGB")
    full_width = img.width
    scale = min(1.0, 1024 / max(img.size))
    if scale < 1.0:
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS)
    return np.asarray(img), scale, full_width


def _check_faces(b: _Builder, margin: float = 0.15) -> None:
    """Every photo with a known face count: dlib HOG finds exactly that many faces.

    Checked at upsample 0 and 1 on a <=1024 px downscale. Besides the count, the best
    non-face candidate must score below ``-margin``, so a different resize or dlib
    build does not turn a borderline candidate into a second face.
    """
    try:
        import dlib
    except ImportError:
        print("dlib not installed: skipping the face-detector check")
        return
    detector = dlib.get_frontal_face_detector()
    problems = []
    for rel, e in b.entries.items():
        if e["faces"] is None:
            continue
        arr, scale, width = _hog_input(b.root / rel)
        for up in (0, 1):
            dets, scores, _ = detector.run(arr, up, -1.0)
            ranked = sorted(zip(scores, dets), key=lambda t: -t[0])
            faces = [(s, d) for s, d in ranked if s >= 0.0]
            rest = [s for s, _ in ranked[e["faces"]:]]
            worst = max(rest, default=-1.0)
            desc = ", ".join(f"w={d.width() / scale / width:.3f} score={s:.2f}" for s, d in faces)
            print(f"  {rel:45s} up{up}: {len(faces)} face(s) [{desc}] best other {worst:.2f}")
            if len(faces) != e["faces"]:
                problems.append(f"{rel} (upsample {up}): found {len(faces)}, expected {e['faces']}")
            elif worst > -margin:
                problems.append(f"{rel} (upsample {up}): a non-face scores {worst:.2f}, too close to 0")
    if problems:
        raise SystemExit("face check failed:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------- main


def _json(obj) -> str:
    """Indented JSON with short number lists (sizes, boxes) kept on one line."""
    text = json.dumps(obj, indent=2)
    numbers = re.compile(r"\[\s*(-?\d+(?:,\s*-?\d+)*)\s*\]")
    return numbers.sub(lambda m: "[" + ", ".join(v.strip() for v in m.group(1).split(",")) + "]", text) + "\n"


def _install(tmp: Path, manifest: dict) -> None:
    """Replace the output folders with the freshly built ones, then write the manifest."""
    for name in OUTPUT_DIRS:
        new, final = tmp / name, HERE / name
        if final.exists():
            old = tmp / f"{name}.old"
            os.replace(final, old)
        os.replace(new, final)
    (tmp / "manifest.json").write_text(_json(manifest), encoding="utf-8")
    os.replace(tmp / "manifest.json", HERE / "manifest.json")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-face-check", action="store_true", help="do not run the dlib HOG check")
    args = parser.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=HERE))
    try:
        b = build(tmp)
        _check_files(b)
        if not args.skip_face_check:
            _check_faces(b)
        manifest = {
            "about": "Sample photos for lora_helpers, regenerated by sample_data/make_sample_data.py. "
            "'faces' is the number of faces in the picture; 'size' is [width, height] after EXIF; "
            "'face_box' is [left, top, right, bottom] in those upright pixels (the source's dlib HOG box, "
            "transformed); 'verdict' is what a photo-preparation stage should say (ok/warn/reject/skip).",
            "files": dict(sorted(b.entries.items())),
        }
        _install(tmp, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(p.stat().st_size for d in OUTPUT_DIRS for p in (HERE / d).iterdir())
    print(f"wrote {len(b.entries)} files, {total / 1e6:.2f} MB, under {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
