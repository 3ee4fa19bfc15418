"""PNG files from the fast encoder: lossless, readable by every decoder, and the same
pixels when ISA-L is missing and OpenCV writes them."""

from __future__ import annotations

import io
import sys

import cv2
import numpy as np
import pytest
from PIL import Image

from lora_helpers.core import png

SHAPES = [(1, 1), (1, 1, 3), (37, 53), (37, 53, 3), (5, 9, 4), (300, 401, 3)]


def _random(shape) -> np.ndarray:
    return np.random.default_rng(len(shape) * 100 + shape[0]).integers(0, 256, shape, dtype=np.uint8)


def _decode_cv2(data: bytes, channels: int) -> np.ndarray:
    out = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    conversion = {3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGBA}.get(channels)
    return out if conversion is None else cv2.cvtColor(out, conversion)


@pytest.fixture(params=["isal", "opencv"])
def encoder(request, monkeypatch):
    """Both ways of writing: ISA-L's deflate, and OpenCV's where ``isal`` cannot be imported."""
    if request.param == "isal":
        pytest.importorskip("isal")
    else:
        monkeypatch.setitem(sys.modules, "isal", None)  # import isal now raises ImportError
    return request.param


@pytest.mark.parametrize("shape", SHAPES)  # 1-px images, masks, crops, RGBA, odd widths
def test_every_decoder_reads_back_the_same_pixels(encoder, shape):
    array = _random(shape)
    data = png.encode_png(array)
    with Image.open(io.BytesIO(data)) as im:
        im.verify()  # checks every chunk's CRC
    with Image.open(io.BytesIO(data)) as im:
        np.testing.assert_array_equal(np.asarray(im), array)  # RGB order kept, nothing rounded
    np.testing.assert_array_equal(_decode_cv2(data, 1 if array.ndim == 2 else shape[2]), array)


def test_views_and_strided_arrays_are_written_as_they_look(encoder):
    base = _random((40, 60, 3))
    for view in (base[::2, 1::3], base[:, :, ::-1], np.asfortranarray(base)):
        with Image.open(io.BytesIO(png.encode_png(view))) as im:
            np.testing.assert_array_equal(np.asarray(im), view)


def test_a_real_crop_is_about_as_small_as_opencvs_file():
    pytest.importorskip("isal")
    from skimage import data as samples

    photo = samples.astronaut()
    fast = png.encode_png(photo)
    reference = png._encode_with_opencv(photo)
    assert len(fast) <= 1.1 * len(reference)
    assert len(fast) < 0.8 * photo.nbytes  # compressed, not stored


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4, 3), np.uint8),
                                 np.zeros((2, 2, 2, 3), np.uint8)])
def test_other_arrays_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="uint8 array of shape"):
        png.encode_png(bad)


def test_fast_deflate_reports_what_it_finds(monkeypatch):
    monkeypatch.setitem(sys.modules, "isal", None)
    assert png.fast_deflate_available() is False


def test_save_image_writes_plain_pngs_fast_and_keeps_pil_for_options(tmp_path):
    from PIL import PngImagePlugin

    from lora_helpers.core.fileio import save_image

    image = Image.fromarray(_random((48, 64, 3)))
    fast = save_image(tmp_path / "plain.png", image)
    with Image.open(fast) as im:
        np.testing.assert_array_equal(np.asarray(im), np.asarray(image))
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", "TOK person")
    with Image.open(save_image(tmp_path / "with_text.png", image, pnginfo=info)) as im:
        assert im.text["prompt"] == "TOK person"  # options still reach PIL
        np.testing.assert_array_equal(np.asarray(im), np.asarray(image))
    assert not list(tmp_path.glob(".*tmp*"))  # both written atomically, nothing left behind


def test_text_chunks_read_back_in_any_language(encoder):
    text = {"prompt": "TOK person at the café", "negative": "模糊, 低质量", "seed": "7"}
    data = png.encode_png(_random((16, 24, 3)), text=text)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        assert im.text == text
    with pytest.raises(ValueError, match="1 to 79 Latin-1"):
        png.encode_png(_random((4, 4)), text={"": "x"})
    with pytest.raises(ValueError, match="1 to 79 Latin-1"):
        png.encode_png(_random((4, 4)), text={"提示": "x"})
