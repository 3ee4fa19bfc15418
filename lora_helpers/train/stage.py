"""Stage 3: train an SDXL LoRA (DreamBooth) on a captioned dataset, in 8 GB of GPU memory.

``train(dataset_dir, run_dir, config=TrainConfig.from_preset("t4-8gb"))`` does, in order:

1. plan the GPU memory from the model config and refuse a plan over budget
   (:mod:`lora_helpers.train.memory`), then cap this process at the budget so an
   over-budget run fails at step 1, not step 900;
2. encode the images (VAE) and captions (both text encoders) once into ``run/cache``
   and free those models from GPU and host memory (:mod:`lora_helpers.train.latents`);
3. load the UNet frozen in fp16 (or 8 bits), add a peft LoRA kept in fp32, and train
   with accelerate (one GPU, CPU, or ``accelerate launch`` on several GPUs), a GradScaler,
   gradient checkpointing of the UNet blocks the plan chose, SDPA attention and 8-bit AdamW on CUDA;
4. skip non-finite steps (and stop with advice when they repeat), checkpoint every N
   steps atomically (:mod:`lora_helpers.train.checkpoints`), render validation images, log
   every step to ``log.jsonl``, and turn out-of-memory into advice;
5. write the diffusers and kohya LoRA files (:mod:`lora_helpers.core.lora_files`), ``config.json``,
   a loss plot and a model card (:mod:`lora_helpers.train.outputs`).

The settings live in :mod:`lora_helpers.train.config`, the loop in :mod:`lora_helpers.train.loop`
(it fires the events of :mod:`lora_helpers.train.events`: progress bars, inline grids and
scores are listeners), validation and class images in :mod:`lora_helpers.train.validation`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from pathlib import Path
from typing import Any, Sequence

import torch

from lora_helpers.core.config import smoke_mode
from lora_helpers.core.lora_files import text_encoder_lora_supported
from lora_helpers.core.runtime import is_main_process
from lora_helpers.train import checkpoints as ckpt
from lora_helpers.core.run_folder import DEFAULT_TRIGGER, check_run_folder, read_caption_config
from lora_helpers.core.run_lock import RunFolderLockedError
from lora_helpers.train.config import (PRESETS, TrainConfig, TrainingDivergedError, TrainingOutOfMemoryError,
                                       TrainResult)
from lora_helpers.train.events import ValidationHook, ValidationHooks
from lora_helpers.train.listeners import ProgressBar
from lora_helpers.train.loop import run_training
from lora_helpers.train.resolve import device_for, resolve_config
from lora_helpers.train.memory import (
    GB, MemoryBudgetError, MemoryPlan, check_budget, check_host_memory, estimate_peak_memory,
)
from lora_helpers.train.outputs import check_hub_access
from lora_helpers.train.pivotal import pivotal_from_captions
from lora_helpers.train.processes import hold_run_lock, make_accelerator, quiet_other_processes, release_accelerator
from lora_helpers.train.step_plan import keep_resumed_batch, plan_step

__all__ = ["plan_memory", "checkpoint_bytes", "train", "add_cli_arguments", "run_cli"]


# What each preset is made for: a plan made on a machine without a GPU is for this.
_PRESET_TARGETS = {"t4-8gb": "a Colab T4", "a100": "an A100-class GPU"}


def _plan_device(config: TrainConfig) -> tuple[str, str]:
    """(device type to plan for, words for it): this machine's GPU, else the preset's target."""
    here = device_for(config)
    if here == "cuda":
        return "cuda", f"this GPU ({torch.cuda.get_device_name()})"
    if config.device == "cpu" or (config.preset == "cpu-smoke" and config.device != "cuda"):
        return "cpu", "this CPU"
    # A laptop checking a plan for Colab: plan for the GPU the preset is made for, not for this CPU.
    target = _PRESET_TARGETS.get(config.preset, "a CUDA GPU")
    return "cuda", f"{target} (no GPU here: planned for the {config.preset} preset's GPU)"


def plan_memory(config: TrainConfig, *, device_type: str | None = None) -> MemoryPlan:
    """The memory plan of a config, before anything is loaded: GPU memory and host RAM.

    Without a GPU here, a GPU preset (``t4-8gb``, ``a100``) is planned for the GPU it is made for
    (the T4: fp16, 8-bit AdamW), so a plan checked on a laptop is the plan Colab will run.

    Args:
        config: the training settings ("auto" fields are resolved for the planned device first).
        device_type: "cuda" or "cpu"; None: this machine's GPU, else the preset's target.

    Returns:
        A :class:`lora_helpers.train.memory.MemoryPlan` naming the device it assumes; ``print`` it
        for a table. Its ``step_settings`` are the checkpointed UNet blocks and the micro-batch it
        decided for "auto" (:func:`lora_helpers.train.step_plan.choose_step`), its ``choices`` say
        them in words.
    """
    if device_type is None:
        device_type, where = _plan_device(config)
    else:
        where = "this CPU" if device_type == "cpu" else "a CUDA GPU"
    cfg = resolve_config(config, device_type)  # idempotent: a resolved config stays as it is
    inputs, choice = plan_step(cfg, device_type)  # "auto" checkpointing and batch decided here
    plan = estimate_peak_memory(**inputs)
    plan.step_settings, plan.choices = choice.settings, choice.lines
    weights = "8-bit" if cfg.unet_8bit else "4-bit NF4" if cfg.unet_4bit else {"no": "fp32"}.get(
        cfg.mixed_precision, cfg.mixed_precision)
    plan.target = f"{where}, {weights} UNet, {cfg.optimizer}"
    plan.host_budget_gb = cfg.host_memory_budget_gb
    return plan


def _trigger(config: TrainConfig, dataset_dir: Path) -> tuple[str, str | None]:
    caption_cfg = read_caption_config(dataset_dir)
    trigger = config.trigger or caption_cfg.get("trigger") or caption_cfg.get("subject") or DEFAULT_TRIGGER
    return str(trigger), caption_cfg.get("class_noun")


@contextlib.contextmanager
def _memory_budget(budget_gb: float | None, device: torch.device):
    """Cap this process's CUDA memory at the budget, so going over fails now, not at step 900."""
    if device.type != "cuda" or not budget_gb:
        yield
        return
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * GB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def _listeners(listeners: Sequence[Any] | None, validation_hook, run_dir: Path) -> list:
    """The progress bar (unless given), then the validation hooks as a listener, then ``listeners``."""
    listeners = list(listeners or [])
    bar = [] if any(isinstance(listener, ProgressBar) for listener in listeners) else [ProgressBar()]
    hooks = [ValidationHooks(validation_hook, run_dir)] if validation_hook else []
    return bar + hooks + listeners


def checkpoint_bytes(plan: MemoryPlan) -> int:
    """Disk space a run needs free before it starts: one checkpoint and the final LoRA files, with a margin.

    Args:
        plan: the memory plan (its LoRA parameter count).

    Returns:
        Bytes: the LoRA in fp32 (4 bytes a weight) and AdamW's two moments (8; 8-bit AdamW keeps small
        tensors in fp32, so 8 is what to count) for the checkpoint, the diffusers and kohya files (8)
        at the end, a quarter more, and 64 MiB for the latent cache, log and sample grids.
    """
    return int(plan.lora_parameters * (4 + 8 + 8) * 1.25) + 64 * 2**20


def train(dataset_dir: str | Path, run_dir: str | Path, *, config: TrainConfig | None = None,
          resume: str | int | Path | None = None, accept_changes: bool = False,
          validation_hook: ValidationHook | Sequence[ValidationHook] | None = None,
          listeners: Sequence[Any] | None = None) -> TrainResult:
    """Train a LoRA on a prepared, captioned dataset and write the run folder.

    Args:
        dataset_dir: the dataset (``metadata.jsonl``, ``images/``, ``masks/``, captions).
        run_dir: the run folder (created): checkpoints/, samples/, log.jsonl, the LoRA files.
        config: a :class:`TrainConfig` (default: the t4-8gb preset).
        resume: "latest" (continue from the newest good checkpoint, skipping damaged ones, or start
            when there is none), a step number, or a checkpoint folder. Without it, a run folder that
            already holds checkpoints is refused, so nothing is overwritten by accident.
        accept_changes: resume even though the learning rate, batch, resolution, seed, base model or
            dataset differ from the checkpoint's; the new ones are used and the change is recorded in
            ``config.json`` and the model card. Without it such a resume is refused, naming each change.
        validation_hook: called as ``hook(step, images, run_dir)`` after each validation with
            the list of PIL images (prompts x seeds, row-major); a dict it returns is written
            into that step's ``log.jsonl`` row (e.g. identity scores). A list of hooks runs
            each in turn. Hooks run before ``listeners``, so a listener sees their scores.
        listeners: objects with some of the ``on_*`` methods of
            :class:`lora_helpers.train.events.TrainingListener` (e.g.
            :class:`lora_helpers.train.listeners.ShowValidation` in a notebook). A
            :class:`~lora_helpers.train.listeners.ProgressBar` comes first unless one is given.
            A listener that raises is reported as a warning; training goes on.

    Returns:
        A :class:`TrainResult`.

    Raises:
        MemoryBudgetError: the plan does not fit ``memory_budget_gb`` (nothing was loaded).
        RunFolderError: the run folder cannot be written or its disk is too full (nothing was loaded).
        RunFolderLockedError: another process trains in ``run_dir``.
        CheckpointError: the checkpoint to resume from is missing or damaged (naming the good ones).
        ResumeSettingsError: the checkpoint was trained with other settings or data.
        TrainingDivergedError: NaN/inf loss for ``max_nonfinite_in_a_row`` steps.
        TrainingOutOfMemoryError: out of memory, with what to change and the checkpoint to resume from.
        RunWriteError: the disk filled up while writing; earlier checkpoints are intact.
        FileExistsError: ``run_dir`` has checkpoints and ``resume`` was not given.
    """
    # several processes (accelerate launch): from here on the others print nothing, not even the
    # warnings libraries give when they are imported
    with quiet_other_processes():
        return _train(dataset_dir, run_dir, config=config, resume=resume, accept_changes=accept_changes,
                      validation_hook=validation_hook, listeners=listeners)


def _train(dataset_dir, run_dir, *, config, resume, accept_changes, validation_hook, listeners) -> TrainResult:
    """:func:`train`, on every process of a multi-process run."""
    config = config or TrainConfig()
    dataset_dir, run_dir = Path(dataset_dir), Path(run_dir)
    resume = ckpt.check_resume_value(resume, run_dir)  # its form, before anything is planned or written
    if config.train_text_encoder:
        supported, reason = text_encoder_lora_supported()
        if not supported:
            raise ValueError(reason)
    device_type = device_for(config)
    if resume is not None:
        config = keep_resumed_batch(config, run_dir)
    cfg = pivotal_from_captions(resolve_config(config, device_type), dataset_dir)
    plan = plan_memory(cfg, device_type=device_type)
    cfg = dataclasses.replace(cfg, **plan.step_settings)  # "auto" checkpointing and batch, as planned
    if cfg.memory_budget_gb:
        plan = check_budget(plan, cfg.memory_budget_gb)
    check_host_memory(plan)  # Colab ends the whole session when host RAM runs out mid-load
    if cfg.hub_repo_id:  # a push that cannot work must fail now, not after an hour of training
        check_hub_access(cfg.hub_repo_id, private=cfg.hub_private)
    # a read-only folder, a file in its place or a full disk must fail before the models load
    check_run_folder(run_dir, need_bytes=checkpoint_bytes(plan))
    accelerator = make_accelerator(cfg.mixed_precision, cpu=device_type == "cpu")
    main = accelerator.is_main_process
    with hold_run_lock(run_dir, accelerator):  # every process waits here until the main one holds the lock
        start_from = None
        if resume is not None:  # a damaged newest checkpoint is skipped with a message, a named one refused
            start_from = ckpt.find_checkpoint(run_dir, resume, say=print if main else _quiet)
        if resume is None and ckpt.list_checkpoints(run_dir):
            last = ckpt.list_checkpoints(run_dir)[-1]
            raise FileExistsError(f"{run_dir} already has checkpoints (up to {last.name}): pass resume='latest' "
                                  "(--resume latest) to continue, or choose a new run folder")
        trigger, class_noun = _trigger(cfg, dataset_dir)
        with _memory_budget(cfg.memory_budget_gb, accelerator.device):
            try:
                return run_training(dataset_dir, run_dir, cfg=cfg, accelerator=accelerator, plan=plan,
                                    trigger=trigger, class_noun=class_noun, start_from=start_from,
                                    listeners=_listeners(listeners, validation_hook, run_dir),
                                    accept_changes=accept_changes)
            finally:
                # accelerate keeps references to the UNet and optimizer: drop them, so a notebook can
                # generate (or retry with other settings) in the same session without a restart
                release_accelerator(accelerator)


def _quiet(*_args, **_kwargs) -> None:
    """Other processes of a multi-GPU run stay silent; the main one speaks."""


# --------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m lora_helpers train`` (each overrides the preset).

    Args:
        parser: the ``train`` subcommand's parser.
    """
    parser.add_argument("dataset_dir", type=Path, help="prepared, captioned dataset folder")
    parser.add_argument("run_dir", type=Path, help="output folder (checkpoints, samples, LoRA files)")
    parser.add_argument("--model", default=None, help="SDXL hub id or folder (default: SDXL base; tiny in smoke mode)")
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu-smoke" if smoke_mode() else "t4-8gb",
                        help="settings for the machine (default: %(default)s)")
    parser.add_argument("--steps", dest="max_train_steps", type=int, default=None,
                        help="optimizer steps (default: scaled to the number of photos)")
    parser.add_argument("--resume", default=None,
                        help="'latest' (the newest good checkpoint), a step number or a checkpoint folder")
    parser.add_argument("--accept-changes", action="store_true",
                        help="resume even though the learning rate, batch, resolution, seed, model or dataset "
                             "changed since the checkpoint (recorded in config.json)")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", dest="train_batch_size", type=_auto_or_int, default=None,
                        help="images per micro-batch, or 'auto' (a larger one where the memory plan has room)")
    parser.add_argument("--grad-accum", dest="gradient_accumulation_steps", type=int, default=None)
    parser.add_argument("--lr", dest="learning_rate", type=float, default=None)
    parser.add_argument("--lr-scheduler", default=None, help="constant, constant_with_warmup, cosine, linear, ...")
    parser.add_argument("--warmup", dest="lr_warmup_steps", type=int, default=None)
    parser.add_argument("--rank", dest="lora_rank", type=int, default=None)
    parser.add_argument("--alpha", dest="lora_alpha", type=float, default=None)
    parser.add_argument("--target-modules", default=None, help="comma-separated UNet layer names")
    parser.add_argument("--train-text-encoder", action="store_true", default=None)
    parser.add_argument("--pivotal", dest="pivotal_tokens", type=int, default=None, metavar="N",
                        help="pivotal tuning: N new tokens (<s0><s1>...) replace the identifier and train in both text "
                             "encoders (e.g. 2; 0: off)")
    parser.add_argument("--pivotal-lr", dest="pivotal_lr", type=float, default=None,
                        help="learning rate of the new tokens' embeddings (default 3e-4)")
    parser.add_argument("--pivotal-freeze", dest="pivotal_freeze_fraction", type=float, default=None, metavar="FRACTION",
                        help="share of the steps the new tokens train before they freeze (default 0.5)")
    parser.add_argument("--mixed-precision", choices=["fp16", "bf16", "no", "auto"], default=None)
    parser.add_argument("--optimizer", choices=["auto", "adamw8bit", "adamw"], default=None)
    parser.add_argument("--gradient-checkpointing", default=None, metavar="auto|all|none|N",
                        help="auto: the fewest UNet blocks that fit the budget (default); all; none; or N blocks")
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const",
                        const="none", default=None, help="the same as --gradient-checkpointing none")
    parser.add_argument("--compile-unet", action="store_true", default=None,
                        help="torch.compile the UNet (a minute or more to compile; faster steps on some machines)")
    parser.add_argument("--unet-8bit", action="store_true", default=None, help="frozen UNet in 8 bits (below 8 GB)")
    parser.add_argument("--unet-4bit", action="store_true", default=None,
                        help="frozen UNet in 4 bits, NF4 (about 4 GB at 1024 px; may cost a little likeness)")
    parser.add_argument("--vae", default=None, help="'auto', a VAE hub id/folder, or 'none' (the model's, fp32)")
    parser.add_argument("--trigger", default=None, help="trigger phrase (default: the dataset's, else 'TOK person')")
    parser.add_argument("--instance-prompt", default=None, help="one prompt for all images (no per-image captions)")
    parser.add_argument("--no-captions", dest="use_captions", action="store_false", default=None)
    parser.add_argument("--prior-preservation", dest="with_prior_preservation", action="store_true", default=None)
    parser.add_argument("--class-prompt", default=None)
    parser.add_argument("--class-dir", dest="class_data_dir", default=None)
    parser.add_argument("--num-class-images", type=int, default=None)
    parser.add_argument("--prior-weight", dest="prior_loss_weight", type=float, default=None)
    parser.add_argument("--no-masks", dest="use_masks", action="store_false", default=None)
    parser.add_argument("--background-weight", type=float, default=None)
    parser.add_argument("--min-resize-quality", type=float, default=None,
                        help="skip crops whose resize quality (share of real detail, from prepare) is below this")
    parser.add_argument("--weight-by-resize-quality", action="store_true", default=None,
                        help="scale each image's loss by its resize quality")
    parser.add_argument("--snr-gamma", type=float, default=None, help="min-SNR gamma (0 turns it off)")
    parser.add_argument("--noise-offset", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--checkpoint-every", dest="checkpointing_steps", type=int, default=None)
    parser.add_argument("--keep-checkpoints", dest="checkpoints_total_limit", type=int, default=None,
                        help="how many checkpoints keep the state to resume from (every one keeps its LoRA)")
    parser.add_argument("--validate-every", dest="validation_steps", type=int, default=None)
    parser.add_argument("--validation-prompt", dest="validation_prompts", action="append", default=None,
                        help="repeatable; use {subject} for the trigger (several people: once per person), {<name>} for one person")
    parser.add_argument("--budget-gb", dest="memory_budget_gb", type=float, default=None,
                        help="GPU memory budget in GiB (0: none)")
    parser.add_argument("--output-name", default=None, help="stem of the kohya file")
    parser.add_argument("--push-to-hub", dest="hub_repo_id", default=None, help="Hub repo id to upload the run to")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None)
    parser.add_argument("--plan-only", action="store_true", help="print the memory plan and exit")


def _auto_or_int(text: str) -> int | str:
    return "auto" if text.strip().lower() == "auto" else int(text)


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides = {k: v for k, v in vars(args).items() if k in names and v is not None}
    if isinstance(overrides.get("target_modules"), str):
        overrides["target_modules"] = tuple(t.strip() for t in overrides["target_modules"].split(",") if t.strip())
    # "switch off" values on the command line: --vae none, --snr-gamma 0, --budget-gb 0
    off = {}
    for key, value in (("vae", "none"), ("snr_gamma", 0), ("memory_budget_gb", 0)):
        if key in overrides and overrides[key] == value:
            overrides.pop(key)
            off[key] = None
    return dataclasses.replace(TrainConfig.from_preset(args.preset, **overrides), **off)


def run_cli(args: argparse.Namespace) -> int:
    """Train from the command line.

    Args:
        args: parsed by a parser set up with :func:`add_cli_arguments`.

    Returns:
        The exit code: 0 done, 2 a setting out of range (named), 1 a refused or failed run.
    """
    try:
        config = _config_from_args(args)
    except ValueError as exc:  # a setting out of range: name it, no traceback
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.plan_only:
        plan = plan_memory(config)
        print(plan)
        return 0 if plan.fits else 1
    try:
        result = train(args.dataset_dir, args.run_dir, config=config, resume=args.resume,
                       accept_changes=args.accept_changes)
    except (MemoryBudgetError, TrainingDivergedError, TrainingOutOfMemoryError, FileExistsError, ValueError,
            RunFolderLockedError, ckpt.RunWriteError) as exc:
        # ValueError covers a damaged or missing checkpoint, a changed setting and an unusable run folder
        if getattr(args, "debug", False):
            raise
        if is_main_process():  # every process of a multi-process launch meets the same error: say it once
            print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if is_main_process():  # it says where to resume from; the other processes end quietly
            raise
        return 130
    if not is_main_process():  # the other processes of a multi-process launch say nothing
        return 0
    measured = "not measured (CPU)" if result.measured_peak_gb is None else f"{result.measured_peak_gb:.2f} GB"
    print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, "
          f"{result.seconds_per_step or float('nan'):.3f} s/step, memory {measured} "
          f"(estimate {result.estimated_peak_gb:.2f} GB)")
    print(f"LoRA: {result.lora_path}\nkohya: {result.kohya_path}")
    if result.embedding_path is not None:
        print(f"new tokens' embeddings: {result.embedding_path} (load them with the LoRA; see the model card)")
    return 0
