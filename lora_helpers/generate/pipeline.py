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

import contextlib
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from lora_helpers.core.config import resolve_models
from lora_helpers.core.fileio import sha256_file
from lora_helpers.core.runtime import default_device, default_dtype

__all__ = [
    "LORA_FILE_NAME",
    "MEMORY_SAVING_MODES",
    "LoraInfo",
    "LoraLoadError",
    "LoraNotFoundError",
    "load_pipeline",
    "describe_pipeline",
    "read_run_config",
    "find_lora_file",
    "find_checkpoints",
    "choose_base_model",
    "check_lora_file",
    "load_lora",
    "unload_lora",
    "set_lora_scale",
    "fuse_lora",
    "unfuse_lora",
    "activate_lora",
    "make_random_lora",
]

LORA_FILE_NAME = "pytorch_lora_weights.safetensors"
MEMORY_SAVING_MODES = ("auto", "none", "slicing", "offload", "sequential")
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
_LORA_MARKERS = ("lora", "alpha", "dora_scale")
# Cross-attention width of each family: the tell-tale of which base model a LoRA was made for.
_FAMILY_BY_CONTEXT_DIM = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL"}


class LoraLoadError(ValueError):
    """A LoRA file we cannot use; the message names the file, the reason and what to do."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class LoraNotFoundError(LoraLoadError, FileNotFoundError):
    """The LoRA file or run folder does not exist (or holds no LoRA)."""


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


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' info chatter and its harmless 'no LoRA keys for the text encoder' warnings."""
    from diffusers.utils import logging as dlogging
    from transformers.utils import logging as tlogging

    level, tlevel = dlogging.get_verbosity(), tlogging.get_verbosity()
    dlogging.set_verbosity(logging.ERROR)
    tlogging.set_verbosity(logging.ERROR)  # transformers' "LOAD REPORT" when LoRA layers go into the text encoders
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*No LoRA keys associated.*")
            warnings.filterwarnings("ignore", message=".*torchvision.*")
            warnings.filterwarnings("ignore", message=".*Already found a `peft_config`.*")
            warnings.filterwarnings("ignore", message=".*was active which is now deleted.*")
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            yield
    finally:
        dlogging.set_verbosity(level)
        tlogging.set_verbosity(tlevel)


def _looks_like_hub_id(name: str) -> bool:
    return bool(re.fullmatch(r"[\w.-]+/[\w.-]+", name)) and not Path(name).exists()


def _from_pretrained(cls, name: str, **kwargs):
    try:
        with _quiet_diffusers():
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


def read_run_config(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Read ``run_dir/config.json`` (trigger, base_model, resolution); {} when absent.

    Raises:
        LoraLoadError: when the file exists but is not a JSON object.
    """
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LoraLoadError(path, f"not valid JSON ({exc}); fix it or delete it (it holds the trigger phrase)") from None
    if not isinstance(data, dict):
        raise LoraLoadError(path, "expected a JSON object with 'trigger', 'base_model', 'resolution'")
    return data


def find_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """List ``(step, LoRA file)`` for every ``checkpoints/checkpoint-<step>/`` that holds a LoRA, by step."""
    found = []
    for folder in (Path(run_dir) / "checkpoints").glob("checkpoint-*"):
        match = re.fullmatch(r"checkpoint-(\d+)", folder.name)
        if match and (folder / LORA_FILE_NAME).is_file():
            found.append((int(match.group(1)), folder / LORA_FILE_NAME))
    return sorted(found)


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
    if (path / LORA_FILE_NAME).is_file():
        found = path / LORA_FILE_NAME
    elif len(others) == 1:
        found = others[0]
    else:
        checkpoints = find_checkpoints(path)
        if checkpoints:
            step, latest = checkpoints[-1]
            raise LoraNotFoundError(path, f"no final {LORA_FILE_NAME} (training did not finish?); "
                                          f"use the latest checkpoint instead: {latest} (step {step})")
        if others:
            raise LoraNotFoundError(path, f"several .safetensors files and no {LORA_FILE_NAME}: "
                                          f"pass one file ({', '.join(p.name for p in others)})")
        raise LoraNotFoundError(path, f"no LoRA here (expected {LORA_FILE_NAME}); run training first or pass a LoRA file")
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
        except LoraLoadError:
            run_dir = None
        recorded = str(read_run_config(run_dir).get("base_model") or "") if run_dir else ""
        if recorded and (Path(recorded).exists() or _looks_like_hub_id(recorded)):
            return recorded
    return resolve_models().sdxl


# --------------------------------------------------------------------------- checking LoRA files


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    if path.stat().st_size == 0:
        raise LoraLoadError(path, "empty file (0 bytes); copy or download it again")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise LoraLoadError(path, "this is a pickled PyTorch file renamed to .safetensors; we only load real "
                                  "safetensors files (pickles can run code when loaded). Convert it where you trust it")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise LoraLoadError(path, f"cannot read it as safetensors ({exc}); the file is damaged or incomplete "
                                  "(an interrupted download or copy?): copy it again or re-run training") from None
    return tensors, metadata


def _describe_family(context_dim: int | None, raw_keys: list[str], metadata: dict[str, str]) -> str | None:
    version = metadata.get("ss_base_model_version") or metadata.get("modelspec.architecture") or ""
    if version:
        v = version.lower()
        if "sdxl" in v or "xl" in v:
            return f"SDXL ({version})"
        if "v1" in v or "sd1" in v or "v1-5" in v:
            return f"Stable Diffusion 1.x ({version})"
        if "v2" in v or "sd2" in v:
            return f"Stable Diffusion 2.x ({version})"
        return version
    if context_dim in _FAMILY_BY_CONTEXT_DIM:
        return f"{_FAMILY_BY_CONTEXT_DIM[context_dim]} (cross-attention width {context_dim})"
    if any(k.startswith("lora_te_") for k in raw_keys):
        return "Stable Diffusion 1.x or 2.x (one text encoder)"
    if any(k.startswith(("transformer.", "lora_transformer_", "double_blocks", "diffusion_model.")) for k in raw_keys):
        return "a transformer model such as Flux or SD3"
    return None


def _to_peft_keys(component: str, part: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    if component == "unet":
        return convert_unet_state_dict_to_peft(part)
    peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
    if not hasattr(model, "text_model"):
        peft = {k.removeprefix("text_model."): v for k, v in peft.items()}
    return peft


def check_lora_file(path: str | os.PathLike, pipe) -> dict[str, Any]:
    """Check that a LoRA file can be loaded into ``pipe`` and would change it.

    Every LoRA tensor must name a module of the pipeline's UNet or text encoders, with
    matching input/output sizes. This catches LoRAs for other base models (SD 1.5 keys,
    SD 2.x widths, a real-SDXL LoRA on a small test model) before diffusers silently
    ignores them.

    Args:
        path: a ``.safetensors`` LoRA (diffusers, PEFT or kohya/A1111 layout).
        pipe: the loaded SDXL pipeline.

    Returns:
        ``{"format", "num_tensors", "targets" (component -> module count), "rank", "metadata"}``.

    Raises:
        LoraNotFoundError: missing file.
        LoraLoadError: pickled file, damaged file, not a LoRA, or a LoRA for another model.
    """
    path = Path(path)
    if not path.exists():
        raise LoraNotFoundError(path, "no such file; check the path")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise LoraLoadError(path, f"{path.suffix} files are Python pickles, which can run arbitrary code when "
                                  "loaded; we only load .safetensors. Convert it on a machine you trust: "
                                  "`from safetensors.torch import save_file; import torch; "
                                  f"save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')`")
    if path.suffix.lower() != ".safetensors":
        raise LoraLoadError(path, "expected a .safetensors LoRA file")
    raw, metadata = _read_safetensors(path)
    if not raw:
        raise LoraLoadError(path, "the file holds no tensors; copy it again or re-run training")
    raw_keys = list(raw)
    if not any(marker in k.lower() for k in raw_keys for marker in _LORA_MARKERS):
        raise LoraLoadError(path, f"not a LoRA: none of its {len(raw)} tensors is a LoRA weight (e.g. {raw_keys[0]!r}); "
                                  "this looks like a full model checkpoint. Load it as the base model instead")
    fmt = "kohya" if any(k.startswith(("lora_unet_", "lora_te")) for k in raw_keys) else \
        "diffusers" if any(k.startswith(("unet.", "text_encoder")) for k in raw_keys) else "other"

    try:
        with _quiet_diffusers():
            converted, _alphas = pipe.lora_state_dict({k: v for k, v in raw.items()}, unet_config=pipe.unet.config)
    except Exception as exc:  # noqa: BLE001 - the converters raise assorted errors on foreign layouts
        family = _describe_family(None, raw_keys, metadata)
        raise LoraLoadError(path, f"not a LoRA layout we can read ({exc})"
                                  + (f"; it looks made for {family}" if family else "")) from None

    components = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    problems: list[str] = []
    targets: dict[str, int] = {}
    unknown = [k for k in converted if not any(k.startswith(c + ".") for c in components)]
    context_dim = None
    ranks: set[int] = set()
    for name, model in components.items():
        part = {k.removeprefix(name + "."): v for k, v in converted.items() if k.startswith(name + ".")}
        if not part or model is None:
            continue
        modules = dict(model.named_modules())
        try:
            peft = _to_peft_keys(name, part, model)
        except Exception as exc:  # noqa: BLE001 - diffusers' converters raise on layouts they do not know
            problems.append(f"{name}: tensor names in a layout that cannot be mapped onto this model ({exc})")
            continue
        hit = set()
        for key, tensor in peft.items():
            match = re.match(r"(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight$", key)
            if not match:
                if "lora_magnitude_vector" in key or key.endswith(".alpha"):
                    continue
                problems.append(f"{name}.{key}: not a LoRA weight name")
                continue
            module_name, which = match.groups()
            module = modules.get(module_name)
            if module is None:
                problems.append(f"{name}.{module_name}: no such layer in this model")
                continue
            if hasattr(module, "get_base_layer"):  # already wrapped by another adapter
                module = module.get_base_layer()
            n_in = getattr(module, "in_features", getattr(module, "in_channels", None))
            n_out = getattr(module, "out_features", getattr(module, "out_channels", None))
            if which == "lora_A":
                ranks.add(int(tensor.shape[0]))
                got, want, what = int(tensor.shape[1]), n_in, "input"
                if name == "unet" and module_name.endswith("attn2.to_k"):
                    context_dim = got
            else:
                got, want, what = int(tensor.shape[0]), n_out, "output"
            if want is not None and got != want:
                problems.append(f"{name}.{module_name}: LoRA {what} width {got}, the layer has {want}")
                continue
            hit.add(module_name)
        if hit:
            targets[name] = len(hit)

    if unknown and not targets:
        problems.extend(f"{k}: not a key of an SDXL UNet or text encoder" for k in unknown[:3])
    if problems or not targets:
        family = _describe_family(context_dim, raw_keys, metadata)
        ours = pipe.unet.config.cross_attention_dim
        here = _FAMILY_BY_CONTEXT_DIM.get(ours, "a test-size SDXL")
        examples = "; ".join(problems[:3]) if problems else "no tensor targets this model"
        made_for = f"it looks made for {family}, " if family else ""
        raise LoraLoadError(
            path,
            f"this LoRA does not fit the base model {pipe.name_or_path!r} ({here}, cross-attention width {ours}): "
            f"{made_for}{len(problems)} of its tensors do not match ({examples}). "
            "Use a LoRA trained for this base model, or load the base model it was trained on.",
        )
    return {"format": fmt, "num_tensors": len(raw), "targets": targets,
            "rank": max(ranks) if ranks else None, "metadata": metadata}


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
        if self.run_dir is not None and self.path.name == LORA_FILE_NAME:
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
        LoraNotFoundError, LoraLoadError: see :func:`check_lora_file`; the pipeline is unchanged.
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
    with _quiet_diffusers():
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
            with _quiet_diffusers():
                pipe.unload_lora_weights()
        return
    name = lora.adapter_name if isinstance(lora, LoraInfo) else lora
    if name in _adapter_names(pipe):
        with _quiet_diffusers():
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
            raise LoraLoadError(lora.path, f"adapter {lora.adapter_name!r} is no longer loaded in this pipeline; "
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
        with _quiet_diffusers():
            # set_adapters' weight is applied when fusing, so lora_scale stays 1.0
            pipe.fuse_lora(adapter_names=[lora.adapter_name], lora_scale=1.0)
        pipe._lora_helpers_fused = want


def set_lora_scale(pipe, lora: LoraInfo, scale: float) -> None:
    """Set the default strength of ``lora`` and apply it (0 = base model, 1 = as trained, up to ~1.5)."""
    lora.scale = float(scale)
    activate_lora(pipe, lora, lora.scale)


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


# --------------------------------------------------------------------------- random LoRA (smoke runs)


def make_random_lora(
    run_dir: str | os.PathLike,
    base_model: str | os.PathLike,
    *,
    rank: int = 4,
    seed: int = 0,
    trigger: str = "TOK person",
    checkpoint_steps: tuple[int, ...] = (),
    text_encoders: bool = False,
    resolution: int | None = None,
) -> Path:
    """Write an untrained run folder: a random (non-zero) LoRA in diffusers and kohya layout.

    For smoke runs, demos and tests where no trained LoRA exists; the pictures change
    with the LoRA but show nobody in particular. The folder follows the training
    stage's contract: ``pytorch_lora_weights.safetensors``, ``<name>_kohya.safetensors``,
    ``config.json`` and ``checkpoints/checkpoint-<step>/pytorch_lora_weights.safetensors``
    (the LoRA scaled by ``step / last step``, so checkpoints show a gradual change).

    Args:
        run_dir: folder to write (created; existing LoRA files are replaced).
        base_model: the SDXL base (hub id or folder) whose UNet shapes the LoRA.
        rank: LoRA rank.
        seed: random seed of the LoRA weights.
        trigger: recorded as the run's trigger phrase.
        checkpoint_steps: steps of intermediate checkpoints to write.
        text_encoders: also adapt both text encoders' attention layers.
        resolution: recorded resolution; default: the UNet's sample size.

    Returns:
        ``run_dir``.
    """
    import tempfile

    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    from lora_helpers.core.fileio import write_json
    from lora_helpers.core.lora_files import save_kohya

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with _quiet_diffusers():
        unet = UNet2DConditionModel.from_pretrained(str(base_model), subfolder="unet")
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                init_lora_weights=False))  # non-zero B: the LoRA changes the pictures
    states = {"unet": get_peft_model_state_dict(unet)}
    if text_encoders:
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        for name, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            with _quiet_diffusers():
                model = cls.from_pretrained(str(base_model), subfolder=name)
            # peft directly: transformers' add_adapter wants a newer peft than diffusers needs
            inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                               target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]), model)
            states[name] = get_peft_model_state_dict(model)

    def write_diffusers(folder: Path, fraction: float) -> None:
        layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(
            {k: v * fraction if ".lora_B." in k else v for k, v in state.items()}) for name, state in states.items()}
        with tempfile.TemporaryDirectory(dir=folder.parent) as tmp:
            StableDiffusionXLPipeline.save_lora_weights(tmp, **layers)
            folder.mkdir(parents=True, exist_ok=True)
            os.replace(Path(tmp) / LORA_FILE_NAME, folder / LORA_FILE_NAME)

    last = max(checkpoint_steps) if checkpoint_steps else 1
    for step in checkpoint_steps:
        (run_dir / "checkpoints").mkdir(exist_ok=True)
        write_diffusers(run_dir / "checkpoints" / f"checkpoint-{step}", step / last)
    write_diffusers(run_dir, 1.0)
    save_kohya(run_dir / LORA_FILE_NAME, run_dir / f"{run_dir.name}_kohya.safetensors", output_name=run_dir.name,
               layers_per_block=unet.config.layers_per_block, trigger=trigger)
    write_json(run_dir / "config.json", {
        "trigger": trigger,
        "base_model": str(base_model),
        "resolution": resolution or unet.config.sample_size * 8,
        "rank": rank,
        "note": "random untrained LoRA (make_random_lora) for smoke runs and demos",
    })
    return run_dir
