"""LoRA files: the one place that writes, reads and checks them, with one error type.

The diffusers file (``pytorch_lora_weights.safetensors``, what ``pipe.load_lora_weights`` reads)
carries the peft ``LoraConfig`` as metadata, so an alpha other than the rank survives. People also
bring kohya/A1111 files, and some cannot work (a pickled ``.bin``, a half-copied download, an SD 1.5
LoRA): each is refused with the file, the reason and what to do; :mod:`lora_helpers.core.lora_check`
checks a file against *this* model and :mod:`lora_helpers.core.lora_convert` writes the kohya file.
Only LoRA tensors are ever saved: upcasting the UNet to save would cost ~10 GB on a T4 runtime.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from lora_helpers.core.fileio import atomic_path
from lora_helpers.core.run_folder import LORA_WEIGHT_NAME

__all__ = [
    "LORA_WEIGHT_NAME",
    "UNET_TARGET_MODULES",
    "TEXT_ENCODER_TARGET_MODULES",
    "COMPONENTS",
    "LoraFileError",
    "LoraNotFoundError",
    "LoraFileInfo",
    "adapter_metadata",
    "lora_state_dicts",
    "save_lora",
    "weights_digest",
    "read_lora_file",
    "read_safetensors",
    "refuse_nonfinite",
    "quiet_diffusers",
    "load_lora_into_models",
    "add_text_encoder_lora",
    "text_encoder_lora_supported",
]

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# The layers a LoRA adapts: SDXL's attention projections (the DreamBooth-LoRA default).
UNET_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


class LoraFileError(ValueError):
    """A LoRA file we cannot use; the message names the file, the reason and what to do."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class LoraNotFoundError(LoraFileError, FileNotFoundError):
    """The LoRA file or run folder does not exist (or holds no LoRA)."""


@dataclass
class LoraFileInfo:
    """What a LoRA file holds.

    Attributes:
        path: the file.
        format: "diffusers", "kohya" or "peft".
        components: the models it modifies ("unet", "text_encoder", "text_encoder_2").
        n_modules: number of adapted layers.
        rank: LoRA rank (the largest one, if layers differ).
        alpha: LoRA alpha, when the file records it.
        dtype: tensor dtype.
        n_parameters: number of LoRA parameters.
        size_mb: file size in MB.
        metadata: the safetensors metadata.
    """

    path: Path
    format: str
    components: list[str]
    n_modules: int
    rank: int
    alpha: float | None
    dtype: str
    n_parameters: int
    size_mb: float
    metadata: dict = field(default_factory=dict)

    def __str__(self) -> str:
        alpha = "?" if self.alpha is None else f"{self.alpha:g}"
        return (f"{self.path.name}: {self.format} LoRA, rank {self.rank}, alpha {alpha}, {self.n_modules} layers "
                f"in {'+'.join(self.components)}, {self.n_parameters:,} parameters ({self.dtype}), "
                f"{self.size_mb:.1f} MB")


def lora_state_dicts(*, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
                     text_encoder_2: torch.nn.Module | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Return the peft LoRA state dicts of the given models, on CPU, as stored (fp32 in training).

    Args:
        unet: a UNet with a peft LoRA adapter (``unet.add_adapter``), possibly wrapped by accelerate.
        text_encoder, text_encoder_2: text encoders with adapters, when they were trained.

    Returns:
        ``{"unet": {...}, "text_encoder": {...}, ...}`` for the models given.
    """
    from peft.utils import get_peft_model_state_dict

    out = {}
    for name, model in (("unet", unet), ("text_encoder", text_encoder), ("text_encoder_2", text_encoder_2)):
        if model is None:
            continue
        model = getattr(model, "module", model)  # DistributedDataParallel wrapper
        out[name] = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    return out


def save_lora(folder: str | os.PathLike, *, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
              text_encoder_2: torch.nn.Module | None = None, weight_name: str = LORA_WEIGHT_NAME) -> Path:
    """Write the diffusers-format LoRA file that ``pipe.load_lora_weights(folder)`` loads.

    Args:
        folder: output folder (created).
        unet: UNet with a peft LoRA adapter.
        text_encoder, text_encoder_2: text encoders with adapters, if trained.
        weight_name: file name inside ``folder``.

    Returns:
        Path of the written file (written atomically).
    """
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    layers = lora_state_dicts(unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    kwargs = {}
    for name, sd in layers.items():
        sd = convert_state_dict_to_diffusers(sd)
        if name == "unet":
            sd = _uniform_diffusers_names(sd)
        kwargs[f"{name}_lora_layers"] = sd
        model = getattr(models[name], "module", models[name])
        kwargs[f"{name}_lora_adapter_metadata"] = model.peft_config["default"].to_dict()
    path = Path(folder) / weight_name
    with atomic_path(path) as tmp:
        StableDiffusionXLPipeline.save_lora_weights(save_directory=tmp.parent, weight_name=tmp.name, **kwargs)
    return path


def _uniform_diffusers_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Give every UNet LoRA tensor the diffusers ``lora.down``/``lora.up`` name.

    ``convert_state_dict_to_diffusers`` renames attention projections only and leaves other
    layers (``proj_in``, ``ff.net.2``, convolutions) in peft naming. diffusers' loader judges the
    whole file by its first key: when that is a peft name (``...attentions.0.proj_in.lora_A``
    sorts first), it skips conversion and silently drops every attention LoRA.
    """
    return {k.replace(".lora_A.", ".lora.down.").replace(".lora_B.", ".lora.up."): v for k, v in state.items()}


def adapter_metadata(metadata: dict | None) -> dict[str, dict]:
    """Per-component LoraConfig values from a diffusers file's ``lora_adapter_metadata``."""
    raw = (metadata or {}).get("lora_adapter_metadata")
    if not raw:
        return {}
    flat = json.loads(raw)
    out: dict[str, dict] = {}
    for key, value in flat.items():
        comp, _, name = key.partition(".")
        out.setdefault(comp, {})[name] = value
    return out


def weights_digest(path: str | os.PathLike) -> str:
    """A hash of a LoRA file's tensors (names, dtypes, shapes, values), not of its bytes.

    Two saves of the same weights can differ in header order or metadata; this tells
    whether they hold the same LoRA (e.g. the final file and the last checkpoint).
    """
    import hashlib

    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), framework="pt") as f:
        for key in sorted(f.keys()):
            tensor = f.get_tensor(key).contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def read_lora_file(path: str | os.PathLike, *, check_finite: bool = True) -> LoraFileInfo:
    """Read and check a LoRA file without loading a model.

    Args:
        path: a ``.safetensors`` LoRA file (diffusers, kohya or peft naming) or a folder
            holding ``pytorch_lora_weights.safetensors``.
        check_finite: fail on NaN/inf values (a diverged training run).

    Returns:
        A :class:`LoraFileInfo`.

    Raises:
        LoraFileError: naming the file and what is wrong with it.
    """
    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    tensors, metadata = read_safetensors(path)
    keys = list(tensors)
    if any(k.endswith((".lora.down.weight", ".lora_linear_layer.down.weight")) for k in keys):
        fmt, down_marks = "diffusers", (".lora.down.weight", ".lora_linear_layer.down.weight")
    elif any(k.endswith(".lora_down.weight") for k in keys):
        fmt, down_marks = "kohya", (".lora_down.weight",)
    elif any(k.endswith(".lora_A.weight") for k in keys):
        fmt, down_marks = "peft", (".lora_A.weight",)
    else:
        raise LoraFileError(path, "holds no LoRA tensors (expected lora.down/lora_down/lora_A keys)")
    downs = {k: v for k, v in tensors.items() if k.endswith(down_marks)}
    ranks = [int(v.shape[0]) for v in downs.values()]
    components = []
    for comp, marks in (("unet", ("unet.", "lora_unet_")), ("text_encoder", ("text_encoder.", "lora_te1_")),
                        ("text_encoder_2", ("text_encoder_2.", "lora_te2_"))):
        if any(k.startswith(m) for k in keys for m in marks):
            components.append(comp)
    if fmt == "peft" and not components:
        components = ["unet"]
    alpha = None
    configs = adapter_metadata(metadata)
    if "unet" in configs and configs["unet"].get("lora_alpha") is not None:
        alpha = float(configs["unet"]["lora_alpha"])
    elif fmt == "kohya":
        alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha")]
        alpha = alphas[0] if alphas else None
    if check_finite:
        refuse_nonfinite(path, tensors)
    weights = [v for k, v in tensors.items() if not k.endswith(".alpha")]
    return LoraFileInfo(
        path=path, format=fmt, components=components, n_modules=len(downs), rank=max(ranks), alpha=alpha,
        dtype=str(weights[0].dtype).removeprefix("torch.") if weights else "?",
        n_parameters=sum(v.numel() for v in weights), size_mb=path.stat().st_size / 1e6, metadata=metadata,
    )


def refuse_nonfinite(path: str | os.PathLike, tensors: dict[str, torch.Tensor]) -> None:
    """Refuse a LoRA holding NaN/inf: it would turn every picture black, which looks like a VAE fault.

    Raises:
        LoraFileError: naming the file, how many tensors are bad and one of them.
    """
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        verb = "holds" if len(bad) == 1 else "hold"
        raise LoraFileError(path, f"{len(bad)} of its {len(tensors)} tensors {verb} NaN/inf values (e.g. {bad[0]}); "
                                  "training diverged - use an earlier checkpoint, or retrain with a lower learning rate")


def load_lora_into_models(path: str | os.PathLike, *, unet: torch.nn.Module, text_encoder: torch.nn.Module | None = None,
                          text_encoder_2: torch.nn.Module | None = None) -> None:
    """Load a diffusers-format LoRA file into models that already carry the same adapter.

    Used to resume training: values are copied exactly (no rescaling), so the models
    continue from precisely the saved weights.

    Raises:
        LoraFileError: when the file's layers do not match the models' adapters (another
            rank or other target modules).
    """
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(str(path))
    models = {"unet": unet, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2}
    for name, model in models.items():
        part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        if model is None:
            continue
        if not part:
            raise LoraFileError(path, f"no {name} LoRA weights in this file, but this run trains {name}")
        model = getattr(model, "module", model)
        if name == "unet":
            peft_sd = convert_unet_state_dict_to_peft(part)
        else:
            peft_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        expected = [k for k in model.state_dict() if ".lora_" in k]
        mismatch = f"its {name} LoRA layers do not match this run"
        try:
            result = set_peft_model_state_dict(model, peft_sd, adapter_name="default")
        except RuntimeError as exc:  # shape mismatch: another rank
            raise LoraFileError(path, f"{mismatch} ({str(exc).splitlines()[-1].strip()}); resume with the same rank and "
                                "target modules") from None
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if unexpected or len(peft_sd) != len(expected):
            raise LoraFileError(path, f"its {name} LoRA layers do not match this run ({len(peft_sd)} tensors in the "
                                f"file, {len(expected)} in the model); resume with the same rank and target modules")
        if any(v.is_floating_point() and not torch.isfinite(v).all() for v in peft_sd.values()):
            raise LoraFileError(path, f"{name} LoRA holds NaN/inf; resume from an earlier checkpoint")


def add_text_encoder_lora(text_encoder: torch.nn.Module, config) -> torch.nn.Module:
    """Add a peft LoRA adapter named "default" to a transformers text encoder, in place.

    Uses peft directly (``inject_adapter_in_model``), the same layers transformers'
    ``add_adapter`` makes, so it works whatever peft version transformers asks for.

    Returns:
        The same model, with ``peft_config`` set so the LoRA state dict helpers find it.
    """
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, text_encoder, adapter_name="default")
    text_encoder.peft_config = {"default": config}
    return text_encoder


def text_encoder_lora_supported() -> tuple[bool, str]:
    """Whether ``pipe.load_lora_weights`` can load text-encoder LoRA weights with these packages.

    transformers 5 loads text-encoder adapters only with a recent peft; a LoRA that holds
    text-encoder weights would otherwise train fine and then fail to load.

    Returns:
        ``(supported, reason)``.
    """
    import importlib.metadata

    from packaging.version import Version

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # older transformers: no minimum
        return True, ""
    have = importlib.metadata.version("peft")
    if Version(have) >= Version(MIN_PEFT_VERSION):
        return True, ""
    return False, (f"text-encoder LoRA needs peft>={MIN_PEFT_VERSION} (transformers loads text-encoder adapters only "
                   f"with it; installed: {have}); upgrade peft or train the UNet only (train_text_encoder=False)")


@contextlib.contextmanager
def quiet_diffusers() -> Iterator[None]:
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


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors file, refusing pickles and naming damage."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise LoraNotFoundError(path, "no such file; train a LoRA first or pass the .safetensors file")
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise LoraFileError(path, f"{path.suffix} files are Python pickles, which can run arbitrary code when "
                                  "loaded; we only load .safetensors. Convert it on a machine you trust: "
                                  "`from safetensors.torch import save_file; import torch; "
                                  f"save_file(torch.load('{path.name}', weights_only=True), '{path.stem}.safetensors')`")
    if path.stat().st_size == 0:
        raise LoraFileError(path, "empty file (0 bytes); copy or download it again")
    with open(path, "rb") as f:
        head = f.read(8)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise LoraFileError(path, "this is a pickled PyTorch file renamed to .safetensors; we only load real "
                                  "safetensors files (pickles can run code when loaded). Convert it where you trust it")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 - safetensors raises several types for a damaged file
        raise LoraFileError(path, f"cannot read it as safetensors ({exc}); the file is damaged or incomplete "
                                  "(an interrupted download or copy?): copy it again or re-run training") from None
    return tensors, metadata
