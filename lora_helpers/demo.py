"""The whole pipeline on ``sample_data/`` in one call: prepare → caption → train → grids → evaluate.

Without a GPU (or without hub access) it runs on the tiny built-in models: 64 px, a few
dozen steps, a couple of minutes on 2 CPU cores. The pictures are noise — the models are
random — but every file, folder and code path is the one a real run uses. With a GPU and
``--model stabilityai/stable-diffusion-xl-base-1.0`` it trains the real thing.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_helpers.caption import CaptionConfig, caption_dataset
from lora_helpers.core.config import default_resolution, resolve_models, smoke_mode
from lora_helpers.core.run_folder import DEFAULT_TOKEN
from lora_helpers.core.runtime import free_memory
from lora_helpers.evaluate import EvaluateConfig, evaluate_run, format_summary
from lora_helpers.generate import checkpoint_progress, load_lora, load_pipeline, prompt_seed_grid, scale_sweep
from lora_helpers.prepare import PrepareConfig, prepare_photos
from lora_helpers.stage_inputs import sample_photos_dir
from lora_helpers.train import TrainConfig, train

__all__ = ["DemoConfig", "DemoResult", "default_photos", "run_demo", "add_cli_arguments", "run_cli"]


def default_photos() -> Path:
    """``sample_data/person`` of this repository (see :func:`lora_helpers.stage_inputs.sample_photos_dir`)."""
    return sample_photos_dir() or Path(__file__).resolve().parents[1] / "sample_data" / "person"


@dataclass
class DemoConfig:
    """Settings of the demo.

    Attributes:
        photos: the person's photos (default ``sample_data/person``).
        out_dir: where dataset/, run/, generated/ and evaluation go.
        model: SDXL hub id or folder; None: tiny models on CPU, SDXL base where a GPU is present.
        steps: training steps; None: 40 on the tiny models, the preset's own for SDXL.
        token: identifier token in captions.
        evaluate: score likeness and prompt adherence at the end.
    """

    photos: Path = field(default_factory=default_photos)
    out_dir: Path = Path("demo_output")
    model: str | None = None
    steps: int | None = None
    token: str = DEFAULT_TOKEN
    evaluate: bool = True


@dataclass
class DemoResult:
    """Where everything went, stage by stage, and how long each stage took (seconds)."""

    smoke: bool
    outputs: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _use_smoke(model: str | None) -> bool:
    if model is not None:
        return False
    return smoke_mode() or not torch.cuda.is_available()


def run_demo(config: DemoConfig | None = None, *, log=print) -> DemoResult:
    """Run every stage on the sample photos and report where each output went.

    Args:
        config: a :class:`DemoConfig`.
        log: called with one line per finished stage (``print`` by default).

    Returns:
        A :class:`DemoResult`.
    """
    config = config or DemoConfig()
    smoke = _use_smoke(config.model)
    if smoke:
        # The stages read the switch from the environment: the same cells a notebook runs.
        os.environ["LORA_HELPERS_SMOKE"] = "1"

    models = resolve_models(smoke=smoke, sdxl=config.model)
    out = Path(config.out_dir)
    dataset, run, generated = out / "dataset", out / "run", out / "generated"
    result = DemoResult(smoke=smoke)
    log(f"{'tiny models on CPU (smoke mode)' if smoke else models.sdxl}; outputs in {out.resolve()}")

    t = time.perf_counter()
    prepared = prepare_photos(config.photos, dataset, config=PrepareConfig(resolution=default_resolution(smoke)))
    result.seconds["prepare"] = time.perf_counter() - t
    result.outputs["dataset"] = dataset
    accepted = sum(1 for r in prepared.records if r.verdict != "reject")
    held = len(prepared.held_out)
    log(f"prepare  {accepted}/{len(prepared.records)} photos accepted"
        + (f" ({held} held out of training for the likeness score)" if held else "")
        + f" -> {dataset}/images, report {dataset / 'report.csv'}")

    t = time.perf_counter()
    caption_dataset(dataset, config=CaptionConfig(model=models.blip, token=config.token))
    result.seconds["caption"] = time.perf_counter() - t
    log(f"caption  -> {dataset / 'metadata.jsonl'} and images/*.txt")

    t = time.perf_counter()
    preset = "cpu-smoke" if smoke else "t4-8gb"
    steps = config.steps if config.steps is not None else (40 if smoke else None)
    train_config = TrainConfig.from_preset(preset, model=models.sdxl, max_train_steps=steps)
    trained = train(dataset, run, config=train_config, resume="latest")
    result.seconds["train"] = time.perf_counter() - t
    result.outputs["lora"] = trained.lora_path
    result.outputs["kohya"] = trained.kohya_path
    log(f"train    {trained.steps} steps, final loss {trained.final_loss:.4f} -> {trained.lora_path}")

    t = time.perf_counter()
    result.outputs.update(_grids(run, generated, models.sdxl))
    result.seconds["generate"] = time.perf_counter() - t
    log(f"generate grids -> {generated}")

    if config.evaluate:
        t = time.perf_counter()
        # A small slice of the standard prompt set keeps the demo to minutes; 05_evaluate runs it all.
        eval_config = EvaluateConfig(clip_model=models.clip, seeds=(0, 1), scales=(0.0, 1.0), max_checkpoints=2,
                                     prompts_per_category=1)
        evaluation = evaluate_run(run, references=dataset, config=eval_config, out_dir=out / "evaluation")
        result.seconds["evaluate"] = time.perf_counter() - t
        result.outputs.update({f"evaluation:{k}": v for k, v in evaluation.files.items()})
        log(f"evaluate -> {evaluation.out_dir}")
        log(format_summary(evaluation))
    log("times: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    return result


def _grids(run: Path, out: Path, base_model: str) -> dict[str, Path]:
    pipe = load_pipeline(base_model)
    lora = load_lora(pipe, run)
    prompts = ["a photo of {subject}", "{subject} on a beach at sunset", "an oil painting of {subject}"]
    grids = {
        "grid:prompt-seed": prompt_seed_grid(pipe, prompts, (0, 1), lora_info=lora),
        "grid:scale": scale_sweep(pipe, lora, prompts[0], (0, 1)),
        "grid:checkpoints": checkpoint_progress(pipe, run, prompts[:2], seeds=(0,)),
    }
    paths = {}
    for name, grid in grids.items():
        paths[name] = grid.save(out / f"{name.split(':')[1]}.png")
    del pipe
    free_memory()
    return paths


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m lora_helpers demo``."""
    parser.add_argument("--photos", type=Path, default=None, help="photos of one person (default: sample_data/person)")
    parser.add_argument("--out", type=Path, default=Path("demo_output"), help="output folder (default: demo_output)")
    parser.add_argument("--model", default=None,
                        help="SDXL hub id or folder, e.g. stabilityai/stable-diffusion-xl-base-1.0 (needs a GPU); "
                             "default: tiny built-in models on CPU")
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: 40 on the tiny models)")
    parser.add_argument("--no-evaluate", action="store_true", help="skip the evaluation stage")


def run_cli(args: argparse.Namespace) -> int:
    """Run the demo from parsed flags."""
    config = DemoConfig(out_dir=args.out, model=args.model, steps=args.steps, evaluate=not args.no_evaluate)
    if args.photos is not None:
        config.photos = args.photos
    if not Path(config.photos).is_dir():
        print(f"photo folder not found: {config.photos} (pass --photos FOLDER)")
        return 2
    result = run_demo(config)
    print("\noutputs:")
    for name, path in result.outputs.items():
        print(f"  {name:<28} {path}")
    return 0
