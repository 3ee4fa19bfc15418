"""Training speed (s/step) and peak memory, against the memory planner's estimate.

Three measurements:

* CPU, tiny SDXL (64 px) and small SDXL architecture (128 px, real SDXL topology at a
  fraction of the width): the cpu-smoke path, each model in its own process so the peak
  host memory (RSS) belongs to it alone.
* GPU (``--gpu``): the full-size SDXL (2.6 B-parameter UNet, random weights, written once by
  ``lora_helpers.core.tiny_models.build_full_sdxl``) at 1024 px in the ``t4-8gb`` preset: fp16 UNet,
  fp32 LoRA, GradScaler, gradient checkpointing, 8-bit AdamW, 8 GB budget enforced. Reports
  ``torch.cuda.max_memory_allocated`` beside the planner's estimate; the goal is at most 7 GB.
* ``--trace``: the full SDXL UNet's training step traced on CPU with fake tensors (no GPU, no
  weights): the activation bytes the planner's coefficients come from.

Run from the repository root:

    python benchmarks/bench_train.py                      # CPU: tiny and small, 10 steps each
    python benchmarks/bench_train.py --models tiny --steps 20 --threads 1
    python benchmarks/bench_train.py --gpu --steps 30     # on a CUDA machine (~7 GB of disk for the model)
    python benchmarks/bench_train.py --trace              # planner check on CPU (about a minute)
    python benchmarks/bench_train.py --phases --models small --threads 1 --compare /path/to/other/checkout
                                                          # time to the first step and after the last one

On a machine whose cores are busy with other work, ``--threads 1`` is faster than two
threads that wait on each other; compare like with like.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("BENCH_CODE_ROOT", str(ROOT)))  # --compare: the other checkout's lora_helpers

_SIZES = {"tiny": 64, "small": 128, "full": 1024}


def _dataset(folder: Path, size: int, n: int = 6) -> Path:
    """n captioned crops of scikit-image's astronaut (public domain) at ``size`` px, with face masks."""
    from PIL import Image, ImageDraw
    from skimage import data

    from lora_helpers.core.fileio import write_jsonl

    astronaut = Image.fromarray(data.astronaut()[..., :3])
    boxes = [(120, 20, 320, 220), (140, 50, 300, 210), (100, 0, 360, 260), (160, 70, 290, 200),
             (80, 10, 380, 310), (130, 40, 330, 240)]
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, box in enumerate((boxes * 3)[:n]):
        stem = f"astronaut_{i:02d}"
        astronaut.crop(box).resize((size, size), Image.Resampling.LANCZOS).save(folder / "images" / f"{stem}.png")
        mask = Image.new("L", (size, size), 0)
        ImageDraw.Draw(mask).ellipse((size * 0.3, size * 0.15, size * 0.7, size * 0.7), fill=255)
        mask.save(folder / "masks" / f"{stem}.png")
        rows.append({"file_name": f"images/{stem}.png", "mask_file": f"masks/{stem}.png", "original_size": [size, size],
                     "crop_top_left": [0, 0], "text": "a photo of TOK person"})
    write_jsonl(folder / "metadata.jsonl", rows)
    return folder


def _model_folder(name: str, cache: Path) -> Path:
    from lora_helpers.core.config import tiny_models_dir
    from lora_helpers.core.tiny_models import build_full_sdxl, build_tiny_models

    if name == "tiny":
        return tiny_models_dir() / "sdxl"
    if name == "small":
        return build_tiny_models(tiny_models_dir(build=False), small=True) / "sdxl-small"
    folder = cache / "sdxl-full-random"
    if not (folder / "model_index.json").is_file():
        print(f"building the full-size random SDXL in {folder} (once; about 7 GB)", flush=True)
        build_full_sdxl(folder, device="cuda")
    return folder


def run_one(name: str, steps: int, work: Path, cache: Path) -> dict:
    """Train ``steps`` steps on one model in this process and return the figures."""
    import statistics

    import torch

    from lora_helpers.train.outputs import read_log
    from lora_helpers.train import TrainConfig, plan_memory, train

    size = _SIZES[name]
    model = _model_folder(name, cache)
    dataset = _dataset(work / f"dataset-{name}", size)
    if name == "full":
        # the T4 recipe; the model's own VAE in fp32 (no hub access for the fp16-fix VAE here)
        config = TrainConfig.from_preset("t4-8gb", model=str(model), vae=None, max_train_steps=steps,
                                         checkpointing_steps=steps, validation_steps=0, validation_prompts=(),
                                         progress=False)
    else:
        config = TrainConfig.from_preset("cpu-smoke", model=str(model), resolution=size, max_train_steps=steps,
                                         checkpointing_steps=steps, validation_steps=0, validation_prompts=(),
                                         progress=False, device="cpu")
    start = time.perf_counter()
    result = train(dataset, work / f"run-{name}", config=config)
    total = time.perf_counter() - start
    times = [r["s_per_step"] for r in read_log(result.run_dir)]
    warm = times[2:] or times  # the first steps include one-time kernel selection and allocation
    out = {"model": name, "resolution": size, "steps": steps, "threads": torch.get_num_threads(),
           "s_per_step_median": statistics.median(warm), "s_per_step_first": times[0], "total_s": total,
           "estimate_gb": result.estimated_peak_gb, "estimate_train_step_gb": plan_memory(config).train_peak_gb}
    if torch.cuda.is_available() and name == "full":
        out["device"] = torch.cuda.get_device_name(0)
        out["measured_peak_gb"] = result.measured_peak_gb
    else:
        import resource

        out["device"] = "cpu"
        out["host_peak_rss_gb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30
    return out


class _Clock:
    """A listener that notes when training starts, each step ends, and validations and checkpoints are done."""

    def __init__(self):
        self.marks: list[tuple[str, float]] = []

    def on_train_start(self, start):
        self.marks.append(("start", time.perf_counter()))

    def on_step_end(self, step, row):
        self.marks.append(("step", time.perf_counter()))


def run_phases(name: str, steps: int, work: Path, validation: bool) -> dict:
    """Train ``steps`` steps in this process and time what a person waits for around them.

    Returns:
        seconds: ``imports`` (torch, diffusers, transformers, peft, accelerate), ``to_first_step`` (train()
        called until the first step starts: plan, encoding, loading), ``first_step``, ``step`` (median of the
        later steps), ``after_last_step`` (the last step's end until train() returns: checkpoint, validation
        images, LoRA files, plot, model card).
    """
    import statistics

    start = time.perf_counter()
    import importlib

    for module in ("diffusers", "transformers", "peft", "accelerate"):  # every run imports these before its first step
        importlib.import_module(module)
    for lazy in ("UNet2DConditionModel", "StableDiffusionXLPipeline"):  # diffusers imports its models when first named
        getattr(importlib.import_module("diffusers"), lazy)
    from lora_helpers.train import TrainConfig, train

    imports = time.perf_counter() - start
    size = _SIZES[name]
    dataset = _dataset(work / f"dataset-{name}", size)
    config = TrainConfig.from_preset("cpu-smoke", model=str(_model_folder(name, work)), resolution=size,
                                     max_train_steps=steps, checkpointing_steps=steps, progress=False, device="cpu",
                                     **({} if validation else {"validation_prompts": ()}))
    clock = _Clock()
    start = time.perf_counter()
    train(dataset, work / f"run-{name}-{time.time_ns()}", config=config, listeners=[clock])
    end = time.perf_counter()
    times = [t for kind, t in clock.marks if kind == "step"]
    first = next(t for kind, t in clock.marks if kind == "start")
    gaps = [b - a for a, b in zip(times, times[1:])]
    return {"imports": imports, "to_first_step": first - start, "first_step": times[0] - first,
            "step": statistics.median(gaps), "after_last_step": end - times[-1]}


def _phases(args, cache: Path) -> None:
    """Alternate this tree with ``--compare`` (another checkout), each run in its own process."""
    import statistics

    roots = {"this": ROOT, **({"compare": Path(args.compare).resolve()} if args.compare else {})}
    results: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for label, root in roots.items():
                for validation in (True, False):
                    cmd = [sys.executable, __file__, "--one-phases", args.models.split(",")[0], "--steps",
                           str(args.steps), "--work", tmp] + (["--threads", str(args.threads)] if args.threads else []) + (
                           [] if validation else ["--no-validation"])
                    env = {**os.environ, "PYTHONPATH": str(root), "BENCH_CODE_ROOT": str(root)}
                    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
                    line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
                    if proc.returncode or line is None:
                        print(f"{label}: failed\n{proc.stderr[-3000:]}")
                        continue
                    results.setdefault((label, "with" if validation else "without"), []).append(
                        json.loads(line[len("RESULT "):]))
    print(f"\naround the steps, {args.models.split(',')[0]} model, cpu-smoke preset, {args.steps} steps "
          f"(min / median of {args.repeats} runs, seconds; 'x step' = after_last_step / median step of the same run)")
    for (label, validation), runs in results.items():
        cells = []
        for key in ("imports", "to_first_step", "first_step", "step", "after_last_step"):
            values = [r[key] for r in runs]
            cells.append(f"{key} {min(values):.2f}/{statistics.median(values):.2f}")
        ratio = [r["after_last_step"] / r["step"] for r in runs]
        print(f"  {label:>7} {roots[label]} ({validation} validation images): " + ", ".join(cells)
              + f"; after_last_step = {min(ratio):.1f}/{statistics.median(ratio):.1f} x step")


def _trace() -> None:
    from lora_helpers.train.memory import estimate_peak_memory
    from lora_helpers.train.memory_trace import trace_training_memory
    from lora_helpers.core.tiny_models import SDXL_UNET_CONFIG

    for resolution in (512, 1024):
        start = time.perf_counter()
        traced = trace_training_memory(SDXL_UNET_CONFIG, resolution=resolution, lora_rank=16)
        plan = estimate_peak_memory(unet_config=SDXL_UNET_CONFIG, resolution=resolution, device_type="cpu")
        estimated = next(v for k, v in plan.items.items() if k.startswith("activations"))
        print(f"SDXL UNet {resolution} px, batch 1, checkpointing: traced activations {traced['activations_gb']:.3f} GB, "
              f"planner (before the CUDA factor) {estimated:.3f} GB  [{time.perf_counter() - start:.0f} s]", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny,small", help="comma-separated: tiny, small")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--gpu", action="store_true", help="also run the full-size SDXL at 1024 px on CUDA")
    parser.add_argument("--trace", action="store_true", help="trace the full SDXL UNet on CPU (planner check)")
    parser.add_argument("--cache", type=Path, default=None, help="where the full-size model is kept")
    parser.add_argument("--phases", action="store_true",
                        help="time what is around the steps (setup, first step, after the last step) instead")
    parser.add_argument("--repeats", type=int, default=3, help="with --phases: runs of each variant")
    parser.add_argument("--compare", default=None, help="with --phases: another checkout to alternate with")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: one model in this process
    parser.add_argument("--one-phases", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--no-validation", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from lora_helpers.core.config import cache_dir

    cache = args.cache or cache_dir()
    if args.one:
        print("RESULT " + json.dumps(run_one(args.one, args.steps, args.work, cache)), flush=True)
        return 0
    if args.one_phases:
        print("RESULT " + json.dumps(run_phases(args.one_phases, args.steps, args.work, not args.no_validation)),
              flush=True)
        return 0
    if args.phases:
        _phases(args, cache)
        return 0
    if args.trace:
        _trace()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.gpu:
        if not torch.cuda.is_available():
            print("--gpu: no CUDA device here; the full-size SDXL at 1024 px was not measured")
        else:
            names.append("full")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            cmd = [sys.executable, __file__, "--one", name, "--steps", str(args.steps), "--work", tmp,
                   "--cache", str(cache)] + (["--threads", str(args.threads)] if args.threads else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((l for l in proc.stdout.splitlines() if l.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(f"{name}: failed\n{proc.stderr[-3000:]}")
                continue
            results.append(json.loads(line[len("RESULT "):]))
    for r in results:
        memory = (f"GPU peak {r['measured_peak_gb']:.2f} GB (goal <= 7, limit 8)" if "measured_peak_gb" in r
                  else f"host peak RSS {r['host_peak_rss_gb']:.2f} GB")
        print(f"{r['model']:>5} {r['resolution']:>4} px on {r['device']}, {r['threads']} threads: "
              f"{r['s_per_step_median']:.3f} s/step (first step {r['s_per_step_first']:.2f} s), {memory}; "
              f"planner: training step {r['estimate_train_step_gb']:.2f} GB, peak incl. validation {r['estimate_gb']:.2f} GB")
    return 0 if results else 1


if __name__ == "__main__":
    raise SystemExit(main())
