"""Seconds to write one PNG: our writer (ISA-L deflate) against PIL and OpenCV, same run.

Two 1024-px pictures: a prepared training crop (a real photo, the 12-MP sample's crop)
and a smooth generated-looking one (the astronaut sample enlarged). The writers take
turns; each figure is min / median of ``--repeats`` and a ratio to PIL at its default
level (what generation and grids used before), with the file size.

    python benchmarks/bench_png.py [--repeats 9]
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse
import io
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _pictures():
    import numpy as np
    from PIL import Image

    from lora_helpers.prepare.faces import get_backend
    from lora_helpers.prepare.stage import PrepareConfig, prepare_photos

    tmp = Path(tempfile.mkdtemp())
    try:
        photos = tmp / "photos"
        photos.mkdir()
        shutil.copy2(ROOT / "sample_data" / "person" / "astronaut_08_phone_exif_rotated.jpg", photos)
        prepare_photos(photos, tmp / "out", config=PrepareConfig(), progress=False, backend=get_backend())
        with Image.open(next((tmp / "out" / "images").glob("*.png"))) as im:
            crop = np.asarray(im.convert("RGB"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    with Image.open(ROOT / "sample_data" / "person" / "astronaut_01_headshot.jpg") as im:
        smooth = np.asarray(im.convert("RGB").resize((1024, 1024), Image.Resampling.BICUBIC))
    return {"training crop": crop, "smooth 1024 px": smooth}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    import cv2
    from PIL import Image

    from lora_helpers.core import png

    cv2.setNumThreads(1)

    def pil(level):
        def write(a):
            buffer = io.BytesIO()
            Image.fromarray(a).save(buffer, format="PNG", compress_level=level)
            return buffer.getvalue()
        return write

    writers = {"PIL level 6 (default)": pil(6), "PIL level 1": pil(1),
               "OpenCV level 1, RLE, Up": png._encode_with_opencv}
    if png.fast_deflate_available():
        writers["ours (ISA-L)"] = png.encode_png
    else:
        print("isal is not installed: our writer falls back to OpenCV here")
    for name, array in _pictures().items():
        times = {w: [] for w in writers}
        sizes = {}
        for i in range(args.repeats):
            for w in (list(writers) if i % 2 == 0 else list(writers)[::-1]):
                t0 = time.perf_counter()
                sizes[w] = len(writers[w](array))
                times[w].append(time.perf_counter() - t0)
        ref = statistics.median(times["PIL level 6 (default)"])
        print(f"\n{name} ({array.shape[1]}x{array.shape[0]}), {args.repeats} runs each, one thread")
        print(f"{'writer':26s} {'min s':>8s} {'median s':>9s} {'ratio':>6s} {'MB':>6s}")
        for w, t in times.items():
            print(f"{w:26s} {min(t):8.4f} {statistics.median(t):9.4f} {statistics.median(t) / ref:6.3f} "
                  f"{sizes[w] / 1e6:6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
