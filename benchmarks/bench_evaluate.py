"""Identity scoring on the sample photos: the bounds and the time per image on this machine.

Prints the leave-one-out similarity among ``sample_data/person`` (the upper bound a
perfect likeness reaches), the similarity of the Grace Hopper photos to those
references (a different person), and the time to find and embed the largest face per
image with dlib at generated-image sizes (1024, 512 and the smoke models' 64 px), with
and without a face in the picture.

Run from the repository root (CPU; under a minute):

    python benchmarks/bench_evaluate.py
    python benchmarks/bench_evaluate.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from lora_helpers.evaluate.identity import identity_scores, reference_embeddings  # noqa: E402
from lora_helpers.core.images import load_image  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timing repeats per size (median is printed)")
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


if __name__ == "__main__":
    main()
