"""The SDXL base pipeline for generation: which base model, loading it, memory savers.

GPU memory: fp16 weights with the fp16-fix VAE (the original SDXL VAE overflows in
fp16 and gives black images); VAE slicing always; tiling and CPU offload only when the
GPU is short of memory (offload helpers need an accelerator, so never on CPU).

LoRAs are loaded into the pipeline by :mod:`lora_helpers.generate.lora`.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from lora_helpers.core.config import resolve_models
from lora_helpers.core.lora_files import LoraFileError, quiet_diffusers
from lora_helpers.core.run_folder import read_run_config
from lora_helpers.core.runtime import default_device, default_dtype
from lora_helpers.generate.lora import find_lora_file

__all__ = [
    "MEMORY_SAVING_MODES",
    "load_pipeline",
    "describe_pipeline",
    "choose_base_model",
]

MEMORY_SAVING_MODES = ("auto", "none", "slicing", "offload", "sequential")


def _as_dtype(dtype: torch.dtype | str | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp16": torch.float16, "float16": torch.float16, "half": torch.float16, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}
    try:
        return names[str(dtype).lower().removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use float16 or float32") from None


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def _from_pretrained(cls, name: str, **kwargs):
    try:
        with quiet_diffusers():
            return cls.from_pretrained(name, **kwargs)
    except (OSError, EnvironmentError) as exc:
        hint = ("it is not a local folder, and the model hub is not reachable (HF_HUB_OFFLINE is set or no internet); "
                "give a folder in diffusers layout, or go online once to download it") if _looks_like_hub_id(name) \
            else "give a folder in diffusers layout (model_index.json, unet/, vae/, ...) or a hub id"
        raise OSError(f"could not load {name!r}: {exc}. {hint}") from exc


def _choose_memory_mode(pipe, device: torch.device) -> str:
    if device.type != "cuda":
        return "slicing"
    free, _ = torch.cuda.mem_get_info(device)
    weights = sum(p.numel() * p.element_size() for m in pipe.components.values() if isinstance(m, torch.nn.Module)
                  for p in m.parameters())
    unet = sum(p.numel() * p.element_size() for p in pipe.unet.parameters())
    # ~3 GB of activations for one 1024 px fp16 image with SDPA (measured figures quoted by diffusers).
    if free > weights * 1.1 + 3e9:
        return "slicing"
    if free > unet * 1.1 + 2.5e9:
        return "offload"
    return "sequential"


def load_pipeline(
    base_model: str | os.PathLike | None = None,
    *,
    vae: str | os.PathLike | None = "auto",
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
    memory_saving: str = "auto",
):
    """Load an SDXL text-to-image pipeline for generation.

    Args:
        base_model: hub id or local folder; None: the configured SDXL (tiny model in smoke mode).
        vae: "auto" uses the fp16-fix VAE when ``dtype`` is fp16 (the original SDXL VAE overflows
            in fp16; without the fix diffusers must decode in fp32, which costs memory and time),
            falling back to the base VAE with a warning when it cannot be loaded; None keeps the
            base model's VAE; or a hub id / folder.
        device: None picks CUDA when present, else CPU.
        dtype: None picks fp16 on CUDA, fp32 on CPU.
        memory_saving: "auto" (decide from free GPU memory), "none", "slicing" (VAE decodes one
            image at a time), "offload" (+ VAE tiling, whole models move to the GPU only while
            they run), "sequential" (+ layer-by-layer offload: least memory, slowest).
            Offload needs a CUDA GPU.

    Returns:
        A ``StableDiffusionXLPipeline`` with its own progress bar switched off
        (:func:`lora_helpers.generate.images.generate_images` shows one per image).
    """
    # diffusers takes seconds to import; only the callers that load a model pay for it.
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    if memory_saving not in MEMORY_SAVING_MODES:
        raise ValueError(f"memory_saving must be one of {MEMORY_SAVING_MODES}, not {memory_saving!r}")
    models = resolve_models()
    base_model = str(base_model or models.sdxl)
    device = torch.device(device) if device is not None else default_device()
    dtype = _as_dtype(dtype) or default_dtype(device)
    auto_vae = vae == "auto"
    if auto_vae:
        vae = models.vae if dtype == torch.float16 else None
    if memory_saving in ("offload", "sequential") and device.type != "cuda":
        raise ValueError(f"memory_saving={memory_saving!r} moves models between CPU and GPU and needs a CUDA GPU; "
                         "on CPU everything already sits in host memory: use 'auto' or 'slicing'")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if vae:
        try:
            kwargs["vae"] = _from_pretrained(AutoencoderKL, str(vae), dtype=dtype)
        except OSError as exc:
            if not auto_vae:
                raise
            # Still correct without it: diffusers decodes with the base VAE upcast to fp32 (more memory, slower).
            warnings.warn(f"fp16-fix VAE not available ({exc}); using the base model's VAE, decoded in float32")
    pipe = None
    if dtype == torch.float16 and _looks_like_hub_id(base_model):
        try:  # the hub's fp16 files are half the download
            pipe = _from_pretrained(StableDiffusionXLPipeline, base_model, variant="fp16", **kwargs)
        except (OSError, ValueError):
            pipe = None
    if pipe is None:
        try:
            pipe = _from_pretrained(StableDiffusionXLPipeline, base_model, **kwargs)
        except OSError as plain_error:
            # a folder holding only the hub's fp16 files (*.fp16.safetensors) loads in any dtype, cast on load
            try:
                pipe = _from_pretrained(StableDiffusionXLPipeline, base_model, variant="fp16", **kwargs)
            except (OSError, ValueError):
                raise plain_error from None
    pipe.set_progress_bar_config(disable=True)

    mode = _choose_memory_mode(pipe, device) if memory_saving == "auto" else memory_saving
    if mode == "offload":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    if mode != "none":
        pipe.vae.enable_slicing()
    if mode in ("offload", "sequential"):
        pipe.vae.enable_tiling()
    pipe._lora_helpers_memory = mode
    return pipe


def describe_pipeline(pipe) -> str:
    """One short paragraph for people: base model, VAE, dtype, device, memory savers, LoRAs.

    Args:
        pipe: from :func:`load_pipeline`.

    Returns:
        Six lines of text.
    """
    adapters = sorted({a for names in pipe.get_list_adapters().values() for a in names}) if hasattr(pipe, "get_list_adapters") else []
    vae_name = pipe.vae.config.get("_name_or_path", "?")
    lines = [
        f"base model:   {pipe.name_or_path}",
        f"VAE:          {vae_name}",
        f"dtype/device: {pipe.unet.dtype} on {pipe._execution_device}",
        f"memory:       {getattr(pipe, '_lora_helpers_memory', 'unknown')}"
        f" (VAE tiling {'on' if getattr(pipe.vae, 'use_tiling', False) else 'off'})",
        f"scheduler:    {type(pipe.scheduler).__name__}",
        f"LoRAs:        {', '.join(adapters) or 'none'}"
        + (f" (fused: {', '.join(sorted(pipe.fused_loras))})" if getattr(pipe, "fused_loras", None) else ""),
    ]
    return "\n".join(lines)


def choose_base_model(source: str | os.PathLike | None = None, base_model: str | None = None) -> str:
    """The base model to load for a LoRA: ``base_model`` if given, else the run's, else the configured SDXL.

    The run's ``base_model`` is used when it is a folder on this machine or a hub id; a
    folder from another machine (e.g. a Colab path) falls back to the configured SDXL.

    Args:
        source: a run folder or LoRA file (see :func:`lora_helpers.generate.lora.find_lora_file`), or None.
        base_model: an explicit hub id or folder, which wins.

    Returns:
        A hub id or folder for :func:`load_pipeline`.
    """
    if base_model:
        return str(base_model)
    if source is not None:
        try:
            _, run_dir = find_lora_file(source)
        except LoraFileError:
            run_dir = None
        recorded = str(read_run_config(run_dir).get("base_model") or "") if run_dir else ""
        if recorded and (Path(recorded).exists() or _looks_like_hub_id(recorded)):
            return recorded
    return resolve_models().sdxl
