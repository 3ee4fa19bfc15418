"""What a training run depends on: :class:`TrainConfig`, its presets, and the result and errors of a run.

Kept apart from the loop so that a notebook, the CLI and the tests can build and check a
config without importing the training code; :mod:`lora_helpers.train.resolve` fills its
"auto" and None fields for this machine.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_helpers.core.lora_files import UNET_TARGET_MODULES
from lora_helpers.train.block_memory import checkpointing_setting

__all__ = [
    "PRESETS",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingOutOfMemoryError",
    "auto_steps",
]

PRESETS: dict[str, dict[str, Any]] = {
    # Colab's free T4: fp16 only (no bf16), 8 GB of its 15 GB budgeted (checkpointing what it requires), 12.7 GB host RAM.
    "t4-8gb": dict(resolution=1024, train_batch_size="auto", lora_rank=16, learning_rate=1e-4, mixed_precision="fp16",
                   gradient_checkpointing="auto", optimizer="auto", memory_budget_gb=8.0, host_memory_budget_gb=12.7,
                   checkpointing_steps=200,
                   validation_steps=200, validation_inference_steps=25, max_train_steps=None),
    # 40/80 GB: no checkpointing and batch 2 where they fit (the plan decides), larger rank, bf16 where the GPU has it.
    "a100": dict(resolution=1024, train_batch_size="auto", lora_rank=32, learning_rate=1e-4, mixed_precision="auto",
                 gradient_checkpointing="auto", optimizer="adamw", memory_budget_gb=None, host_memory_budget_gb=None,
                 checkpointing_steps=250,
                 validation_steps=250, validation_inference_steps=30, max_train_steps=None),
    # Tiny random SDXL on CPU: the whole path in seconds (tests, notebooks in CI), the same step on any machine.
    "cpu-smoke": dict(resolution=64, train_batch_size=1, lora_rank=4, learning_rate=1e-3, mixed_precision="no",
                      gradient_checkpointing="none", optimizer="adamw", memory_budget_gb=None, host_memory_budget_gb=None,
                      max_train_steps=20,
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
        train_batch_size: images per micro-batch, or "auto": larger where the plan has room and nothing needs
            checkpointing (the same effective batch with gradient accumulation, else 2), else 1.
        gradient_accumulation_steps: micro-batches per optimizer step.
        max_train_steps: optimizer steps; None: ``steps_per_image`` x images, clamped to
            [min_auto_steps, max_auto_steps].
        learning_rate, lr_scheduler, lr_warmup_steps: diffusers schedule name and warm-up
            (None: 5 % of the steps).
        lora_rank, lora_alpha, lora_dropout, target_modules: the UNet LoRA (alpha None = rank).
        train_text_encoder, text_encoder_lr: also train LoRAs on both text encoders (more memory;
            captions are then encoded every step).
        pivotal_tokens, pivotal_lr, pivotal_freeze_fraction: pivotal tuning: this many new tokens
            (``<s0><s1>``) replace the identifier in every caption and the trigger, and their
            embeddings in both text encoders train (at ``pivotal_lr``) with the UNet LoRA for the
            first ``pivotal_freeze_fraction`` of the steps, then freeze. 0: off. The text encoders
            stay on the GPU (frozen) until then; the embeddings are saved beside the LoRA.
        mixed_precision: "fp16", "bf16", "no" or "auto" (bf16 where supported, else fp16); on CPU
            "no", except "bf16" asked for by name (fast on CPUs with AVX-512 BF16 or AMX). The frozen
            UNet takes this dtype; LoRA weights stay fp32.
        gradient_checkpointing: recompute activations in the backward pass (less memory, slower steps): "auto"
            (the fewest UNet blocks that fit the budget, the most memory-hungry first, as the plan says; none
            without a budget), "all" (or True), "none" (or False), or a number of UNet blocks.
        compile_unet: ``torch.compile`` the UNet (a one-time compile of a minute or more; see
            ``benchmarks/bench_step.py`` for whether it pays off on a machine).
        optimizer: "auto" (8-bit AdamW on CUDA, AdamW elsewhere), "adamw8bit", "adamw".
        unet_8bit: store the frozen UNet in 8 bits (CUDA + bitsandbytes; below 8 GB).
        unet_4bit: store the frozen UNet's Linear layers in 4 bits (bitsandbytes NF4, QLoRA-style;
            about 4 GB at 1024 px). The LoRA learns against a slightly perturbed UNet (NF4 keeps
            ~91 % of each weight's detail on random weights), so likeness may drop a little; the
            saved LoRA is applied to the full-precision UNet at generation.
        host_memory_budget_gb: host RAM the run may use while loading (Colab: 12.7 GB); the
            plan says whether it fits, and training refuses to start with less free.
        trigger: the phrase that calls the person ("TOK person"); None: the dataset's caption
            config, else "TOK person".
        instance_prompt: one prompt for every image (used when there are no captions, or
            when ``use_captions`` is False).
        with_prior_preservation, class_prompt, class_data_dir, num_class_images,
        prior_loss_weight, class_inference_steps: DreamBooth prior preservation; missing class
            images are generated with the base model into ``class_data_dir`` (default run/class_images).
        use_masks, background_weight: weight the loss by the face masks; outside the face
            the weight is ``background_weight`` (1 = no effect).
        min_resize_quality: skip crops whose ``resize_quality`` (share of real detail, recorded
            by prepare; 1.0 when absent) is below this; 0 keeps all.
        weight_by_resize_quality: scale each image's loss by its ``resize_quality``.
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
    train_batch_size: int | str = "auto"
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
    target_modules: tuple[str, ...] = UNET_TARGET_MODULES
    train_text_encoder: bool = False
    text_encoder_lr: float = 5e-5
    pivotal_tokens: int = 0
    pivotal_lr: float = 3e-4
    pivotal_freeze_fraction: float = 0.5
    mixed_precision: str = "fp16"
    gradient_checkpointing: str | int | bool = "auto"
    compile_unet: bool = False
    optimizer: str = "auto"
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-4
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    unet_8bit: bool = False
    unet_4bit: bool = False
    host_memory_budget_gb: float | None = 12.7  # Colab's host RAM (the default preset's)
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
    min_resize_quality: float = 0.0
    weight_by_resize_quality: bool = False
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

        Args:
            name: "t4-8gb", "a100" or "cpu-smoke".
            **overrides: TrainConfig fields.

        Returns:
            The config.

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
        self.gradient_checkpointing = checkpointing_setting(self.gradient_checkpointing)
        if self.unet_8bit and self.unet_4bit:
            raise ValueError("unet_8bit and unet_4bit: choose one (unet_4bit needs less memory)")
        self._check_numbers()
        if not 0.0 <= self.background_weight <= 1.0:
            raise ValueError(f"background_weight must be in [0, 1], not {self.background_weight}")
        if not 0.0 <= self.min_resize_quality <= 1.0:
            raise ValueError(f"min_resize_quality must be in [0, 1] (0 keeps every crop), not {self.min_resize_quality}")

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
        if self.train_batch_size != "auto" and not isinstance(self.train_batch_size, numbers.Integral):
            raise ValueError(f"train_batch_size must be 'auto' or a whole number (e.g. 1), not {self.train_batch_size!r}")
        for name, example in (("lora_rank", 16), ("train_batch_size", 1), ("gradient_accumulation_steps", 1)):
            if getattr(self, name) != "auto" and getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (e.g. {example}), not {getattr(self, name)}")
        if self.lora_alpha is not None and not positive(self.lora_alpha):
            raise ValueError(f"lora_alpha must be above 0 (or None for the rank, {self.lora_rank}), "
                             f"not {self.lora_alpha}")
        if isinstance(self.pivotal_tokens, bool) or not isinstance(self.pivotal_tokens, int) \
                or not 0 <= self.pivotal_tokens <= 8:
            raise ValueError(f"pivotal_tokens must be a whole number from 0 (off) to 8 (e.g. 2), not {self.pivotal_tokens!r}")
        if not (isinstance(self.pivotal_freeze_fraction, (int, float)) and 0 < self.pivotal_freeze_fraction <= 1):
            raise ValueError("pivotal_freeze_fraction must be above 0 and at most 1 (e.g. 0.5: the new tokens train "
                             f"for the first half of the steps), not {self.pivotal_freeze_fraction!r}")
        for name, example in (("learning_rate", "1e-4"), ("text_encoder_lr", "5e-5"), ("pivotal_lr", "3e-4")):
            if not positive(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number above 0 (e.g. {example}), not {getattr(self, name)}")
        if self.resolution <= 0 or self.resolution % 8:
            raise ValueError(f"resolution must be a positive multiple of 8 (SDXL: 1024, 768 or 512), "
                             f"not {self.resolution}")
        for name, hint in (("checkpointing_steps", "0: only at the end"), ("validation_steps", "0: only at the end"),
                           ("lr_warmup_steps", "None: 5 % of the steps"), ("num_class_images", "e.g. 100"),
                           ("noise_offset", "0: off"), ("prior_loss_weight", "e.g. 1.0")):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be 0 or more ({hint}), not {value}")
        for name, example in (("validation_inference_steps", 25), ("class_inference_steps", 25),
                              ("max_nonfinite_in_a_row", 5), ("steps_per_image", 100)):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 (e.g. {example}), not {getattr(self, name)}")
        for name, off in (("max_grad_norm", ""), ("snr_gamma", " (or None for off)"),
                          ("memory_budget_gb", " (or None for no budget)")):
            value = getattr(self, name)
            if value is not None and not positive(value):
                raise ValueError(f"{name} must be a finite number above 0{off}, not {value}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1) (e.g. 0.0), not {self.lora_dropout}")
        # torch generators take seeds in 0..2**64-1; anything else fails only once the models are loaded
        for name, seeds in (("seed", (self.seed,)), ("validation_seeds", self.validation_seeds)):
            for seed in seeds:
                if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:
                    raise ValueError(f"{name} must be whole numbers from 0 to 2**64-1 (e.g. 0), not {seed}")


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
        embedding_path: the new tokens' embeddings (pivotal tuning), or None.
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
    embedding_path: Path | None = None


class TrainingDivergedError(RuntimeError):
    """The loss stayed NaN/inf for several steps in a row."""


class TrainingOutOfMemoryError(RuntimeError):
    """The GPU (or host) ran out of memory; the message says what to change."""


def auto_steps(n_images: int, config: TrainConfig) -> int:
    """Training steps for ``n_images`` photos: ``steps_per_image`` each, clamped to the preset's range.

    Args:
        n_images: photos in the dataset.
        config: its ``max_train_steps``, when set, wins.

    Returns:
        The number of optimizer steps.
    """
    if config.max_train_steps:
        return int(config.max_train_steps)
    return int(min(max(config.steps_per_image * n_images, config.min_auto_steps), config.max_auto_steps))
