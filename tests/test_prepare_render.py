"""Rendering a crop: sharpness of the resampling, the padding fill at the photo's edge."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from skimage import data

from lora_helpers.prepare import align


def _alignment(scale: float, angle: float, eye=(256.0, 200.0), out=(512, 512)) -> align.Alignment:
    matrix = align._similarity(scale, angle, np.array(eye), (out[0] / 2 - 0.5, 0.4 * out[1] - 0.5))
    return align.Alignment(matrix=matrix, out_size=out, scale=scale, angle=angle)


def _fine_detail(image: np.ndarray) -> float:
    return float(cv2.Laplacian(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), cv2.CV_64F).var())


@pytest.mark.parametrize("scale", [0.6, 1.0, 1.7])  # area shrink first, plain rotation, enlargement
def test_crop_keeps_the_fine_detail_lanczos_keeps(scale):
    photo_ = data.astronaut()  # a real photo with hair, fabric and print
    alignment = _alignment(scale, 5.0)
    crop = align.warp(photo_, alignment, pad="reflect")
    lanczos = align.warp(photo_, alignment, resample="lanczos", pad="reflect")
    # Bilinear keeps ~60 % of Lanczos' finest detail here; the training crop must keep most of it.
    assert _fine_detail(crop) >= 0.85 * _fine_detail(lanczos)
    mse = np.mean((crop.astype(np.float64) - lanczos) ** 2)
    assert 10 * np.log10(255**2 / mse) > 44  # under one grey level apart on average


def _shifted(tx: float, padding: float) -> align.Alignment:
    """No rotation, scale 1: photo column 0 lands on output column ``tx``."""
    return align.Alignment(matrix=np.array([[1.0, 0.0, tx], [0.0, 1.0, -20.0]]), out_size=(256, 256), scale=1.0,
                           angle=0.0, padding=padding, padding_sides=("left",) if padding else ())


def test_padding_fill_starts_at_the_photo_edge_and_spares_the_photo():
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    alignment = _shifted(100.0, 100 / 256)  # the photo's left edge at output x = 99.5
    blurred = align.warp(image, alignment, pad="blur")
    black = align.warp(image, alignment, pad="black")
    assert black[:, :100].max() == 0
    np.testing.assert_array_equal(black[:, 100:], image[20:276, 0:156])
    # Outside the photo: the blurred fill, not black; inside, a fade of a few pixels, then the photo itself.
    assert blurred[:, :100].mean() > 60
    assert not np.array_equal(blurred[:, 100:102], image[20:276, 0:2])
    np.testing.assert_array_equal(blurred[:, 106:], image[20:276, 6:156])


def test_a_crop_touching_the_photo_edge_gets_no_fill():
    image = np.random.default_rng(0).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    alignment = _shifted(0.0, 0.01)  # output column 0 is photo column 0
    np.testing.assert_array_equal(align.warp(image, alignment, pad="blur"), image[20:276, 0:256])
