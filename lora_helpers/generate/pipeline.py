"""SDXL base model plus a LoRA, ready to generate: loading, checking, scale, fuse.

People bring LoRAs from our own ``run/`` folders, from diffusers scripts and from
kohya/A1111 trainers, and sometimes a file that cannot work: a pickled ``.bin``, a
half-copied download, a LoRA for Stable Diffusion 1.5. diffusers loads a mismatched
LoRA with a warning at best (the names do not match, nothing is applied and the
pictures look like the base model) or a shape error deep inside PEFT at worst, so we
check every LoRA tensor against the modules of *this* pipeline first and say which
file is wrong and what to do.

GPU memory: fp16 weights with the fp16-fix VAE (the original SDXL VAE overflows in
fp16 and gives black images); VAE slicing always; tiling and CPU offload only when the
GPU is short of memory (offload helpers need an accelerator, so never on CPU).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lora_helpers.core.config import resolve_models
from lora_helpers.core.lora_check import check_lora_file
from lora_helpers.core.lora_files import LoraFileError, LoraNotFoundError, quiet_diffusers
from lora_helpers.core.run_folder import LORA_WEIGHT_NAME, find_checkpoints, read_run_config
from lora_helpers.core.fileio import sha256_file
from lora_helpers.core.runtime import default_device, default_dtype

__all__ = [
    "MEMORY_SAVING_MODES",
    "LoraInfo",
    "load_pipeline",
    "describe_pipeline",
    "find_lora_file",
    "choose_base_model",
    "load_lora",
    "unload_lora",
    "fuse_lora",
    "unfuse_lora",
    "activate_lora",
]

MEMORY_SAVING_MODES = ("auto", "none", "slicing", "offload", "sequential")


# --------------------------------------------------------------------------- base model


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
        pipe = _from_pretrained(StableDiffusionXLPipeline, base_model, **kwargs)
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
    """One short paragraph for people: base model, VAE, dtype, device, memory savers, LoRAs."""
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


# --------------------------------------------------------------------------- finding LoRA files


def _run_dir_of(lora_file: Path) -> Path | None:
    """The run folder a LoRA file belongs to (its own folder, or the run above ``checkpoints/``)."""
    folder = lora_file.parent
    if (folder / "config.json").is_file():
        return folder
    if folder.parent.name == "checkpoints" and (folder.parent.parent / "config.json").is_file():
        return folder.parent.parent
    return None


def find_lora_file(source: str | os.PathLike) -> tuple[Path, Path | None]:
    """Resolve a run folder or a LoRA file to ``(lora_file, run_dir_or_None)``.

    A run folder gives its final ``pytorch_lora_weights.safetensors`` (or its only other
    ``.safetensors`` file, e.g. the kohya copy). A file or checkpoint folder inside a run
    finds its run folder, so the trigger phrase in ``config.json`` comes along.

    Raises:
        LoraNotFoundError: the path does not exist, or the folder holds no LoRA.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise LoraNotFoundError(path, "no such file or folder; check the path (in Colab: is Google Drive mounted?)")
    if not path.is_dir():
        return path, _run_dir_of(path)
    others = sorted(path.glob("*.safetensors"))
    if (path / LORA_WEIGHT_NAME).is_file():
        found = path / LORA_WEIGHT_NAME
    elif len(others) == 1:
        found = others[0]
    else:
        checkpoints = find_checkpoints(path)
        if checkpoints:
            step, latest = checkpoints[-1]
            raise LoraNotFoundError(path, f"no final {LORA_WEIGHT_NAME} (training did not finish?); "
                                          f"use the latest checkpoint instead: {latest} (step {step})")
        if others:
            raise LoraNotFoundError(path, f"several .safetensors files and no {LORA_WEIGHT_NAME}: "
                                          f"pass one file ({', '.join(p.name for p in others)})")
        raise LoraNotFoundError(path, f"no LoRA here (expected {LORA_WEIGHT_NAME}); run training first or pass a LoRA file")
    return found, _run_dir_of(found) or path


def choose_base_model(source: str | os.PathLike | None = None, base_model: str | None = None) -> str:
    """The base model to load for a LoRA: ``base_model`` if given, else the run's, else the configured SDXL.

    The run's ``base_model`` is used when it is a folder on this machine or a hub id; a
    folder from another machine (e.g. a Colab path) falls back to the configured SDXL.
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


# --------------------------------------------------------------------------- checking LoRA files


# --------------------------------------------------------------------------- loading and switching


@dataclass
class LoraInfo:
    """A LoRA loaded into a pipeline, with what generation and the cache need to know.

    Attributes:
        path: the LoRA file.
        sha256: hash of the file (part of every cache key).
        adapter_name: the name it is loaded under in the pipeline.
        scale: the strength used when a generation request does not give one.
        format: "diffusers", "kohya" or "other" (the file's layout).
        trigger: the phrase that stands for the person (``{subject}`` in prompts), from the run's config.
        run_dir: the run folder, when the file came from one.
        run_config: the run's ``config.json`` ({} without one).
        rank: LoRA rank (largest, when layers differ).
        targets: component -> number of layers the LoRA changes.
        fused: True while the LoRA is fused into the weights (see :func:`fuse_lora`).
    """

    path: Path
    sha256: str
    adapter_name: str
    scale: float = 1.0
    format: str = "diffusers"
    trigger: str | None = None
    run_dir: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    targets: dict[str, int] = field(default_factory=dict)
    fused: bool = False

    @property
    def name(self) -> str:
        """Short name for labels: the run folder's name for a run's final LoRA, else the file stem."""
        if self.run_dir is not None and self.path.name == LORA_WEIGHT_NAME:
            parent = self.path.parent
            return self.run_dir.name if parent == self.run_dir else f"{self.run_dir.name}/{parent.name}"
        return self.path.stem

    def __str__(self) -> str:
        where = f" from run {self.run_dir}" if self.run_dir else ""
        return (f"LoRA {self.path.name}{where}: {self.format} format, rank {self.rank}, layers {self.targets}, "
                f"trigger {self.trigger!r}, scale {self.scale}{', fused' if self.fused else ''}")


def _adapter_names(pipe) -> set[str]:
    return {a for names in pipe.get_list_adapters().values() for a in names}


def load_lora(
    pipe,
    source: str | os.PathLike,
    *,
    adapter_name: str = "subject",
    scale: float = 1.0,
    trigger: str | None = None,
) -> LoraInfo:
    """Check a LoRA and load it into ``pipe`` as the active adapter.

    Args:
        pipe: from :func:`load_pipeline`.
        source: a run folder (its final LoRA and ``config.json``), a diffusers-format
            ``.safetensors`` file, or a kohya/A1111 ``.safetensors`` file.
        adapter_name: name in the pipeline; loading again under the same name replaces it
            (re-running a notebook cell is safe).
        scale: LoRA strength (0 = base model, 1 = as trained).
        trigger: phrase for ``{subject}``; default: the run config's ``trigger``.

    Returns:
        A :class:`LoraInfo`.

    Raises:
        LoraNotFoundError, LoraFileError: see :func:`check_lora_file`; the pipeline is unchanged.
    """
    path, run_dir = find_lora_file(source)
    checked = check_lora_file(path, pipe)
    run_config = read_run_config(run_dir) if run_dir else {}
    recorded_base = run_config.get("base_model")
    if recorded_base and str(recorded_base) != str(pipe.name_or_path):
        warnings.warn(f"{path.name} was trained on {recorded_base!r} but the pipeline is {pipe.name_or_path!r}; "
                      "faces may not come through if these are different models")
    if adapter_name in _adapter_names(pipe):
        unload_lora(pipe, adapter_name)
    with quiet_diffusers():
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    info = LoraInfo(
        path=path, sha256=sha256_file(path), adapter_name=adapter_name, scale=float(scale), format=checked["format"],
        trigger=trigger or run_config.get("trigger") or checked["metadata"].get("trigger"), run_dir=run_dir,
        run_config=run_config, rank=checked["rank"], targets=checked["targets"],
    )
    activate_lora(pipe, info, info.scale)
    return info


def unload_lora(pipe, lora: LoraInfo | str | None = None) -> None:
    """Remove a LoRA (by info or adapter name; None: every LoRA) from ``pipe``, unfusing first."""
    if getattr(pipe, "fused_loras", None):
        pipe.unfuse_lora()
    pipe._lora_helpers_fused = None
    if lora is None:
        if _adapter_names(pipe):
            with quiet_diffusers():
                pipe.unload_lora_weights()
        return
    name = lora.adapter_name if isinstance(lora, LoraInfo) else lora
    if name in _adapter_names(pipe):
        with quiet_diffusers():
            pipe.delete_adapters(name)
    if isinstance(lora, LoraInfo):
        lora.fused = False


def activate_lora(pipe, lora: LoraInfo | None, scale: float | None = None) -> None:
    """Make ``pipe`` compute with exactly this LoRA at this scale (or with no LoRA).

    Generation calls this before every batch, so switching between base model, LoRA
    strengths and checkpoints never depends on what ran before. A LoRA marked ``fused``
    is re-fused at the requested scale (unfuse, set, fuse), otherwise scales are set on
    the unfused adapter, which is exact: scale 0 gives the base model's pixels.

    Args:
        pipe: the pipeline.
        lora: the LoRA to use, or None for the base model.
        scale: strength; None: ``lora.scale``.
    """
    if lora is not None:
        scale = lora.scale if scale is None else float(scale)
        if lora.adapter_name not in _adapter_names(pipe):
            raise LoraFileError(lora.path, f"adapter {lora.adapter_name!r} is no longer loaded in this pipeline; "
                                           "call load_lora again")
    want = (lora.adapter_name, scale) if lora is not None and lora.fused else None
    have = getattr(pipe, "_lora_helpers_fused", None) if getattr(pipe, "fused_loras", None) else None
    if getattr(pipe, "fused_loras", None) and have != want:
        pipe.unfuse_lora()
        pipe._lora_helpers_fused = have = None
    if lora is None:
        if _adapter_names(pipe):
            pipe.disable_lora()
        return
    if want is not None and have == want:
        return  # already fused at this scale; set_adapters would unmerge the layers again
    pipe.enable_lora()
    pipe.set_adapters([lora.adapter_name], adapter_weights=[scale])
    if want is not None:
        with quiet_diffusers():
            # set_adapters' weight is applied when fusing, so lora_scale stays 1.0
            pipe.fuse_lora(adapter_names=[lora.adapter_name], lora_scale=1.0)
        pipe._lora_helpers_fused = want


def fuse_lora(pipe, lora: LoraInfo, scale: float | None = None) -> None:
    """Fuse ``lora`` into the weights for speed (no extra LoRA matmuls per step).

    Generation at another scale, at the base model or with another LoRA unfuses first,
    so results stay right; each re-fuse costs a pass over the weights. Unfusing
    subtracts the LoRA again, which is exact only up to rounding (fp16: about 1e-3).
    """
    if scale is not None:
        lora.scale = float(scale)
    lora.fused = True
    activate_lora(pipe, lora, lora.scale)


def unfuse_lora(pipe, lora: LoraInfo) -> None:
    """Undo :func:`fuse_lora`; the LoRA stays loaded as a separate adapter."""
    lora.fused = False
    if getattr(pipe, "fused_loras", None):
        pipe.unfuse_lora()
        pipe._lora_helpers_fused = None
    activate_lora(pipe, lora, lora.scale)
