"""Grids, PNG metadata and the image cache (no models needed)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from lora_helpers.core.grids import grid_layout, make_grid, read_png_metadata, save_png_with_metadata
from lora_helpers.generate.cache import ImageCache, cache_key


def _solid(colour, size=(64, 48)) -> Image.Image:
    return Image.new("RGB", size, colour)


def _noise(seed: int, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _ink(image: Image.Image, box) -> int:
    """Number of dark (text) pixels in a box of a white-background grid."""
    region = np.asarray(image.crop(box).convert("L"))
    return int((region < 128).sum())


COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def test_every_image_sits_in_its_cell_and_labels_are_drawn():
    images = [_solid(c) for c in COLOURS]
    rows, cols = 2, 3
    row_labels = ["a photo of TOK person", "TOK person as an astronaut, oil painting"]
    col_labels = ["seed 0", "seed 1", "seed 2"]
    grid = make_grid(images, rows=rows, cols=cols, row_labels=row_labels, col_labels=col_labels, title="prompt x seed")
    layout = grid_layout(rows, cols, (64, 48), row_labels=row_labels, col_labels=col_labels, title="prompt x seed")

    assert grid.size == (layout.width, layout.height)
    assert layout.width == layout.row_label_w + layout.gap + cols * (64 + layout.gap)
    assert layout.height == layout.title_h + layout.col_label_h + layout.gap + rows * (48 + layout.gap)
    for i, colour in enumerate(COLOURS):
        r, c = divmod(i, cols)
        cell = np.asarray(grid.crop(layout.cell_box(r, c)))
        assert cell.shape == (48, 64, 3)
        assert (cell == colour).all(), f"cell ({r}, {c}) does not hold image {i}"
    for r in range(rows):
        assert _ink(grid, layout.row_label_box(r)) > 30, f"row label {r} missing"
    for c in range(cols):
        assert _ink(grid, layout.col_label_box(c)) > 20, f"column label {c} missing"
    assert _ink(grid, layout.title_box()) > 30
    # Labels stay readable on tiny (smoke-mode) cells.
    assert layout.font_px >= 14


def test_grid_without_labels_is_only_images_and_gaps():
    images = [_solid(c, (32, 32)) for c in COLOURS[:4]]
    grid = make_grid(images, rows=2, cols=2)
    layout = grid_layout(2, 2, (32, 32))
    assert layout.row_label_w == layout.col_label_h == layout.title_h == 0
    assert grid.size == (2 * 32 + 3 * layout.gap, 2 * 32 + 3 * layout.gap)
    assert (np.asarray(grid.crop(layout.cell_box(1, 1))) == COLOURS[3]).all()


def test_long_labels_wrap_inside_their_box_and_missing_cells_are_grey():
    long = "a very long prompt about TOK person standing in front of a building with many windows " * 3
    grid = make_grid([_solid(COLOURS[0]), None], rows=1, cols=3, row_labels=[long], col_labels=["a", "failed one", "pad"])
    layout = grid_layout(1, 3, (64, 48), row_labels=[long], col_labels=["a", "failed one", "pad"])
    # Text never spills onto the pictures: the first cell is still pure red.
    assert (np.asarray(grid.crop(layout.cell_box(0, 0))) == COLOURS[0]).all()
    # A failed image (None) and a padding cell are grey, the failed one says so.
    failed = np.asarray(grid.crop(layout.cell_box(0, 1)).convert("L"))
    padding = np.asarray(grid.crop(layout.cell_box(0, 2)).convert("L"))
    assert (padding == padding[0, 0]).all() and padding[0, 0] < 255
    assert (failed < 100).sum() > 0


def test_images_are_resized_to_the_cell_size():
    grid = make_grid([_solid(COLOURS[0], (64, 64)), _solid(COLOURS[1], (128, 128))], rows=1, cols=2)
    layout = grid_layout(1, 2, (64, 64))
    assert grid.size == (layout.width, layout.height)
    assert (np.asarray(grid.crop(layout.cell_box(0, 1))) == COLOURS[1]).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(images=[_solid(COLOURS[0])] * 5, rows=2, cols=2), "do not fit"),
        (dict(images=[_solid(COLOURS[0])] * 2, rows=1, cols=2, row_labels=["a", "b"]), "row labels"),
        (dict(images=[_solid(COLOURS[0])] * 2, rows=1, cols=2, col_labels=["a"]), "column labels"),
        (dict(images=[], rows=1, cols=1), "no images"),
    ],
)
def test_bad_grid_requests_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_grid(**kwargs)


def test_png_metadata_round_trip_is_atomic(tmp_path):
    params = {"prompt": "ein Foto von TOK person, Café — 東京", "seed": 3, "guidance": 5.5, "lora_scale": None,
              "scheduler_config": {"beta_start": 0.00085}}
    path = save_png_with_metadata(tmp_path / "out" / "image.png", _noise(0), params)
    text = Image.open(path).text
    assert text["prompt"] == params["prompt"]
    assert text["seed"] == "3" and text["guidance"] == "5.5" and text["lora_scale"] == "null"
    assert read_png_metadata(path)["scheduler_config"] == '{"beta_start": 0.00085}'
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(_noise(0)))
    assert sorted(p.name for p in path.parent.iterdir()) == ["image.png"], "temporary files left behind"
    with pytest.raises(ValueError, match="png"):
        save_png_with_metadata(tmp_path / "image.jpg", _noise(0), params)


# --------------------------------------------------------------------------- cache

BASE_PARAMS = {"base_model": "stabilityai/stable-diffusion-xl-base-1.0", "lora_sha256": "ab" * 32, "lora_scale": 0.8,
               "prompt": "a photo of TOK person", "negative_prompt": "blurry", "seed": 1, "width": 1024, "height": 1024,
               "steps": 30, "guidance": 5.0, "scheduler": "EulerDiscreteScheduler",
               "scheduler_config": {"beta_schedule": "scaled_linear"}}


@pytest.mark.parametrize("field, value", [
    ("base_model", "other/model"), ("lora_sha256", "cd" * 32), ("lora_scale", 0.9), ("prompt", "a photo of TOK"),
    ("negative_prompt", ""), ("seed", 2), ("width", 512), ("steps", 31), ("guidance", 5.5),
    ("scheduler", "DDIMScheduler"), ("scheduler_config", {"beta_schedule": "linear"}),
])
def test_every_pixel_changing_parameter_changes_the_key(field, value):
    assert cache_key({**BASE_PARAMS, field: value}) != cache_key(BASE_PARAMS)


def test_key_ignores_spelling_and_order():
    shuffled = dict(reversed(list(BASE_PARAMS.items())))
    assert cache_key(shuffled) == cache_key(BASE_PARAMS)
    assert cache_key({**BASE_PARAMS, "guidance": 5}) == cache_key(BASE_PARAMS)  # 5 and 5.0


def test_cache_returns_identical_pixels_and_bytes(tmp_path):
    cache = ImageCache(tmp_path / "cache")
    key = cache_key(BASE_PARAMS)
    assert cache.get(key) is None and key not in cache
    image = _noise(1)
    path = cache.put(key, image, {"prompt": BASE_PARAMS["prompt"]})
    assert key in cache and len(cache) == 1
    hit = cache.get(key)
    assert hit.tobytes() == image.tobytes() and hit.size == image.size and hit.mode == "RGB"
    assert cache.get_bytes(key) == path.read_bytes()
    assert hit.text["prompt"] == BASE_PARAMS["prompt"]
    assert cache.hits == 2 and cache.misses == 1


def test_cache_evicts_least_recently_used_to_stay_under_its_size(tmp_path):
    images = [_noise(i) for i in range(4)]
    keys = [cache_key({**BASE_PARAMS, "seed": i}) for i in range(4)]
    probe = ImageCache(tmp_path / "probe")
    size = probe.put(keys[0], images[0]).stat().st_size
    cache = ImageCache(tmp_path / "cache", max_bytes=int(size * 3.5))  # room for three
    for i in range(3):
        cache.put(keys[i], images[i])
        cache.touch(keys[i], 1_000_000 + i)  # put order, explicit times
    cache.get(keys[0])  # key 0 becomes the most recently used; key 1 is now the oldest
    cache.put(keys[3], images[3])
    assert keys[1] not in cache
    assert all(k in cache for k in (keys[0], keys[2], keys[3]))
    assert cache.total_bytes() <= cache.max_bytes


def test_damaged_cache_file_is_a_miss_and_is_removed(tmp_path):
    cache = ImageCache(tmp_path)
    key = cache_key(BASE_PARAMS)
    path = cache.put(key, _noise(2))
    path.write_bytes(path.read_bytes()[:100])
    with pytest.warns(UserWarning, match="unreadable"):
        assert cache.get(key) is None
    assert not path.exists()


def test_cache_writes_leave_no_temporary_files(tmp_path):
    cache = ImageCache(tmp_path)
    for i in range(3):
        cache.put(cache_key({**BASE_PARAMS, "seed": i}), _noise(i))
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.startswith(".")]
    assert not leftovers
    assert all(os.path.getsize(p) > 0 for p in tmp_path.rglob("*.png"))
