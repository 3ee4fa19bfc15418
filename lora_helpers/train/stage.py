"""Stage 3: train an SDXL LoRA (DreamBooth) on a captioned dataset, in 8 GB of GPU memory.

``train(dataset_dir, run_dir, config=TrainConfig.from_preset("t4-8gb"))`` does, in order:

1. plan the GPU memory from the model config and refuse a plan over budget
   (:mod:`lora_helpers.train.memory`), then cap this process at the budget so an
   over-budget run fails at step 1, not step 900;
2. encode the images (VAE) and captions (both text encoders) once into ``run/cache``
   and free those models from GPU and host memory (:mod:`lora_helpers.train.latents`);
3. load the UNet frozen in fp16 (or 8 bits), add a peft LoRA kept in fp32, and train
   with accelerate (one GPU, CPU, or ``accelerate launch`` on several GPUs), a
   GradScaler, gradient checkpointing, SDPA attention and 8-bit AdamW on CUDA;
4. skip non-finite steps (and stop with advice when they repeat), checkpoint every N
   steps atomically (:mod:`lora_helpers.train.checkpoints`), render validation images, log
   every step to ``log.jsonl``, and turn out-of-memory into advice;
5. write the diffusers and kohya LoRA files (:mod:`lora_helpers.core.lora_files`), ``config.json``,
   a loss plot and a model card (:mod:`lora_helpers.train.outputs`).

The loop itself lives in :mod:`lora_helpers.train.loop`, validation and class images in
:mod:`lora_helpers.train.validation`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

__all__ = [
    "PRESETS",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingOutOfMemoryError",
    "auto_steps",
    "bitsandbytes_problem",
    "plan_memory",
    "train",
    "add_cli_arguments",
    "run_cli",
]

# Values that differ between presets; everything else is a TrainConfig default.
PRESETS: dict[str, dict[str, Any]] = {
    # Colab's free T4: fp16 only (no bf16), 8 GB of its 15 GB budgeted, 12.7 GB host RAM.
    "t4-8gb": dict(resolution=1024, train_batch_size=1, lora_rank=16, learning_rate=1e-4, mixed_precision="fp16",
                   gradient_checkpointing=True, optimizer="auto", memory_budget_gb=8.0, checkpointing_steps=200,
                   validation_steps=200, validation_inference_steps=25, max_train_steps=None),
    # 40/80 GB: no checkpointing (faster), larger batch and rank, bf16 where the GPU has it.
    "a100": dict(resolution=1024, train_batch_size=2, lora_rank=32, learning_rate=1e-4, mixed_precision="auto",
                 gradient_checkpointing=False, optimizer="adamw", memory_budget_gb=None, checkpointing_steps=250,
                 validation_steps=250, validation_inference_steps=30, max_train_steps=None),
    # Tiny random SDXL on CPU: the whole path in seconds (tests, notebooks in CI).
    "cpu-smoke": dict(resolution=64, train_batch_size=1, lora_rank=4, learning_rate=1e-3, mixed_precision="no",
                      gradient_checkpointing=False, optimizer="adamw", memory_budget_gb=None, max_train_steps=20,
                      checkpointing_steps=10, validation_steps=10, validation_inference_steps=2,
                      validation_seeds=(0,), num_class_images=4, class_inference_steps=2, snr_gamma=5.0),
}


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved to ``config.json``).

    Attributes:
        preset: the preset these values came from ("t4-8gb", "a100", "cpu-smoke").
        model: SDXL hub id or folder; None: the configured SDXL (the tiny one in smoke mode
            or with the cpu-smoke preset).
        vae: VAE for encoding and validation images: "auto" (the fp16-fix VAE for fp16 on
            CUDA, the model's own VAE in fp32 otherwise), a hub id/folder, or None (model's, fp32).
        resolution: training side in px; images keep their aspect bucket of that area.
        train_batch_size: images per micro-batch.
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_train_steps: optimizer steps; None: ``steps_per_image`` x images, clamped to
            [min_auto_steps, max_auto_steps].
        learning_rate, lr_scheduler, lr_warmup_steps: diffusers schedule name and warm-up
            (None: 5 % of the steps).
        lora_rank, lora_alpha, lora_dropout, target_modules: the UNet LoRA (alpha None = rank).
        train_text_encoder, text_encoder_lr: also train LoRAs on both text encoders (more memory;
            captions are then encoded every step).
        mixed_precision: "fp16", "bf16", "no" or "auto" (bf16 where supported, else fp16);
            always "no" on CPU. The frozen UNet takes this dtype; LoRA weights stay fp32.
        gradient_checkpointing: recompute activations in the backward pass (less memory).
        optimizer: "auto" (8-bit AdamW on CUDA, AdamW elsewhere), "adamw8bit", "adamw".
        unet_8bit: store the frozen UNet in 8 bits (CUDA + bitsandbytes; below 8 GB).
        trigger: the phrase that calls the person ("TOK person"); None: the dataset's caption
            config, else "TOK person".
        instance_prompt: one prompt for every image (used when there are no captions, or
            when ``use_captions`` is False).
        with_prior_preservation, class_prompt, class_data_dir, num_class_images,
        prior_loss_weight, class_inference_steps: DreamBooth prior preservation; missing class
            images are generated with the base model into ``class_data_dir`` (default run/class_images).
        use_masks, background_weight: weight the loss by the face masks; outside the face
            the weight is ``background_weight`` (1 = no effect).
        snr_gamma: min-SNR-gamma loss weighting (None: off).
        noise_offset: offset noise strength (0: off).
        seed: seeds the LoRA init, data order, noise and timesteps.
        fixed_noise: each image gets the same noise and timestep at every step (an
            over-fitting check: the loss must fall).
        checkpointing_steps, checkpoints_total_limit: checkpoint every N steps; the last K keep the
            state to resume from, every checkpoint keeps its LoRA weights.
        validation_steps, validation_prompts, validation_negative_prompt, validation_seeds,
        validation_inference_steps, validation_guidance_scale: sample images every N steps
            (0/None: only at the end; prompts use ``{subject}`` for the trigger).
        memory_budget_gb: GPU memory allowed (GiB); None: no limit.
        max_nonfinite_in_a_row: stop after this many non-finite steps in a row.
        output_name: stem of the kohya file (``<name>_kohya.safetensors``).
        hub_repo_id, hub_private: push the finished run to the Hugging Face Hub.
        device: "auto", "cuda" or "cpu".
        progress: show progress bars.
    """

    preset: str = "t4-8gb"
    model: str | None = None
    vae: str | None = "auto"
    resolution: int = 1024
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_train_steps: int | None = None
    steps_per_image: int = 100
    min_auto_steps: int = 800
    max_auto_steps: int = 1500
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int | None = None
    lora_rank: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")
    train_text_encoder: bool = False
    text_encoder_lr: float = 5e-5
    mixed_precision: str = "fp16"
    gradient_checkpointing: bool = True
    optimizer: str = "auto"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    unet_8bit: bool = False
    trigger: str | None = None
    instance_prompt: str | None = None
    use_captions: bool = True
    with_prior_preservation: bool = False
    class_prompt: str | None = None
    class_data_dir: str | None = None
    num_class_images: int = 100
    prior_loss_weight: float = 1.0
    class_inference_steps: int = 25
    use_masks: bool = True
    background_weight: float = 0.5
    snr_gamma: float | None = 5.0
    noise_offset: float = 0.0
    seed: int = 0
    fixed_noise: bool = False
    checkpointing_steps: int = 200
    checkpoints_total_limit: int | None = 3
    validation_steps: int | None = 200
    validation_prompts: tuple[str, ...] = ("a photo of {subject}", "a portrait of {subject}, oil painting",
                                           "{subject} as an astronaut, cinematic lighting")
    validation_negative_prompt: str | None = None
    validation_seeds: tuple[int, ...] = (0, 1)
    validation_inference_steps: int = 25
    validation_guidance_scale: float = 5.0
    memory_budget_gb: float | None = 8.0
    max_nonfinite_in_a_row: int = 5
    output_name: str = "lora"
    hub_repo_id: str | None = None
    hub_private: bool = True
    device: str = "auto"
    progress: bool = True

    @classmethod
    def from_preset(cls, name: str = "t4-8gb", **overrides: Any) -> "TrainConfig":
        """A config from a preset, with ``overrides`` on top (None values are ignored).

        Raises:
            ValueError: for an unknown preset or field name.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s): {', '.join(sorted(unknown))}")
        values = {**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}, "preset": name}
        return cls(**values)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        differing = {k: v for k, v in PRESETS[self.preset].items() if v != defaults[k]}
        if differing and all(getattr(self, k) == defaults[k] for k in differing):
            # TrainConfig(preset="cpu-smoke") alone only names the preset; silently training
            # at 1024 px on a CPU would take hours.
            raise ValueError(f"TrainConfig(preset={self.preset!r}) does not apply the preset's values; "
                             f"use TrainConfig.from_preset({self.preset!r}, ...)")
        for key in ("target_modules", "validation_prompts", "validation_seeds"):
            setattr(self, key, tuple(getattr(self, key)))
        if self.mixed_precision not in ("fp16", "bf16", "no", "auto"):
            raise ValueError(f"mixed_precision must be fp16, bf16, no or auto, not {self.mixed_precision!r}")
        if self.optimizer not in ("auto", "adamw8bit", "adamw"):
            raise ValueError(f"optimizer must be auto, adamw8bit or adamw, not {self.optimizer!r}")
        self._check_numbers()
        if not 0.0 <= self.background_weight <= 1.0:
            raise ValueError(f"background_weight must be in [0, 1], not {self.background_weight}")

    def _check_numbers(self) -> None:
        """Refuse values that would train nothing, or fail only after the models are loaded.

        Checked here because 0 is falsy: ``max_train_steps=0`` would silently train the automatic
        number of steps, and ``lora_alpha=0`` would train a LoRA that changes nothing.
        """
        def positive(value) -> bool:
            return isinstance(value, (int, float)) and math.isfinite(value) and value > 0

        if self.max_train_steps is not None and self.max_train_steps < 1:
            raise ValueError(f"max_train_steps must be at least 1 (or None for {self.steps_per_image} steps per "
                             f"photo), not {self.max_train_steps}")
        for name, example in (("lora_rank", 16), ("train_batch_size", 1), ("gradient_accumulation_steps", 1)):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (e.g. {example}), not {getattr(self, name)}")
        if self.lora_alpha is not None and not positive(self.lora_alpha):
            raise ValueError(f"lora_alpha must be above 0 (or None for the rank, {self.lora_rank}), "
                             f"not {self.lora_alpha}")
        for name, example in (("learning_rate", "1e-4"), ("text_encoder_lr", "5e-5")):
            if not positive(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number above 0 (e.g. {example}), not {getattr(self, name)}")
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8 (SDXL: 1024, 768 or 512), "
                             f"not {self.resolution}")
        for name, hint in (("checkpointing_steps", "0: only at the end"), ("validation_steps", "0: only at the end"),
                           ("lr_warmup_steps", "None: 5 % of the steps")):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be 0 or more ({hint}), not {value}")


@dataclass
class TrainResult:
    """What :func:`train` produced.

    Attributes:
        run_dir: the run folder.
        lora_path: diffusers-format LoRA (``pipe.load_lora_weights``).
        kohya_path: kohya-format LoRA (A1111, ComfyUI).
        config_path: ``config.json``.
        log_path: ``log.jsonl``.
        steps: optimizer steps done in total.
        final_loss: mean loss of the last 10 steps.
        nonfinite_steps: steps skipped for a NaN/inf loss.
        seconds_per_step: median time of a training step (validation and saving excluded).
        estimated_peak_gb: the planner's estimate.
        measured_peak_gb: ``torch.cuda.max_memory_allocated`` during training (None on CPU).
        samples: validation grids, in step order.
        validation: one dict per validation (step, grid, hook values).
        hub_url: where the run was pushed, or None.
    """

    run_dir: Path
    lora_path: Path
    kohya_path: Path
    config_path: Path
    log_path: Path
    steps: int
    final_loss: float | None
    nonfinite_steps: int
    seconds_per_step: float | None
    estimated_peak_gb: float
    measured_peak_gb: float | None
    samples: list[Path] = field(default_factory=list)
    validation: list[dict] = field(default_factory=list)
    hub_url: str | None = None


class TrainingDivergedError(RuntimeError):
    """The loss stayed NaN/inf for several steps in a row."""


class TrainingOutOfMemoryError(RuntimeError):
    """The GPU (or host) ran out of memory; the message says what to change."""


def auto_steps(n_images: int, config: TrainConfig) -> int:
    """Training steps for ``n_images`` photos: ``steps_per_image`` each, clamped to the preset's range."""
    if config.max_train_steps:
        return int(config.max_train_steps)
    return int(min(max(config.steps_per_image * n_images, config.min_auto_steps), config.max_auto_steps))


def _device_type(config: TrainConfig) -> str:
    if config.device == "cpu" or not torch.cuda.is_available():
        return "cpu"
    return "cuda"


def _mixed_precision(config: TrainConfig, device_type: str) -> str:
    if device_type != "cuda":
        return "no"  # fp16 kernels on CPU are slow or missing; tests and smoke runs use fp32
    if config.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if config.mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise ValueError("this GPU has no bf16 (a T4 does not): use mixed_precision='fp16' (the t4-8gb preset)")
    return config.mixed_precision


def _resolve(config: TrainConfig, device_type: str) -> TrainConfig:
    """Fill the "auto" and None fields for this machine."""
    from lora_helpers.core.config import HUB_MODELS, resolve_models, smoke_mode

    smoke = config.preset == "cpu-smoke" or smoke_mode()
    models = resolve_models(smoke=smoke)
    mixed = _mixed_precision(config, device_type)
    vae = config.vae
    if vae == "auto":
        # The original SDXL VAE overflows in fp16; in fp32 it is fine (and needs no download).
        vae = HUB_MODELS.vae if (mixed == "fp16" and not models.smoke) else None
    optimizer = config.optimizer
    if optimizer == "auto":
        optimizer = "adamw8bit" if device_type == "cuda" else "adamw"
    if optimizer == "adamw8bit" and (problem := bitsandbytes_problem()):
        # Colab images without bitsandbytes, or a build without this GPU's kernels: train anyway,
        # with 6 more bytes of optimizer state per LoRA weight (the plan below counts them).
        _say_once(f"8-bit AdamW is not available ({problem}); using AdamW instead")
        optimizer = "adamw"
    return dataclasses.replace(
        config, model=config.model or models.sdxl, vae=vae, mixed_precision=mixed, optimizer=optimizer,
        lora_alpha=config.lora_alpha if config.lora_alpha is not None else float(config.lora_rank),
        device=device_type,
    )


@functools.cache
def bitsandbytes_problem() -> str | None:
    """Why 8-bit AdamW cannot be used here, or None when bitsandbytes imports and has the optimizer."""
    try:
        import bitsandbytes as bnb

        bnb.optim.AdamW8bit  # noqa: B018 - raises when the build has no optimizer kernels
    except Exception as exc:  # ImportError, or a RuntimeError from a build without CUDA kernels
        return f"bitsandbytes: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unusable'}"
    return None


@functools.cache
def _say_once(message: str) -> None:
    print(message)


def plan_memory(config: TrainConfig, *, device_type: str | None = None):
    """The GPU memory plan of a config on this machine (or ``device_type``), before loading anything.

    Returns:
        A :class:`lora_helpers.train.memory.MemoryPlan`; ``print`` it for a table.
    """
    from lora_helpers.train.memory import estimate_peak_memory

    device_type = device_type or _device_type(config)
    cfg = _resolve(config, device_type)  # idempotent: a resolved config stays as it is
    weight_dtype = {"fp16": "fp16", "bf16": "bf16"}.get(cfg.mixed_precision, "fp32")
    return estimate_peak_memory(
        model=cfg.model, resolution=cfg.resolution, batch_size=cfg.train_batch_size, lora_rank=cfg.lora_rank,
        target_modules=tuple(cfg.target_modules), weight_dtype=weight_dtype, unet_8bit=cfg.unet_8bit,
        gradient_checkpointing=cfg.gradient_checkpointing, optimizer=cfg.optimizer,
        train_text_encoder=cfg.train_text_encoder, prior_preservation=cfg.with_prior_preservation,
        device_type=device_type, budget_gb=cfg.memory_budget_gb,
    )


def _make_accelerator(mixed_precision: str, cpu: bool):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:
        # A notebook that trained before with other settings: reset, unless launched on several processes.
        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


def _trigger(config: TrainConfig, dataset_dir: Path) -> tuple[str, str | None]:
    from lora_helpers.caption.stage import read_caption_config

    caption_cfg = read_caption_config(dataset_dir)
    trigger = config.trigger or caption_cfg.get("trigger") or caption_cfg.get("subject") or "TOK person"
    return str(trigger), caption_cfg.get("class_noun")


@contextlib.contextmanager
def _memory_budget(budget_gb: float | None, device: torch.device):
    """Cap this process's CUDA memory at the budget, so going over fails now, not at step 900."""
    if device.type != "cuda" or not budget_gb:
        yield
        return
    from lora_helpers.train.memory import GB

    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, budget_gb * GB / total), device)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)


def train(dataset_dir: str | Path, run_dir: str | Path, *, config: TrainConfig | None = None,
          resume: str | Path | None = None,
          validation_hook: Callable[[int, list, Path], dict | None]
          | Sequence[Callable[[int, list, Path], dict | None]] | None = None) -> TrainResult:
    """Train a LoRA on a prepared, captioned dataset and write the run folder.

    Args:
        dataset_dir: the dataset (``metadata.jsonl``, ``images/``, ``masks/``, captions).
        run_dir: the run folder (created): checkpoints/, samples/, log.jsonl, the LoRA files.
        config: a :class:`TrainConfig` (default: the t4-8gb preset).
        resume: "latest" (continue from the newest checkpoint, or start when there is none),
            a step number, or a checkpoint folder. Without it, a run folder that already holds
            checkpoints is refused, so nothing is overwritten by accident.
        validation_hook: called as ``hook(step, images, run_dir)`` after each validation with
            the list of PIL images (prompts x seeds, row-major); a dict it returns is written
            into that step's ``log.jsonl`` row (e.g. identity scores). A list of hooks runs
            each in turn (e.g. scoring, then showing the grid in a notebook).

    Returns:
        A :class:`TrainResult`.

    Raises:
        MemoryBudgetError: the plan does not fit ``memory_budget_gb`` (nothing was loaded).
        TrainingDivergedError: NaN/inf loss for ``max_nonfinite_in_a_row`` steps.
        TrainingOutOfMemoryError: out of memory, with what to change and the checkpoint to resume from.
        FileExistsError: ``run_dir`` has checkpoints and ``resume`` was not given.
    """
    from lora_helpers.train import checkpoints as ckpt
    from lora_helpers.train.memory import check_budget
    from lora_helpers.train.loop import run_training

    config = config or TrainConfig()
    dataset_dir, run_dir = Path(dataset_dir), Path(run_dir)
    if config.train_text_encoder:
        from lora_helpers.core.lora_files import text_encoder_lora_supported

        supported, reason = text_encoder_lora_supported()
        if not supported:
            raise ValueError(reason)
    device_type = _device_type(config)
    cfg = _resolve(config, device_type)
    start_from = ckpt.find_checkpoint(run_dir, resume) if resume is not None else None
    if resume is None and ckpt.list_checkpoints(run_dir):
        last = ckpt.list_checkpoints(run_dir)[-1]
        raise FileExistsError(f"{run_dir} already has checkpoints (up to {last.name}): pass resume='latest' "
                              "(--resume latest) to continue, or choose a new run folder")
    plan = plan_memory(cfg, device_type=device_type)
    if cfg.memory_budget_gb:
        plan = check_budget(plan, cfg.memory_budget_gb)
    if cfg.hub_repo_id:  # a push that cannot work must fail now, not after an hour of training
        from lora_helpers.train.outputs import check_hub_access

        check_hub_access(cfg.hub_repo_id, private=cfg.hub_private)
    accelerator = _make_accelerator(cfg.mixed_precision, cpu=device_type == "cpu")
    trigger, class_noun = _trigger(cfg, dataset_dir)
    with _memory_budget(cfg.memory_budget_gb, accelerator.device):
        try:
            return run_training(dataset_dir, run_dir, cfg=cfg, accelerator=accelerator, plan=plan, trigger=trigger,
                                class_noun=class_noun, start_from=start_from, validation_hook=validation_hook)
        finally:
            # accelerate keeps references to the UNet and optimizer: drop them, so a notebook can
            # generate (or retry with other settings) in the same session without a restart
            from lora_helpers.core.runtime import free_memory

            accelerator.free_memory()
            free_memory()


# --------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m lora_helpers train`` (each overrides the preset)."""
    from lora_helpers.core.config import smoke_mode

    parser.add_argument("dataset_dir", type=Path, help="prepared, captioned dataset folder")
    parser.add_argument("run_dir", type=Path, help="output folder (checkpoints, samples, LoRA files)")
    parser.add_argument("--model", default=None, help="SDXL hub id or folder (default: SDXL base; tiny in smoke mode)")
    parser.add_argument("--preset", choices=list(PRESETS), default="cpu-smoke" if smoke_mode() else "t4-8gb",
                        help="settings for the machine (default: %(default)s)")
    parser.add_argument("--steps", dest="max_train_steps", type=int, default=None,
                        help="optimizer steps (default: scaled to the number of photos)")
    parser.add_argument("--resume", default=None, help="'latest', a step number or a checkpoint folder")
    parser.add_argument("--resolution", type=int, default=None)
    parser.add_argument("--batch-size", dest="train_batch_size", type=int, default=None)
    parser.add_argument("--grad-accum", dest="gradient_accumulation_steps", type=int, default=None)
    parser.add_argument("--lr", dest="learning_rate", type=float, default=None)
    parser.add_argument("--lr-scheduler", default=None, help="constant, constant_with_warmup, cosine, linear, ...")
    parser.add_argument("--warmup", dest="lr_warmup_steps", type=int, default=None)
    parser.add_argument("--rank", dest="lora_rank", type=int, default=None)
    parser.add_argument("--alpha", dest="lora_alpha", type=float, default=None)
    parser.add_argument("--target-modules", default=None, help="comma-separated UNet layer names")
    parser.add_argument("--train-text-encoder", action="store_true", default=None)
    parser.add_argument("--mixed-precision", choices=["fp16", "bf16", "no", "auto"], default=None)
    parser.add_argument("--optimizer", choices=["auto", "adamw8bit", "adamw"], default=None)
    parser.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_false",
                        default=None)
    parser.add_argument("--unet-8bit", action="store_true", default=None, help="frozen UNet in 8 bits (below 8 GB)")
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
    parser.add_argument("--snr-gamma", type=float, default=None, help="min-SNR gamma (0 turns it off)")
    parser.add_argument("--noise-offset", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--checkpoint-every", dest="checkpointing_steps", type=int, default=None)
    parser.add_argument("--keep-checkpoints", dest="checkpoints_total_limit", type=int, default=None,
                        help="how many checkpoints keep the state to resume from (every one keeps its LoRA)")
    parser.add_argument("--validate-every", dest="validation_steps", type=int, default=None)
    parser.add_argument("--validation-prompt", dest="validation_prompts", action="append", default=None,
                        help="repeatable; use {subject} for the trigger")
    parser.add_argument("--budget-gb", dest="memory_budget_gb", type=float, default=None,
                        help="GPU memory budget in GiB (0: none)")
    parser.add_argument("--output-name", default=None, help="stem of the kohya file")
    parser.add_argument("--push-to-hub", dest="hub_repo_id", default=None, help="Hub repo id to upload the run to")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default=None)
    parser.add_argument("--plan-only", action="store_true", help="print the memory plan and exit")


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
    """Train from the command line; exit 2 naming a setting out of range, 1 on a refused or failed run."""
    import sys

    from lora_helpers.train.memory import MemoryBudgetError

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
        result = train(args.dataset_dir, args.run_dir, config=config, resume=args.resume)
    except (MemoryBudgetError, TrainingDivergedError, TrainingOutOfMemoryError, FileExistsError, ValueError) as exc:
        print(f"training stopped: {exc}", file=sys.stderr)
        return 1
    measured = "not measured (CPU)" if result.measured_peak_gb is None else f"{result.measured_peak_gb:.2f} GB"
    print(f"done: {result.steps} steps, final loss {result.final_loss:.4f}, "
          f"{result.seconds_per_step or float('nan'):.3f} s/step, memory {measured} "
          f"(estimate {result.estimated_peak_gb:.2f} GB)")
    print(f"LoRA: {result.lora_path}\nkohya: {result.kohya_path}")
    return 0
