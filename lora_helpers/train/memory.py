"""GPU memory planner: how much a training run will need, before anything is loaded.

The 8 GB recipe only works when every part of the budget is known: the frozen UNet in
fp16 (~4.8 GiB for SDXL), the LoRA weights, gradients and optimizer state (small, fp32),
and the activations kept for the backward pass (set by resolution, batch and gradient
checkpointing, decided per UNet block: :mod:`lora_helpers.train.block_memory`).
:func:`estimate_peak_memory` adds these up from the model's *config*
(the UNet is built on the ``meta`` device: no weights, no memory) and
:func:`check_budget` refuses a plan over budget, naming the settings that would fit.

Units: "GB" here is GiB (2**30 bytes), the unit ``torch.cuda.max_memory_allocated`` and
nvidia-smi report.

How the activation figures were obtained: activations grow with the sum, over the UNet's
levels, of (latent pixels at that level) x (channels) x (resnets + transformer layers).
The bytes per element of that sum are the coefficients below, measured from real
allocations of one training step of the full-size SDXL UNet on CPU
(``benchmarks/bench_activations.py``); a trace with fake tensors
(:func:`lora_helpers.train.memory_trace.trace_training_memory`) gives the same shape for any
config without allocating. On a GPU, cuDNN/cuBLAS workspaces, autocast copies and allocator rounding come on
top; :data:`CUDA_ACTIVATION_FACTOR` and :data:`CUDA_OVERHEAD_GB` cover them and are to be
checked against ``benchmarks/bench_train.py`` on a real GPU.

diffusers is imported inside the functions that build a UNet or VAE on the ``meta`` device:
it costs seconds to import, and a plan for a known config needs none of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from lora_helpers.core.lora_files import UNET_TARGET_MODULES
from lora_helpers.core.runtime import available_host_memory_gb
from lora_helpers.train.block_memory import checkpointing_label, checkpointing_setting, unchecked_share
from lora_helpers.train.model_size import count_unet_parameters, text_encoder_parameters, unet_config_for, vae_parameters

__all__ = [
    "GB",
    "MemoryPlan",
    "MemoryBudgetError",
    "estimate_peak_memory",
    "check_budget",
    "check_host_memory",
    "HostMemoryError",
]

GB = 2**30
# Saved activations per (level pixels x channels x units) element, in elements of the
# activation dtype: with checkpointing the block inputs + one block recomputed, without it
# every intermediate of every block. Measured by benchmarks/bench_activations.py on
# 2026-11-30 (full-size SDXL UNet, bf16 on CPU, LoRA rank 16, batch 1, 1024 px, CPU allocator
# records from torch.profiler, LoRA gradients taken out): 0.465 GiB checkpointed (was traced
# as 1.6), 6.06 GiB without (was 21.5); a no-grad forward at batch 2 (classifier-free
# guidance) held 0.308 GiB, 0.33 of a checkpointed step (was 0.37).
# Figures: benchmarks/activations_measured.json.
ACTIVATION_ELEMENTS_CHECKPOINTED = 1.63
ACTIVATION_ELEMENTS_FULL = 21.2
INFERENCE_FRACTION = 0.33
CUDA_ACTIVATION_FACTOR = 1.5  # fp32 GroupNorm outputs under autocast, workspaces in backward
CUDA_OVERHEAD_GB = 0.5  # cuBLAS/cuDNN workspaces, allocator rounding and fragmentation
HOST_BASELINE_GB = 1.5  # Python, torch, CUDA runtime in host RAM
_PIVOTAL_TEXT_ACTIVATIONS_GB = (20_040_729 + 63_493_369) / 2**30  # per caption, bf16 (see estimate_peak_memory)


class HostMemoryError(RuntimeError):
    """Not enough free host RAM to load the models; the message says what to do."""


class MemoryBudgetError(RuntimeError):
    """A training plan that does not fit the memory budget; the message says what to change."""

    def __init__(self, message: str, plan: "MemoryPlan"):
        super().__init__(message)
        self.plan = plan


@dataclass
class MemoryPlan:
    """Estimated peak GPU memory of a training run, item by item (GiB).

    Attributes:
        items: name -> GiB for the training step's peak.
        train_peak_gb: sum of ``items``.
        validation_peak_gb: peak while making validation images.
        host_peak_gb: host RAM while loading (one big model at a time).
        budget_gb: the budget it is checked against (None: none).
        inputs: the arguments of :func:`estimate_peak_memory` that made it.
        notes: assumptions worth knowing.
        lora_parameters: trainable LoRA parameters (what a checkpoint's size follows from).
        choices: what the plan decided for the step (checkpointed blocks, micro-batch), in words.
        step_settings: the ``TrainConfig`` values it decided (``gradient_checkpointing``, ``train_batch_size``,
            ``gradient_accumulation_steps``); empty for a plan made by :func:`estimate_peak_memory` alone.
    """

    items: dict[str, float]
    train_peak_gb: float
    validation_peak_gb: float
    host_peak_gb: float
    budget_gb: float | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    target: str = ""
    host_budget_gb: float | None = None
    lora_parameters: int = 0
    choices: list[str] = field(default_factory=list)
    step_settings: dict[str, Any] = field(default_factory=dict)

    @property
    def peak_gb(self) -> float:
        """The larger of the training and validation peaks."""
        return max(self.train_peak_gb, self.validation_peak_gb)

    @property
    def fits(self) -> bool:
        """True without a budget, or when the peak is within it."""
        return self.budget_gb is None or self.peak_gb <= self.budget_gb

    def to_dict(self) -> dict[str, Any]:
        """Rounded figures for ``config.json`` (the UNet config itself left out)."""
        return {"peak_gb": round(self.peak_gb, 3), "train_peak_gb": round(self.train_peak_gb, 3),
                "validation_peak_gb": round(self.validation_peak_gb, 3), "host_peak_gb": round(self.host_peak_gb, 3),
                "budget_gb": self.budget_gb, "target": self.target, "host_budget_gb": self.host_budget_gb,
                "items": {k: round(v, 4) for k, v in self.items.items()},
                "inputs": {k: v for k, v in self.inputs.items() if k != "unet_config"}, "notes": self.notes,
                "choices": self.choices, "step_settings": self.step_settings}

    def __str__(self) -> str:
        width = max(len(k) for k in self.items) + 2
        lines = [f"  {k:<{width}}{v:6.2f} GB" for k, v in self.items.items()]
        lines.append(f"  {'training step peak':<{width}}{self.train_peak_gb:6.2f} GB")
        lines.append(f"  {'validation images peak':<{width}}{self.validation_peak_gb:6.2f} GB")
        budget = "no budget" if self.budget_gb is None else f"budget {self.budget_gb:.2f} GB"
        verdict = "fits" if self.fits else "DOES NOT FIT"
        lines.append(f"  => estimated peak {self.peak_gb:.2f} GB, {budget}: {verdict}")
        host = f"  host RAM while loading: about {self.host_peak_gb:.1f} GB"
        if self.host_budget_gb:
            host += f" of {self.host_budget_gb:g} GB: {'fits' if self.host_peak_gb <= self.host_budget_gb else 'DOES NOT FIT'}"
        lines.append(host)
        lines += [f"  {choice}" for choice in self.choices]
        head = f"memory plan for {self.target} (GPU, GiB):" if self.target else "memory plan (GPU, GiB):"
        return head + "\n" + "\n".join(lines)


def _activation_elements(unet_config: dict, latent_h: int, latent_w: int) -> float:
    """Sum over levels of (pixels at level) x channels x (resnets + transformer layers)."""
    channels = list(unet_config["block_out_channels"])
    per_block = int(unet_config.get("layers_per_block", 2))
    tlayers = unet_config.get("transformer_layers_per_block", 1)
    tlayers = list(tlayers) if isinstance(tlayers, (list, tuple)) else [tlayers] * len(channels)
    down_types = list(unet_config.get("down_block_types", ["CrossAttnDownBlock2D"] * len(channels)))
    pixels = latent_h * latent_w
    total = 0.0
    for level, ch in enumerate(channels):
        units = per_block + per_block + 1  # resnets on the way down and up (+1 for the skip concat)
        if "CrossAttn" in down_types[level]:
            units += (2 * per_block + 1) * int(tlayers[level])
        if level == len(channels) - 1:  # the mid block
            units += 2 + int(tlayers[level])
        total += pixels / 4**level * ch * units
    return total


def inference_activations_gb(unet_config: dict, resolution: int, abytes: int = 2) -> float:
    """GiB a forward pass without grad holds (batch 2: classifier-free guidance): the skip
    connections and one block's intermediates, :data:`INFERENCE_FRACTION` of a checkpointed step's."""
    latent = resolution // 8
    return INFERENCE_FRACTION * ACTIVATION_ELEMENTS_CHECKPOINTED * abytes * 2 * _activation_elements(
        unet_config, latent, latent) / GB


def estimate_peak_memory(*, unet_config: dict | None = None, model: str | None = None, resolution: int = 1024,
                         batch_size: int = 1, lora_rank: int = 16,
                         target_modules: tuple[str, ...] = UNET_TARGET_MODULES,
                         weight_dtype: str = "fp16", unet_8bit: bool = False, unet_4bit: bool = False,
                         gradient_checkpointing: bool | str | int = True,
                         optimizer: str = "adamw8bit", train_text_encoder: bool = False,
                         text_encoder_rank: int | None = None, pivotal_tokens: int = 0,
                         prior_preservation: bool = False,
                         device_type: str = "cuda", budget_gb: float | None = None) -> MemoryPlan:
    """Estimate the peak GPU memory of a LoRA training run without loading any weights.

    Args:
        unet_config: the UNet config dict; or ``model`` to read it from.
        model: hub id or folder of the SDXL model.
        resolution: training side in pixels (aspect buckets have about the same area).
        batch_size: images per step (gradient accumulation does not add memory).
        lora_rank: LoRA rank.
        target_modules: the UNet layers that get LoRA weights.
        weight_dtype: "fp16"/"bf16" (2 bytes) or "fp32" (4 bytes) for the frozen UNet.
        unet_8bit: the frozen UNet's Linear layers stored in 8 bits (bitsandbytes).
        unet_4bit: the frozen UNet's Linear layers stored in 4 bits (bitsandbytes NF4 with
            double quantization, QLoRA-style); the LoRA and its optimizer stay in full precision.
        gradient_checkpointing: recompute block activations in the backward pass: "all" (or True),
            "none" (or False), or the number of UNet blocks checkpointed, the most memory-hungry first
            (:func:`checkpointed_blocks`).
        optimizer: "adamw8bit" (2 bytes of state per LoRA parameter) or "adamw" (8 bytes).
        train_text_encoder: both text encoders stay on the GPU with their own LoRA.
        text_encoder_rank: their LoRA rank (default ``lora_rank``).
        pivotal_tokens: new tokens trained in both (frozen) text encoders: the encoders stay on the
            GPU, and their activations are kept for the backward pass, until the tokens freeze.
        prior_preservation: a class image per step (a second forward/backward, not a larger batch).
        device_type: "cuda" adds workspaces and allocator slack; "cpu" does not.
        budget_gb: recorded in the plan for :func:`check_budget`.

    Returns:
        A :class:`MemoryPlan`.
    """
    gradient_checkpointing = checkpointing_setting(gradient_checkpointing)  # True/False: "all"/"none"
    inputs = dict(locals())
    if unet_config is None:
        if model is None:
            raise ValueError("pass unet_config or model")
        unet_config = unet_config_for(model)
    wbytes = 4 if weight_dtype == "fp32" else 2
    counts = count_unet_parameters(unet_config, target_modules=target_modules, rank=lora_rank)
    n_lora = counts["lora"]
    items: dict[str, float] = {}
    if unet_4bit:
        # NF4: half a byte per weight plus one fp32 absmax per 64 weights, itself quantized to
        # 8 bits per 256 blocks (double quantization): 0.5 + 1/64 + 4/(64*256) bytes per weight.
        unet_bytes = counts["linear"] * (0.5 + 1 / 64 + 4 / (64 * 256)) + (counts["total"] - counts["linear"]) * wbytes
        items["UNet weights (Linear in 4 bits NF4, rest fp16)"] = unet_bytes / GB
    elif unet_8bit:
        # bitsandbytes quantizes the Linear layers; convolutions and norms stay in 16 bits
        unet_bytes = counts["linear"] * 1 + (counts["total"] - counts["linear"]) * wbytes
        items["UNet weights (Linear in 8 bits, rest fp16)"] = unet_bytes / GB
    else:
        items[f"UNet weights ({weight_dtype}, frozen)"] = counts["total"] * wbytes / GB
    state_bytes = 2 if optimizer == "adamw8bit" else 8
    if train_text_encoder:
        te_rank = text_encoder_rank or lora_rank
        # q, k, v, out projections of every layer: 4 * 2 * hidden * rank per layer (768 x 12 and 1280 x 32)
        n_te_lora = te_rank * 8 * (768 * 12 + 1280 * 32)
        items[f"text encoders ({weight_dtype}, frozen)"] = text_encoder_parameters(model) * wbytes / GB
        n_lora += n_te_lora
    elif pivotal_tokens:
        # (not counted in the validation peak: the encoders leave the GPU while images are made)
        items[f"new tokens: text encoders ({weight_dtype}, frozen, until the tokens freeze)"] = \
            text_encoder_parameters(model) * wbytes / GB
        # saved for the backward pass to the new rows: 20 MB (CLIP-L) + 63 MB (CLIP-G) per caption in
        # 2-byte precision, measured with saved-tensor hooks on the full-size encoders
        items["new tokens: text-encoder activations"] = _PIVOTAL_TEXT_ACTIVATIONS_GB * batch_size * (wbytes / 2)
        n_lora += pivotal_tokens * (768 + 1280)
    items["LoRA weights + gradients (fp32)"] = n_lora * 8 / GB
    items[f"optimizer state ({optimizer})"] = n_lora * state_bytes / GB
    if wbytes == 2:
        items["autocast copies of LoRA weights"] = n_lora * 2 / GB
    latent = resolution // 8
    abytes = 4 if weight_dtype == "fp32" else 2
    activations = _step_activations(unet_config, latent, abytes * batch_size, gradient_checkpointing, target_modules)
    if device_type == "cuda":
        activations *= CUDA_ACTIVATION_FACTOR
    label = checkpointing_label(unet_config, gradient_checkpointing, target_modules)
    items[f"activations (batch {batch_size}, {resolution} px, checkpointing {label})"] = activations / GB
    cond = batch_size * (77 * unet_config.get("cross_attention_dim", 2048) * 2 + 4 * latent * latent * 4 * 3)
    items["batch tensors (latents, noise, embeddings)"] = cond * (2 if prior_preservation else 1) / GB
    if device_type == "cuda":
        items["CUDA workspaces, allocator slack"] = CUDA_OVERHEAD_GB
    train_peak = sum(items.values())

    # Validation: no activations kept, gradients freed; the VAE decodes in 512-px tiles.
    persistent = sum(v for k, v in items.items() if k.startswith(("UNet", "text encoders", "optimizer")))
    persistent += n_lora * 4 / GB
    vae_weights = vae_parameters(model) * wbytes / GB
    decode = 0.75 * (min(resolution, 512) / 512) ** 2 * (abytes / 2)
    inference = inference_activations_gb(unet_config, resolution, abytes)
    validation_peak = persistent + vae_weights + decode + inference + (CUDA_OVERHEAD_GB if device_type == "cuda" else 0)

    biggest = counts["total"] * wbytes / GB
    if train_text_encoder or pivotal_tokens:
        biggest += text_encoder_parameters(model) * wbytes / GB
    host_peak = biggest + HOST_BASELINE_GB
    notes = ["activation figures are measured on CPU in bf16 (benchmarks/bench_activations.py); the CUDA factor and "
             "overhead are assumptions until measured on a GPU (benchmarks/gpu_check.py)"]
    if prior_preservation:
        notes.append("prior preservation runs the class image as its own forward/backward pass: no extra activations")
    return MemoryPlan(items=items, train_peak_gb=train_peak, validation_peak_gb=validation_peak,
                      host_peak_gb=host_peak, budget_gb=budget_gb, inputs=inputs, notes=notes, lora_parameters=n_lora)


def _step_activations(unet_config: dict, latent: int, scale: int, setting: str | int,
                      target_modules: tuple[str, ...]) -> float:
    """Bytes of a training step's activations: the measured checkpointed figure, plus each block left
    un-checkpointed's share (:func:`block_activation_weights`) of what checkpointing saves."""
    elements = scale * _activation_elements(unet_config, latent, latent)
    full, checkpointed = ACTIVATION_ELEMENTS_FULL * elements, ACTIVATION_ELEMENTS_CHECKPOINTED * elements
    left = unchecked_share(unet_config, setting, target_modules)
    return full if left == 1.0 else checkpointed + (full - checkpointed) * left


_ALTERNATIVES: list[tuple[str, dict, str]] = [
    ("gradient_checkpointing", {"gradient_checkpointing": "all"},
     "turn on gradient checkpointing for every UNet block (gradient_checkpointing='all')"),
    ("optimizer", {"optimizer": "adamw8bit"}, "use 8-bit AdamW (optimizer='adamw8bit', needs CUDA + bitsandbytes)"),
    ("batch_size", {"batch_size": 1}, "batch 1 (keep the effective batch with gradient_accumulation_steps)"),
    ("train_text_encoder", {"train_text_encoder": False}, "train the UNet only (train_text_encoder=False)"),
    ("pivotal_tokens", {"pivotal_tokens": 0}, "train without new tokens (pivotal_tokens=0)"),
    ("weight_dtype", {"weight_dtype": "fp16"}, "keep the frozen UNet in fp16 (mixed_precision='fp16')"),
    ("lora_rank", {"lora_rank": 8}, "a smaller LoRA (lora_rank=8)"),
    ("unet_8bit", {"unet_8bit": True}, "store the frozen UNet in 8 bits (unet_8bit=True)"),
    ("resolution", {"resolution": 768}, "train at 768 px (resolution=768)"),
    ("resolution", {"resolution": 512}, "train at 512 px (resolution=512)"),
]


def check_budget(plan: MemoryPlan, budget_gb: float | None = None) -> MemoryPlan:
    """Refuse a plan over budget, naming the settings that would make it fit.

    Args:
        plan: from :func:`estimate_peak_memory`.
        budget_gb: GiB allowed (default: ``plan.budget_gb``); None accepts any plan.

    Returns:
        The plan (with the budget recorded) when it fits.

    Raises:
        MemoryBudgetError: with the estimate, the biggest items, and each single change
            (or the cheapest combination) that brings the estimate under budget.
    """
    budget = plan.budget_gb if budget_gb is None else budget_gb
    plan = replace(plan, budget_gb=budget)
    if plan.fits:
        return plan
    inputs = {k: v for k, v in plan.inputs.items() if k != "budget_gb"}

    def applies(change: dict, current: dict) -> bool:
        if "resolution" in change:
            return current.get("resolution", 0) > change["resolution"]
        return any(current.get(k) != v for k, v in change.items())

    fixes = []
    for _, change, text in _ALTERNATIVES:
        if applies(change, inputs):
            trial = estimate_peak_memory(**{**inputs, **change})
            if trial.peak_gb <= budget:
                fixes.append(f"  - {text}: about {trial.peak_gb:.2f} GB")
    combined, combo, combined_gb = dict(inputs), [], plan.peak_gb
    if not fixes:  # no single change is enough: add changes in order until it fits
        for _, change, text in _ALTERNATIVES:
            if applies(change, combined):
                combined.update(change)
                combo.append(text)
                combined_gb = estimate_peak_memory(**combined).peak_gb
                if combined_gb <= budget:
                    break
    biggest = sorted(plan.items.items(), key=lambda kv: -kv[1])[:3]
    lines = [f"training needs about {plan.peak_gb:.2f} GB of GPU memory, over the {budget:.2f} GB budget.",
             "largest items: " + ", ".join(f"{k} {v:.2f} GB" for k, v in biggest) + "."]
    if fixes:
        lines.append("each of these would fit:")
        lines += fixes
    elif combo and combined_gb <= budget:
        lines.append(f"together these would fit (about {combined_gb:.2f} GB): " + "; ".join(combo))
    else:
        lines.append("nothing in reach fits: raise the budget (memory_budget_gb) or use a GPU with more memory")
    raise MemoryBudgetError("\n".join(lines), plan)


def check_host_memory(plan: MemoryPlan, *, available_gb: float | None = None) -> None:
    """Refuse to start loading when the plan needs more host RAM than is free.

    Colab kills the whole session (no message, nothing saved) when host RAM runs out while
    a model loads, so this runs before any model is read.

    Args:
        plan: the memory plan (its ``host_peak_gb``).
        available_gb: free host RAM; None reads it now.

    Raises:
        HostMemoryError: with the figures and what to do.
    """
    available = available_host_memory_gb() if available_gb is None else available_gb
    if available is None or plan.host_peak_gb <= available:
        return
    raise HostMemoryError(
        f"loading the models needs about {plan.host_peak_gb:.1f} GB of host RAM and only {available:.1f} GB is free: "
        "close other notebooks and programs (in Colab: Runtime > Restart session frees what earlier cells hold), "
        "then run again; or use a runtime with more RAM")
