"""Seconds per photo for the preparation stage, end to end, on one CPU core.

Runs ``prepare_photos`` on a folder holding only the 12-MP EXIF-rotated sample photo
(load, EXIF, detection, landmarks, embedding, checks, aligned Lanczos crop, mask,
PNG files, metadata, report and contact sheet) several times and prints the time per
photo. The face models are loaded once before timing, as in a real batch.

    python benchmarks/bench_prepare.py [--photo PATH] [--repeats 7] [--resolution 1024]
"""

from __future__ import annotations

import os

# One core: set before numpy / OpenCV start their thread pools.
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import cv2  # noqa: E402

from lora_helpers.prepare.faces import get_backend  # noqa: E402
from lora_helpers.prepare.stage import PrepareConfig, prepare_photos  # noqa: E402

DEFAULT_PHOTO = ROOT / "sample_data" / "person" / "astronaut_08_phone_exif_rotated.jpg"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO, help="photo to time (default: the 12-MP sample)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--resolution", type=int, default=1024)
    args = parser.parse_args()

    cv2.setNumThreads(1)
    try:  # not used by preparation, but keep any import of it to one thread too
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass
    try:
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    except (AttributeError, OSError):
        pass

    backend = get_backend()
    config = PrepareConfig(resolution=args.resolution)
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        shutil.copy2(args.photo, photos / args.photo.name)
        out = Path(tmp) / "dataset"
        prepare_photos(photos, out, config=config, progress=False, backend=backend)  # warm-up
        wall, cpu = [], []
        for i in range(args.repeats):
            shutil.rmtree(out)
            t0, c0 = time.perf_counter(), time.process_time()
            prepare_photos(photos, out, config=config, progress=False, backend=backend)
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
    from PIL import Image

    with Image.open(args.photo) as im:
        mp = im.width * im.height / 1e6
    print(f"photo: {args.photo.name} ({mp:.1f} MP), output {args.resolution} px bucket, 1 thread, {args.repeats} runs")
    print(f"wall s/photo: min {min(wall):.3f}  median {statistics.median(wall):.3f}")
    print(f"cpu  s/photo: min {min(cpu):.3f}  median {statistics.median(cpu):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
