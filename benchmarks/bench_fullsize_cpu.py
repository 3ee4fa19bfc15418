"""Host RAM and time of the full-size SDXL on the real code path, on CPU, phase by phase.

What it measures: the full-size SDXL (2.6 B-parameter UNet, both text encoders, the VAE) with
random weights, saved in the hub's fp16 layout, through the functions a Colab user runs, at
1024 px:

1. build   ``build_full_sdxl(device="cpu")``: the random model, written once to ``<work>/sdxl-full``
           and reused by later runs (not a Colab phase: there the model is downloaded);
2. cache   the training code's own encoding (``TrainingSession.read_data`` / ``prepare_data`` ->
           ``build_cache``): both text encoders, then the VAE (fp32), over 3 images at 1024 px,
           each freed before the next loads;
3. train   ``train()`` on the same run folder (the cache is reused, not re-encoded): load the UNet,
           add the LoRA, ``--steps`` steps at 1024 px with gradient checkpointing, batch 1, AdamW;
4. save    inside the same ``train()``: the checkpoint and both LoRA files (diffusers, kohya);
5. image   ``load_pipeline`` + ``load_lora`` + ``generate_images``: one 1024 px image, 2 steps;
6. unet-fp16  the UNet loaded as the training code loads it on Colab (fp16 files, fp16 weights, before
           it moves to the GPU): the host-RAM side of a T4 run's UNet load, without the bf16 cast.

Each phase runs in a fresh process, so its peak RSS (``VmHWM``) is its own; inside a process the
peak is reset between sub-phases by writing 5 to ``/proc/self/clear_refs`` (Linux). A watchdog
stops a phase whose RSS passes ``--rss-limit-gb``. Results go to ``<work>/fullsize_cpu.json``
and are printed as a table.

What differs from a GPU (Colab T4) run: on CPU nothing moves to a GPU, so a phase's host RSS is
roughly what Colab holds in host RAM *and* GPU memory together, an upper bound on Colab's host
RAM. CPU has no fast fp16 kernels, so the frozen weights are bf16 (``--precision bf16``, the
same 2 bytes a weight as the T4's fp16) or fp32 (``--precision fp32``: twice the UNet's memory);
the VAE encodes in fp32 as it does on Colab without the fp16-fix VAE; AdamW instead of 8-bit
AdamW (a few MB of LoRA optimizer state either way); no GradScaler (bf16 needs none).

Run from the repository root (about 20-40 minutes on 2 cores, ~7 GB of disk for the model):

    python benchmarks/bench_fullsize_cpu.py
    python benchmarks/bench_fullsize_cpu.py --phases cache train save image   # model already built
    python benchmarks/bench_fullsize_cpu.py --precision fp32 --rss-limit-gb 20
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

GB = 1e9
PHASES = ("build", "cache", "train", "image", "unet-fp16")  # "save" is measured inside "train" (train() saves)
COLAB_HOST_GB = 12.7
GOAL_GB = 8.0


# --------------------------------------------------------------------------- measuring inside a phase

def _status_kb(field: str, pid: str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class _Peaks:
    """Peak RSS and seconds of the sub-phases of one process (VmHWM reset at each boundary)."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._start = time.perf_counter()
        self._reset()

    @staticmethod
    def _reset() -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        except OSError:
            pass  # older kernels: the peak then covers the process so far

    def mark(self, name: str, **extra) -> None:
        now = time.perf_counter()
        self.rows.append({"phase": name, "peak_rss_gb": round(_status_kb("VmHWM") * 1024 / GB, 2),
                          "end_rss_gb": round(_status_kb("VmRSS") * 1024 / GB, 2),
                          "seconds": round(now - self._start, 1), **extra})
        self._start = now
        self._reset()


def _setup_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _config(model: Path, steps: int, precision: str):
    import dataclasses

    from lora_helpers.train import TrainConfig

    cfg = TrainConfig.from_preset("t4-8gb", model=str(model), resolution=1024, max_train_steps=steps, device="cpu",
                                  mixed_precision="bf16" if precision == "bf16" else "no", optimizer="adamw",
                                  gradient_checkpointing="all", train_batch_size=1,
                                  validation_steps=0, validation_prompts=(), checkpointing_steps=0, progress=False)
    # the 8 GB budget is a GPU budget: on CPU the weights sit in host RAM, which this script measures
    return dataclasses.replace(cfg, memory_budget_gb=None, vae=None)


def _phase_build(args, peaks: _Peaks) -> None:
    from lora_helpers.core.tiny_models import build_full_sdxl

    folder = args.work / "sdxl-full"
    if (folder / "model_index.json").is_file():
        peaks.mark("1 build full SDXL (fp16 files)", note="reused from an earlier run")
        return
    build_full_sdxl(folder, device="cpu")
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    peaks.mark("1 build full SDXL (fp16 files)", note=f"{size / GB:.2f} GB on disk")


def _phase_cache(args, peaks: _Peaks) -> None:
    import shutil

    from bench_train import _dataset
    from lora_helpers.train.resolve import resolve_config
    from lora_helpers.train.session import TrainingSession
    from lora_helpers.train.stage import _make_accelerator, _trigger, plan_memory

    dataset = _dataset(args.work / "dataset-1024", 1024, n=args.images)
    run = args.work / "run"
    shutil.rmtree(run, ignore_errors=True)
    # what train() does before it loads the UNet, step for step (same arguments, so train() reuses this cache)
    cfg = resolve_config(_config(args.work / "sdxl-full", args.steps, args.precision), "cpu")
    plan = plan_memory(cfg, device_type="cpu")
    accelerator = _make_accelerator(cfg.mixed_precision, cpu=True)
    trigger, class_noun = _trigger(cfg, dataset)
    session = TrainingSession(dataset, run, cfg=cfg, accelerator=accelerator, plan=plan, trigger=trigger,
                              class_noun=class_noun)
    session.read_data()
    session.prepare_data()
    latents = session.cache.latents
    peaks.mark("2 cache latents + embeddings", note=f"{len(latents)} images -> latents {tuple(latents[0].shape)}, "
               f"text encoders {cfg.mixed_precision if cfg.mixed_precision != 'no' else 'fp32'}, VAE fp32",
               planned_host_gb=round(plan.host_peak_gb, 2))


def _phase_train(args, peaks: _Peaks) -> None:
    from lora_helpers.train import plan_memory, train

    run = args.work / "run"
    cache_file = run / "cache" / "cache.safetensors"
    before = cache_file.stat().st_mtime_ns
    cfg = _config(args.work / "sdxl-full", args.steps, args.precision)
    plan = plan_memory(cfg, device_type="cpu")
    steps: list[float] = []

    class Marks:
        def on_train_start(self, start) -> None:
            peaks.mark("3a load UNet + LoRA", note=f"{cfg.mixed_precision if cfg.mixed_precision != 'no' else 'fp32'} "
                       "frozen UNet, fp32 LoRA", planned_gb=round(plan.peak_gb, 2))

        def on_step_end(self, step, row) -> None:
            steps.append(row["s_per_step"])
            if step == cfg.max_train_steps:
                peaks.mark("3b training steps (1024 px, grad ckpt)",
                           note=f"{step} steps, " + ", ".join(f"{s:.0f}" for s in steps) + " s/step, "
                                + (f"loss {row['loss']:.4f}" if row.get("loss") is not None else "loss NaN"))

    result = train(args.work / "dataset-1024", run, config=cfg, listeners=[Marks()])
    files = [result.lora_path, result.kohya_path, *sorted((run / "checkpoints").glob("checkpoint-*"))]
    peaks.mark("4 save checkpoint + both LoRA files",
               note=", ".join(p.name for p in files) + f"; cache {'reused' if cache_file.stat().st_mtime_ns == before else 'REBUILT'}")


def _phase_image(args, peaks: _Peaks) -> None:
    import numpy as np
    import torch

    from lora_helpers.generate import GenerateConfig, generate_images, load_lora, load_pipeline

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    pipe = load_pipeline(args.work / "sdxl-full", vae=None, device="cpu", dtype=dtype)
    info = load_lora(pipe, args.work / "run" / "pytorch_lora_weights.safetensors")
    peaks.mark("5a load pipeline + LoRA", note=f"{str(dtype).removeprefix('torch.')} pipeline, VAE slicing")
    image = generate_images(pipe, "a photo of {subject}", [0], config=GenerateConfig(size=1024, steps=2),
                            lora_info=info)[0].image
    pixels = np.asarray(image, dtype=np.float32)
    image.save(args.work / "image.png")
    peaks.mark("5b one 1024 px image, 2 steps", note=f"{image.size[0]}x{image.size[1]}, finite "
               f"{bool(np.isfinite(pixels).all())}, guidance 5 (batch 2)")


def _phase_unet_fp16(args, peaks: _Peaks) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    from lora_helpers.train.latents import load_component

    unet = load_component(UNet2DConditionModel, str(args.work / "sdxl-full"), subfolder="unet", dtype=torch.float16)
    size = sum(p.numel() * p.element_size() for p in unet.parameters())
    lazy = _status_kb("VmRSS") * 1024 / GB
    with torch.no_grad():
        for p in unet.parameters():  # read every weight once, as .to("cuda") does (the file is mapped, not read)
            p.view(-1)[:: max(1, 4096 // p.element_size())].sum()
    peaks.mark("6 load UNet as on Colab (fp16, no cast)", note=f"weights {size / GB:.2f} GB (memory-mapped: RSS "
               f"{lazy:.2f} GB until read; anon {_status_kb('RssAnon') / 1e6:.2f}, file {_status_kb('RssFile') / 1e6:.2f} "
               "GB once read); host side of build_models before .to('cuda')")


_RUNNERS = {"build": _phase_build, "cache": _phase_cache, "train": _phase_train, "image": _phase_image,
            "unet-fp16": _phase_unet_fp16}


def _child(args) -> int:
    _setup_threads(args.threads)
    peaks = _Peaks()
    try:
        _RUNNERS[args.child](args, peaks)
    finally:
        (args.work / f"phase-{args.child}.json").write_text(json.dumps(peaks.rows, indent=1))
    return 0


# --------------------------------------------------------------------------- the parent: one process a phase

def _run_phase(phase: str, args) -> list[dict]:
    out = args.work / f"phase-{phase}.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", phase, "--work", str(args.work),
           "--steps", str(args.steps), "--images", str(args.images), "--precision", args.precision,
           "--threads", str(args.threads)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    over = threading.Event()
    top = [0]

    def watch() -> None:  # stop a phase that goes over the limit before the machine does
        while proc.poll() is None:
            try:
                rss = _status_kb("VmRSS", str(proc.pid)) * 1024
            except (OSError, ValueError):
                break
            top[0] = max(top[0], rss)
            if rss > args.rss_limit_gb * GB:
                over.set()
                proc.kill()
                break
            time.sleep(0.2)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    watcher.join()
    seconds = round(time.perf_counter() - start, 1)
    rows = json.loads(out.read_text()) if out.is_file() else []
    # ru_maxrss alone can miss the peak: resetting VmHWM (clear_refs) resets what the kernel reports at exit
    peak = max([usage.ru_maxrss * 1024, top[0]] + [r["peak_rss_gb"] * GB for r in rows])
    whole = {"phase": f"{phase} (whole process)", "peak_rss_gb": round(peak / GB, 2),
             "seconds": seconds, "returncode": proc.returncode}
    if over.is_set():
        whole["note"] = f"STOPPED: RSS passed the {args.rss_limit_gb} GB limit of this run"
    elif proc.returncode:
        whole["note"] = f"FAILED (exit {proc.returncode})"
    return [{**r, "process": phase} for r in rows + [whole]]


def _table(rows: list[dict]) -> str:
    lines = [f"{'phase':<42} {'peak RSS GB':>11} {'seconds':>8}  {'<= 8 GB':>7}  notes"]
    for r in rows:
        ok = "yes" if r["peak_rss_gb"] <= GOAL_GB else "NO"
        lines.append(f"{r['phase']:<42} {r['peak_rss_gb']:>11.2f} {r['seconds']:>8.1f}  {ok:>7}  {r.get('note', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lora_helpers_fullsize_cpu",
                        help="model, dataset, run folder and results (the model is reused when present)")
    parser.add_argument("--phases", nargs="+", choices=PHASES + ("save",), default=list(PHASES),
                        help="phases to run (save is part of train)")
    parser.add_argument("--steps", type=int, default=2, help="training steps")
    parser.add_argument("--images", type=int, default=3, help="training images (1024 px crops of the astronaut)")
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                        help="frozen weights on CPU (the T4 uses fp16: same size as bf16)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rss-limit-gb", type=float, default=14.0, help="stop a phase whose RSS passes this")
    parser.add_argument("--child", choices=PHASES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    if args.child:
        return _child(args)

    phases = [p for p in PHASES if p in args.phases or (p == "train" and "save" in args.phases)]
    rows: list[dict] = []
    for phase in phases:
        phase_rows = _run_phase(phase, args)
        rows += phase_rows
        print(_table(phase_rows), flush=True)
        if phase_rows[-1]["returncode"]:
            break
    import torch

    result = {"precision": args.precision, "threads": args.threads, "steps": args.steps, "images": args.images,
              "torch": torch.__version__, "goal_gb": GOAL_GB, "colab_host_gb": COLAB_HOST_GB, "rows": rows}
    path = args.work / "fullsize_cpu.json"
    if path.is_file():  # keep the rows of phases not run this time (e.g. a model built in an earlier run)
        earlier = json.loads(path.read_text()).get("rows", [])
        rows = [r for r in earlier if r.get("process") not in phases] + rows
        result["rows"] = rows
    path.write_text(json.dumps(result, indent=1))
    print()
    print(_table(rows))
    print("written", args.work / "fullsize_cpu.json")
    return 0 if all(not r.get("returncode") for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
