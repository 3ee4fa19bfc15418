"""Loading photos the way people actually have them.

Phone JPEGs carry EXIF rotation, scanners give CMYK or grayscale, screenshots RGBA,
editors 16-bit PNGs. Everything becomes upright 8-bit RGB here, and anything we cannot
read raises :class:`ImageLoadError` naming the file and what to do, so one bad file
never stops a batch.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

__all__ = ["IMAGE_SUFFIXES", "ImageLoadError", "list_images", "load_image", "to_rgb"]

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".heic", ".heif"}

try:  # HEIC from iPhones, only where the optional plugin is installed
    from pillow_heif import register_heif_opener  # type: ignore

    register_heif_opener()
except Exception:  # pragma: no cover - optional
    pass

# A truncated JPEG must be an error we report, not grey pixels we train on.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageLoadError(ValueError):
    """A file that is not a usable image; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


def list_images(folder: str | os.PathLike, *, include_all_files: bool = False) -> list[Path]:
    """List the files in a folder that we treat as photos, sorted by name.

    Args:
        folder: folder to list (not recursive); hidden files are skipped.
        include_all_files: also list files without an image suffix, so a caller can
            report them as "not an image" instead of silently ignoring them.

    Returns:
        Sorted list of paths.

    Raises:
        FileNotFoundError: when ``folder`` does not exist.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"photo folder not found: {folder} (check the path)")
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if include_all_files:
        return files
    return [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (CMYK, L, LA, P, RGBA, I;16, I, F) to 8-bit RGB.

    Transparent areas are composited onto white, since that is how people saw the
    picture; 16-bit and float images are scaled to their own range, not clipped.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        hi = 65535.0 if mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr8 = np.clip(arr / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode == "CMYK":
        # PIL's naive CMYK->RGB is what viewers without a colour profile show; good enough for faces.
        return image.convert("RGB")
    return image.convert("RGB")


def load_image(path: str | os.PathLike, *, max_pixels: int = 120_000_000) -> Image.Image:
    """Load a photo as upright 8-bit RGB.

    Args:
        path: the image file; it is only read, never modified.
        max_pixels: refuse larger images (decompression bombs, panoramas) with a message.

    Returns:
        A fully loaded RGB ``PIL.Image`` with EXIF orientation applied.

    Raises:
        ImageLoadError: for a missing, empty, truncated, corrupt or non-image file,
            with the reason and what to do.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if path.stat().st_size == 0:
        raise ImageLoadError(path, "empty file (0 bytes); copy the photo again")
    if path.suffix.lower() in (".heic", ".heif") and "HEIF" not in Image.registered_extensions().values():
        raise ImageLoadError(path, "HEIC photo but pillow-heif is not installed; `pip install pillow-heif` or export as JPEG")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > max_pixels:
                    raise ImageLoadError(path, f"{im.width}x{im.height} is too large to process; resize it below {max_pixels // 1_000_000} MP")
                im.load()
                image = ImageOps.exif_transpose(im) or im
                image = to_rgb(image)
                image.load()
                return image
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise ImageLoadError(path, "not an image file pillow can read (JPEG, PNG, WebP expected)") from None
    except (OSError, SyntaxError) as exc:
        msg = str(exc)
        if "truncated" in msg.lower() or "image file is" in msg.lower():
            raise ImageLoadError(path, f"truncated or damaged image ({msg}); copy the photo again") from None
        raise ImageLoadError(path, f"cannot read image ({msg})") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageLoadError(path, f"image too large ({exc})") from None
