"""SDXL's aspect-ratio buckets: the sizes every stage crops, trains and generates at.

SDXL was trained on these nine sizes of about 1024² pixels. Preparation crops each photo to
the bucket nearest its shape; training keeps an image that is already at a bucket and
snaps any other image to its nearest one, so both stages agree by construction.
"""

from __future__ import annotations

import math

__all__ = ["SDXL_BUCKETS", "bucket_sizes", "nearest_bucket", "training_size"]

SDXL_BUCKETS: list[tuple[int, int]] = [
    (1024, 1024),
    (1152, 896),
    (896, 1152),
    (1216, 832),
    (832, 1216),
    (1344, 768),
    (768, 1344),
    (1536, 640),
    (640, 1536),
]


def bucket_sizes(resolution: int = 1024) -> list[tuple[int, int]]:
    """SDXL buckets scaled to ``resolution`` (1024: the real sizes), multiples of 8.

    Args:
        resolution: side of the square bucket; 64 gives 64x64, 72x56, 56x72, ...

    Returns:
        Unique ``(width, height)`` pairs, square first.
    """
    k = resolution / 1024.0
    out: list[tuple[int, int]] = []
    for w, h in SDXL_BUCKETS:
        size = (max(8, 8 * round(w * k / 8)), max(8, 8 * round(h * k / 8)))
        if size not in out:
            out.append(size)
    return out


def nearest_bucket(width: int, height: int, *, resolution: int = 1024, square_only: bool = False) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to ``width / height`` (in log terms)."""
    if square_only:
        side = max(8, 8 * round(resolution / 8))
        return (side, side)
    aspect = math.log(width / height)
    return min(bucket_sizes(resolution), key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def training_size(width: int, height: int, resolution: int) -> tuple[int, int]:
    """The (width, height) an image trains at: its own size when that is a bucket, else the nearest bucket.

    Args:
        width, height: the image's size in px.
        resolution: the training side (1024 for SDXL, 64 for the tiny models).

    Returns:
        ``(width, height)`` to train at.
    """
    if (width, height) in bucket_sizes(resolution):  # what the prepare stage writes
        return width, height
    return nearest_bucket(width, height, resolution=resolution)
