"""Training-step speed on CPU: checkpointing (all, budget-aware, none), micro-batch, the bare UNet floor, compile.

One process trains the small SDXL-architecture model (``sdxl-small``: SDXL's topology at a
fraction of the width) through the real path (``TrainingSession``: cache, LoRA UNet, AdamW,
``TrainStep``) and times single optimizer steps of each variant, the variants taking turns in
every round (this machine is shared and noisy: a figure is only compared with the others of its
own round). Variants:

* ``all``: every UNet block checkpointed (the reference of the checkpointing figures);
* ``t4``: the blocks the ``t4-8gb`` plan checkpoints for the full-size SDXL at 1024 px (the same
  block names here: this model has SDXL's topology);
* ``none``: no checkpointing;
* ``none b2``: no checkpointing, micro-batch 2 (images/s is the figure to compare);
* ``bare``: the UNet's forward and backward alone, same model, shapes and checkpointing as ``none``
  (no noise, loss weighting, clipping or optimizer): the floor a training step approaches;
* ``compiled`` (``--compile``): ``none`` with ``torch.compile`` on the UNet, after its compile.

Each figure is printed as min/median seconds per step, images/s, and min/median of its ratio to
its reference in the same round. The planned peak at 1024 px (full-size SDXL, ``t4-8gb``) is
printed for each checkpointing variant.

    PYTHONPATH=. python benchmarks/bench_step.py                      # 128 and 256 px, 5 rounds
    PYTHONPATH=. python benchmarks/bench_step.py --resolutions 128 --rounds 9 --compile
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _t4_plan(setting):
    from lora_helpers.core.config import HUB_MODELS
    from lora_helpers.train import TrainConfig, plan_memory

    cfg = TrainConfig.from_preset("t4-8gb", model=HUB_MODELS.sdxl, gradient_checkpointing=setting, train_batch_size=1)
    return plan_memory(cfg, device_type="cuda")


def _session(work: Path, resolution: int):
    """A TrainingSession of the small model at ``resolution``, set up (cache encoded, models built)."""
    from bench_train import _dataset

    from lora_helpers.core.config import tiny_models_dir
    from lora_helpers.core.tiny_models import build_tiny_models
    from lora_helpers.train import TrainConfig, plan_memory
    from lora_helpers.train.resolve import resolve_config
    from lora_helpers.train.session import TrainingSession
    from lora_helpers.train.stage import _make_accelerator

    model = build_tiny_models(tiny_models_dir(build=False), small=True) / "sdxl-small"
    dataset = _dataset(work / f"dataset-{resolution}", resolution)
    cfg = TrainConfig.from_preset("cpu-smoke", model=str(model), resolution=resolution, train_batch_size=1,
                                  gradient_checkpointing="none", max_train_steps=10_000, lr_warmup_steps=0,
                                  validation_prompts=(), progress=False, device="cpu")
    cfg = resolve_config(cfg, "cpu")
    accelerator = _make_accelerator(cfg.mixed_precision, cpu=True)
    session = TrainingSession(dataset, work / f"run-{resolution}", cfg=cfg, accelerator=accelerator,
                              plan=plan_memory(cfg, device_type="cpu"), trigger="TOK person", class_noun=None)
    session.run_dir.mkdir(parents=True, exist_ok=True)
    session.setup(None)
    return session


def _bare_step(unet, session, batch: int):
    """The UNet's forward and backward alone, on the shapes of a training step."""
    import torch

    cache = session.cache
    latents = torch.stack([cache.latents[0]] * batch)
    embeds, pooled = cache.embeds([cache.prompt_ids[0]] * batch)
    time_ids = torch.stack([cache.time_ids[0]] * batch)
    noise = torch.randn_like(latents)

    def step():
        pred = unet(latents + noise, torch.full((batch,), 500), encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        torch.nn.functional.mse_loss(pred.float(), noise.float()).backward()
        for p in session.models.params:
            p.grad = None
    return step


def _measure(resolution: int, rounds: int, work: Path, compile_unet: bool) -> dict[str, list[float]]:
    import torch

    from lora_helpers.train.block_memory import checkpointed_blocks
    from lora_helpers.train.models import enable_block_checkpointing
    from lora_helpers.train.step import TrainStep

    session = _session(work, resolution)
    unet = session.accelerator.unwrap_model(session.models.unet)
    t4_blocks = checkpointed_blocks(_t4_plan("auto").inputs["unet_config"], _t4_plan("auto").step_settings[
        "gradient_checkpointing"])
    n_blocks = len(checkpointed_blocks(dict(unet.config), "all"))
    print(f"{resolution} px: the t4-8gb plan checkpoints {len(t4_blocks)} of {n_blocks} blocks: {', '.join(t4_blocks)}",
          flush=True)
    b2 = TrainStep(dataclasses.replace(session.cfg, train_batch_size=2), session.accelerator, session.models,
                   session.cache)
    counter = iter(range(10**6))
    variants = {
        "all": (lambda: enable_block_checkpointing(unet, checkpointed_blocks(dict(unet.config), "all")),
                lambda: session.stepper(next(counter)), 1),
        "t4": (lambda: enable_block_checkpointing(unet, t4_blocks), lambda: session.stepper(next(counter)), 1),
        "none": (lambda: enable_block_checkpointing(unet, []), lambda: session.stepper(next(counter)), 1),
        "none b2": (lambda: enable_block_checkpointing(unet, []), lambda: b2(next(counter)), 2),
        "bare": (lambda: enable_block_checkpointing(unet, []), _bare_step(unet, session, 1), 1),
    }
    if compile_unet:
        compiled = dataclasses.replace(session.models, unet=torch.compile(session.models.unet))
        compiled_step = TrainStep(session.cfg, session.accelerator, compiled, session.cache)
        enable_block_checkpointing(unet, [])
        start = time.perf_counter()
        compiled_step(next(counter))
        compiled_step(next(counter))  # the backward graph compiles on the first backward
        print(f"{resolution} px: torch.compile of the UNet took {time.perf_counter() - start:.1f} s (two steps)",
              flush=True)
        variants["compiled"] = (lambda: enable_block_checkpointing(unet, []), lambda: compiled_step(next(counter)), 1)
    times: dict[str, list[float]] = {name: [] for name in variants}
    for name, (prepare, run, _) in variants.items():  # warm-up: first-call allocations and kernel choice
        prepare()
        run()
    names = list(variants)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts with another variant
            prepare, run, _ = variants[name]
            prepare()
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    times["_batch"] = [float(v[2]) for v in variants.values()]
    return times


def _report(resolution: int, times: dict[str, list[float]]) -> None:
    batches = dict(zip([k for k in times if k != "_batch"], times.pop("_batch")))
    refs = {"all": "all", "t4": "all", "none": "all", "none b2": "none", "bare": "none", "compiled": "none"}
    print(f"\n{resolution} px, small SDXL-architecture model, CPU, {os.cpu_count()} cores "
          f"(min / median of {len(times['all'])} rounds)")
    print(f"  {'variant':<9} {'s/step':>15} {'images/s':>15}   ratio to its reference in the same round")
    for name, values in times.items():
        ref = refs[name]
        ips = [batches[name] / v for v in values]
        if name == "none b2":  # per image against one image per step
            ratios = [(v / batches[name]) / r for v, r in zip(values, times[ref])]
            what = f"s/image vs {ref}"
        elif name == "bare":  # how far the training step is above its floor
            ratios = [r / v for v, r in zip(values, times[ref])]
            what = "none / bare: the step against the floor"
        else:
            ratios = [v / r for v, r in zip(values, times[ref])]
            what = f"s/step vs {ref}" if name != ref else "(reference)"
        print(f"  {name:<9} {min(values):6.3f} / {statistics.median(values):6.3f}  {max(ips):6.2f} / "
              f"{statistics.median(ips):6.2f}   {min(ratios):.2f} / {statistics.median(ratios):.2f} {what}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", default="128,256")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the UNet (slow to compile)")
    args = parser.parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    print("planned peak at 1024 px (full-size SDXL, t4-8gb preset, 8 GB budget):")
    for setting in ("all", "auto", "none"):
        plan = _t4_plan(setting)
        print(f"  checkpointing {setting:<5} -> {plan.step_settings['gradient_checkpointing']!s:<5} "
              f"training step {plan.train_peak_gb:5.2f} GB, peak {plan.peak_gb:5.2f} GB "
              f"({'fits' if plan.fits else 'over budget'})")
    with tempfile.TemporaryDirectory() as tmp:
        for resolution in (int(r) for r in args.resolutions.split(",")):
            _report(resolution, _measure(resolution, args.rounds, Path(tmp), args.compile))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
