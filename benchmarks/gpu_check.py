"""The GPU check of the 8 GB recipe: one script, one table, under 8 minutes on one GPU.

On the full-size SDXL with random weights (written once by
``lora_helpers.core.tiny_models.build_full_sdxl``, about 7 GB of disk), through the same
``train`` and ``load_pipeline`` a Colab user runs:

1. ``t4-8gb`` at 1024 px with the 8 GB budget enforced (``set_per_process_memory_fraction``):
   peak allocated memory against the plan, s/step, fp16 + GradScaler over ``--steps`` steps
   with no NaN, 8-bit AdamW stepping (its state is in the checkpoint); the preset checkpoints only the
   UNet blocks the budget requires, so the same run with every block checkpointed follows (its s/step
   is what the budget-aware plan saves);
2. the 8-bit and the 4-bit (NF4) frozen UNet: peak against their plans, a few steps each;
3. pivotal tuning (``--pivotal 2``): both text encoders on the GPU until the new tokens freeze
   half-way, the plan's 7.84 GiB against the enforced 8; an out-of-memory error is a row, not the end;
4. one 1024 px image from the trained LoRA in fp16 (no NaN, not black). Offline the
   fp16-fix VAE cannot be downloaded, so the model's own VAE decodes in fp32 (what
   ``load_pipeline`` does without it); with ``--vae`` pointing at a local copy of
   madebyollin/sdxl-vae-fp16-fix the image is decoded in fp16 as in Colab.

Needs: a CUDA GPU, ``pip install torch==<the GPU build> && pip install -r requirements-dev.txt``
(bitsandbytes comes with it). Run from the repository root:

    python benchmarks/gpu_check.py                 # about 5-7 minutes on one GPU
    python benchmarks/gpu_check.py --dry-run       # the same steps on the tiny model on CPU (checks the script)

Writes ``<work>/gpu_check.json`` beside the printed table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_train import _dataset  # noqa: E402
from lora_helpers.core.config import tiny_models_dir  # noqa: E402
from lora_helpers.core.runtime import free_memory  # noqa: E402
from lora_helpers.core.tiny_models import build_full_sdxl  # noqa: E402
from lora_helpers.generate import GenerateConfig, generate_images, load_lora, load_pipeline  # noqa: E402
from lora_helpers.train import TrainConfig, TrainingOutOfMemoryError, plan_memory, train  # noqa: E402


def _train_row(name: str, config: TrainConfig, dataset: Path, run: Path) -> dict:
    plan = plan_memory(config)
    shutil.rmtree(run, ignore_errors=True)  # this script's own scratch run from an earlier check
    start = time.perf_counter()
    try:
        result = train(dataset, run, config=config)
    except TrainingOutOfMemoryError as exc:  # the plan was wrong: that is the finding, and the checks go on
        free_memory()
        return {"check": name, "planned_gb": round(plan.peak_gb, 2), "measured_gb": None, "s_per_step": None,
                "steps": 0, "nonfinite_steps": 0, "scaler_skipped_steps": None, "optimizer": config.optimizer,
                "seconds": round(time.perf_counter() - start, 1), "lora": None,
                "out_of_memory": str(exc).splitlines()[0]}
    record = json.loads((run / "config.json").read_text())
    return {"check": name, "planned_gb": round(plan.peak_gb, 2),
            "measured_gb": None if result.measured_peak_gb is None else round(result.measured_peak_gb, 2),
            "s_per_step": result.seconds_per_step, "steps": result.steps, "nonfinite_steps": result.nonfinite_steps,
            "scaler_skipped_steps": record.get("scaler_skipped_steps"), "optimizer": record["config"]["optimizer"],
            "seconds": round(time.perf_counter() - start, 1), "lora": str(result.lora_path)}


def _image_row(model: str, lora: str, size: int, vae: str | None) -> dict:
    pipe = load_pipeline(model, vae=vae)  # None: the model's own VAE (the fp16-fix one is not reachable offline)
    info = load_lora(pipe, lora)
    start = time.perf_counter()
    image = generate_images(pipe, "a photo of {subject}", [0], config=GenerateConfig(size=size, steps=4),
                            lora_info=info)[0].image
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32))
    row = {"check": f"one {size} px image ({'fp16-fix VAE' if vae else 'own VAE'})",
           "seconds": round(time.perf_counter() - start, 1), "finite": bool(torch.isfinite(pixels).all()),
           "mean_pixel": round(float(pixels.mean()), 1), "not_black": float(pixels.mean()) > 2.0}
    del pipe
    free_memory()
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "lora_helpers_gpu_check")
    parser.add_argument("--steps", type=int, default=50, help="fp16 steps of the t4-8gb run")
    parser.add_argument("--vae", default=None, help="local folder of the fp16-fix VAE, if there is one")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on CPU: checks this script, not the GPU")
    args = parser.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --dry-run to check the script on the tiny model)")
        return 2
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        model, size, preset = str(tiny_models_dir() / "sdxl"), 64, dict(device="cpu", mixed_precision="no")
    else:
        folder = work / "sdxl-full"
        if not (folder / "model_index.json").is_file():
            build_full_sdxl(folder, device="cuda")
        model, size, preset = str(folder), 1024, {}
    dataset = _dataset(work / f"dataset-{size}", size)
    common = dict(model=model, resolution=size, vae=None, validation_steps=0, validation_prompts=(),
                  checkpointing_steps=0, progress=False, **preset)
    rows = []
    run = work / "run-fp16"
    rows.append(_train_row("t4-8gb fp16, 8 GB enforced", TrainConfig.from_preset(
        "t4-8gb", max_train_steps=args.steps, **common), dataset, run))
    # the same with every UNet block checkpointed: what the budget-aware plan (the row above) saves per step
    rows.append(_train_row("t4-8gb fp16, all blocks checkpointed", TrainConfig.from_preset(
        "t4-8gb", max_train_steps=args.steps, gradient_checkpointing="all", **common), dataset, work / "run-all"))
    for flag in ("unet_8bit", "unet_4bit"):
        if args.dry_run and flag == "unet_8bit":
            continue  # bitsandbytes' 8-bit matmuls need a GPU; the 4-bit path runs on CPU
        rows.append(_train_row(f"t4-8gb {flag}", TrainConfig.from_preset(
            "t4-8gb", max_train_steps=5, **{flag: True}, **common), dataset, work / f"run-{flag}"))
    rows.append(_train_row("t4-8gb --pivotal 2", TrainConfig.from_preset(
        "t4-8gb", max_train_steps=6, pivotal_tokens=2, **common), dataset, work / "run-pivotal"))
    rows.append(_image_row(model, rows[0]["lora"], size, args.vae))

    print(f"{'check':<34} {'plan GB':>8} {'peak GB':>8} {'s/step':>7} {'NaN':>4}  notes")
    for r in rows:
        if "planned_gb" in r:
            peak = "-" if r["measured_gb"] is None else f"{r['measured_gb']:.2f}"
            sps = "-" if r["s_per_step"] is None else f"{r['s_per_step']:.2f}"
            notes = (f"OUT OF MEMORY: {r['out_of_memory']}" if r.get("out_of_memory") else
                     f"{r['steps']} steps, {r['optimizer']}, scaler skipped {r['scaler_skipped_steps']}")
            print(f"{r['check']:<34} {r['planned_gb']:>8.2f} {peak:>8} {sps:>7} {r['nonfinite_steps']:>4}  {notes}")
        else:
            print(f"{r['check']:<34} {'':>8} {'':>8} {'':>7} {'' if r['finite'] else 'yes':>4}  "
                  f"{r['seconds']} s, mean pixel {r['mean_pixel']}, {'not black' if r['not_black'] else 'BLACK'}")
    (work / "gpu_check.json").write_text(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available()
                                                     else "cpu", "rows": rows}, indent=1))
    print("written", work / "gpu_check.json")
    ok = all(math.isfinite(r.get("measured_gb") or 0) and not r.get("nonfinite_steps") and not r.get("out_of_memory")
             for r in rows) and rows[-1]["finite"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
