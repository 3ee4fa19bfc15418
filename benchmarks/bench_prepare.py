"""Seconds per photo for the preparation stage, end to end, on one CPU core, against a reference.

Runs ``prepare_photos`` on a folder holding only the 12-MP EXIF-rotated sample photo
(load, EXIF, detection, landmarks, embedding, checks, aligned crop, mask,
PNG files, metadata, report and contact sheet), with the face models loaded once before
timing, as in a real batch. Our machines are shared and noisy, so the same run also times
a reference version of the package (default: ``main``, taken with ``git archive``): two
worker processes pinned to one core take turns, one photo at a time (ABBA order), and the
table gives min and median of each and the ratio of this tree to the reference.

    python benchmarks/bench_prepare.py [--photo PATH] [--repeats 9] [--resolution 1024] [--copies 1]
                                       [--reference main | --reference none] [--profile 25]

``--copies N`` prepares N copies of the photo per run and divides by N: the per-photo
cost inside a set, where the report and contact sheet are shared (the copies are
processed in full; being duplicates only changes their verdict afterwards).

``--profile N`` adds the N costliest calls of one run of this tree (cProfile, cumulative).
"""

from __future__ import annotations

import os

# One core: set before numpy / OpenCV start their thread pools (workers inherit it).
for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[var] = "1"

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PHOTO = ROOT / "sample_data" / "person" / "astronaut_08_phone_exif_rotated.jpg"


def _one_core() -> None:
    import cv2

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


def worker(photos: Path, resolution: int, profile: int) -> int:
    """Answer each "run" line on stdin with one timed ``prepare_photos`` as a JSON line."""
    _one_core()
    import lora_helpers
    from lora_helpers.prepare.faces import get_backend
    from lora_helpers.prepare.stage import PrepareConfig, prepare_photos

    backend = get_backend()
    config = PrepareConfig(resolution=resolution)
    out = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    try:
        def once() -> dict:
            shutil.rmtree(out, ignore_errors=True)
            t0, c0 = time.perf_counter(), time.process_time()
            prepare_photos(photos, out, config=config, progress=False, backend=backend)
            return {"wall": time.perf_counter() - t0, "cpu": time.process_time() - c0}

        once()  # warm-up: lazy model parts, caches, first-call imports
        print(json.dumps({"ready": str(Path(lora_helpers.__file__).parent)}), flush=True)
        for line in sys.stdin:
            if line.strip() == "profile":
                import cProfile
                import io
                import pstats

                prof = cProfile.Profile()
                prof.runcall(once)
                text = io.StringIO()
                pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(profile)
                print(json.dumps({"profile": text.getvalue()}), flush=True)
            elif line.strip() == "run":
                print(json.dumps(once()), flush=True)
            else:
                break
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return 0


class _Worker:
    def __init__(self, package_root: Path, photos: Path, args):
        env = {**os.environ, "PYTHONPATH": str(package_root)}
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(photos),
               "--resolution", str(args.resolution), "--profile", str(args.profile)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                                     cwd=package_root)
        self.package = self._read()["ready"]
        self.wall, self.cpu = [], []
        self.copies = args.copies

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"benchmark worker failed (exit {self.proc.wait()}); see the error above")
        return json.loads(line)

    def ask(self, what: str) -> dict:
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return self._read()

    def run(self) -> None:
        r = self.ask("run")
        self.wall.append(r["wall"] / self.copies)
        self.cpu.append(r["cpu"] / self.copies)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _reference_tree(ref: str, into: Path) -> Path:
    """The ``lora_helpers`` package as of git revision ``ref``, unpacked under ``into``."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "lora_helpers"], capture_output=True)
    if archive.returncode != 0:
        raise SystemExit(f"--reference {ref}: git archive failed: {archive.stderr.decode().strip()}")
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photo", type=Path, default=DEFAULT_PHOTO, help="photo to time (default: the 12-MP sample)")
    parser.add_argument("--repeats", type=int, default=9, help="timed runs of each version")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--reference", default="main", help="git revision to compare with, or 'none'")
    parser.add_argument("--copies", type=int, default=1, help="copies of the photo per run (time per photo)")
    parser.add_argument("--profile", type=int, default=0, help="print the N costliest calls of this tree")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.resolution, args.profile)
    if not args.photo.is_file():
        raise SystemExit(f"--photo {args.photo}: no such file")

    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        photos.mkdir()
        for i in range(args.copies):
            shutil.copy2(args.photo, photos / (args.photo.name if i == 0 else f"{args.photo.stem}_{i}{args.photo.suffix}"))
        versions = {"this tree": _Worker(ROOT, photos, args)}
        if args.reference != "none":
            tree = _reference_tree(args.reference, Path(tmp) / "reference")
            versions[f"reference ({args.reference})"] = _Worker(tree, photos, args)
        workers = list(versions.values())
        for i in range(args.repeats):
            for w in workers if i % 2 == 0 else workers[::-1]:  # ABBA: drift hits both alike
                w.run()
        profile = workers[0].ask("profile")["profile"] if args.profile else ""
        for w in workers:
            w.close()

    from PIL import Image

    with Image.open(args.photo) as im:
        mp = im.width * im.height / 1e6
    import importlib.util

    print(f"photo: {args.photo.name} ({mp:.1f} MP) x {args.copies} per run, output {args.resolution} px bucket, "
          f"1 thread, {args.repeats} runs each, taking turns; PNG deflate here: "
          f"{'ISA-L' if importlib.util.find_spec('isal') else 'OpenCV (zlib)'}")
    for name, w in versions.items():
        print(f"  {name}: {w.package}")
    print(f"{'s/photo':24s} {'wall min':>9s} {'wall median':>12s} {'cpu min':>9s} {'cpu median':>11s}")
    rows = {name: (min(w.wall), statistics.median(w.wall), min(w.cpu), statistics.median(w.cpu))
            for name, w in versions.items()}
    for name, row in rows.items():
        print(f"{name:24s} {row[0]:9.3f} {row[1]:12.3f} {row[2]:9.3f} {row[3]:11.3f}")
    if len(rows) == 2:
        new, ref = rows.values()
        print(f"{'ratio this / reference':24s} " + " ".join(
            f"{a / b:{w}.2f}" for a, b, w in zip(new, ref, (9, 12, 9, 11))))
    if profile:
        print(profile)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
