"""Identity scoring on the sample photos: the bounds, the time per image, and the copy threshold.

Prints the leave-one-out similarity among ``sample_data/person`` (the upper bound a
perfect likeness reaches), the similarity of the Grace Hopper photos to those
references (a different person), and the time to find and embed the largest face per
image with dlib at generated-image sizes (1024, 512 and the smoke models' 64 px), with
and without a face in the picture.

Then the calibration of the memorisation flag (``lora_helpers.evaluate.memorisation``):
for each kind of copy (resized and JPEG-compressed, mirrored, squeezed, shifted, ...) the
lowest fingerprint correlation of a copy with its photo, and the highest correlation
between two different photos, on the sample photos as they are and (``--prepared``) on
their prepared 1024 px crops, where every astronaut photo is a re-crop of one picture.

Run from the repository root (CPU; about a minute, 15 s more with ``--prepared``):

    python benchmarks/bench_evaluate.py
    python benchmarks/bench_evaluate.py --repeats 5 --prepared
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from PIL import Image, ImageFilter, ImageOps  # noqa: E402

from lora_helpers.core.images import list_images, load_image  # noqa: E402
from lora_helpers.evaluate.identity import identity_scores, reference_embeddings  # noqa: E402
from lora_helpers.evaluate.memorisation import COPY_THRESHOLD, copy_index  # noqa: E402
from lora_helpers.prepare import PrepareConfig, prepare_photos  # noqa: E402


def _jpeg(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")


def _crop(image: Image.Image, left: float, top: float, right: float, bottom: float) -> Image.Image:
    """Cut the given shares off the sides and scale back: a copy drawn slightly shifted or zoomed."""
    w, h = image.size
    box = (round(w * left), round(h * top), round(w * (1 - right)), round(h * (1 - bottom)))
    return image.crop(box).resize((w, h), Image.BICUBIC)


def _gamma(image: Image.Image, g: float) -> Image.Image:
    return image.point(lambda v: round(255 * (v / 255) ** g))


COPIES = {
    "half size, JPEG 75": lambda im: _jpeg(im.resize((im.width // 2, im.height // 2), Image.LANCZOS), 75),
    "mirrored, JPEG 85": lambda im: _jpeg(ImageOps.mirror(im), 85),
    "JPEG 60": lambda im: _jpeg(im, 60),
    "squeezed to 1024x1024": lambda im: im.resize((1024, 1024), Image.BICUBIC),
    "64x64 (smoke size)": lambda im: im.resize((64, 64), Image.BICUBIC),
    "blur radius 2": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
    "gamma 0.7": lambda im: _gamma(im, 0.7),
    "shifted 2 %": lambda im: _crop(im, 0.02, 0, 0, 0),
    "zoomed 5 %": lambda im: _crop(im, 0.025, 0.025, 0.025, 0.025),
    "turned 3 degrees": lambda im: im.rotate(3, resample=Image.BICUBIC, fillcolor=(128, 128, 128)),
}


def copy_calibration(label: str, photos: dict[str, Image.Image]) -> None:
    """Print the lowest correlation of each kind of copy and the highest between different photos."""
    index = copy_index(list(photos.items()))
    print(f"\ncopy fingerprints, {label} ({len(photos)} photos; threshold {COPY_THRESHOLD:.2f}):")
    for how, make in COPIES.items():
        matches = {name: index.match(make(im)) for name, im in photos.items()}
        # A copy can match another photo more closely only when the two photos are themselves near-copies.
        worst = min((m.similarity, name) for name, m in matches.items() if m.photo == name)
        missed = sum(m.photo != name for name, m in matches.items())
        print(f"  copy {how:<24} lowest {worst[0]:.3f} ({worst[1]})" + (f"; {missed} matched another photo" if missed else ""))
    pairs = []
    for name, image in photos.items():
        others = copy_index([(n, im) for n, im in photos.items() if n != name])
        match = others.match(image)
        pairs.append((match.similarity, name, match.photo))
    for sim, a, b in sorted(pairs, reverse=True)[:3]:
        print(f"  different photos        {sim:.3f}  {a} ~ {b}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per size (median is printed)")
    parser.add_argument("--prepared", action="store_true", help="also calibrate on the prepared 1024 px crops")
    args = parser.parse_args()

    sample = REPO / "sample_data"
    start = time.perf_counter()
    refs = reference_embeddings(sample / "person", progress=False)
    load_and_refs = time.perf_counter() - start
    print(f"references: {len(refs.names)} photos of sample_data/person ({load_and_refs:.1f} s incl. loading dlib)")
    for name, sim in zip(refs.names, refs.leave_one_out):
        print(f"  leave-one-out {sim:.4f}  {name}")
    print(f"  upper bound (mean leave-one-out): {refs.upper_bound:.4f}; threshold {refs.threshold:.2f}")
    others = sorted((sample / "other_person").glob("*.jpg"))
    for path, s in zip(others, identity_scores(others, refs, progress=False)):
        print(f"  other person {s.similarity:.4f} ({'pass' if s.passed else 'fail'})  {path.name}")

    face = load_image(sample / "person" / "astronaut_02_full_bright.jpg")  # 1024 x 1024, face ~180 px
    no_face = load_image(sample / "problems" / "no_face.jpg")
    print("\nidentity scoring time per image (detect + embed the largest face, CPU):")
    for label, image in (("face", face), ("no face", no_face)):
        for side in (1024, 512, 64):
            im = image.resize((side, side))
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                score = identity_scores([im], refs, progress=False)[0]
                times.append(time.perf_counter() - t)
            times.sort()
            print(f"  {label:<8} {side:>4} px: {times[len(times) // 2] * 1000:6.0f} ms  "
                  f"(found: {score.face_found}, similarity {score.similarity:.3f})")

    raw = {p.name: load_image(p) for p in list_images(sample / "person") + list_images(sample / "other_person")}
    copy_calibration("sample_data/person and other_person as they are", raw)
    if args.prepared:
        with tempfile.TemporaryDirectory() as tmp:
            prepare_photos(sample / "person", tmp, config=PrepareConfig(resolution=1024), progress=False)
            crops = {p.name: load_image(p) for p in list_images(Path(tmp) / "images")}
        copy_calibration("their prepared 1024 px crops", crops)


if __name__ == "__main__":
    main()
