"""LoRA files: the diffusers format, the kohya format, and reading either back.

The diffusers file (``pytorch_lora_weights.safetensors``) is what ``pipe.load_lora_weights``
reads; it carries the peft ``LoraConfig`` (rank, alpha, targets) as safetensors metadata,
so an alpha different from the rank survives the round trip. The kohya file is the same
weights under the names kohya sd-scripts writes for SDXL (the original SGM/LDM UNet layout,
``lora_unet_input_blocks_4_1_...``) with one ``.alpha`` tensor per module and ``modelspec.*``
metadata: AUTOMATIC1111, Forge and ComfyUI load it, and sd-scripts can merge it or train on
from it (``sdxl_merge_lora.py``, ``--network_weights``), which find modules by those names only.

Only LoRA tensors are ever saved: upcasting the whole UNet to write a checkpoint would
cost ~10 GB of memory on the machine we budget for.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lora_helpers.core.fileio import atomic_path

__all__ = [
    "LORA_WEIGHT_NAME",
    "LoraFileError",
    "LoraFileInfo",
    "lora_state_dicts",
    "save_lora",
    "save_kohya",
    "weights_digest",
    "sgm_unet_module_name",
    "read_lora_file",
    "load_lora_into_models",
    "add_text_encoder_lora",
    "text_encoder_lora_supported",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
SDXL_LAYERS_PER_BLOCK = 2


class LoraFileError(ValueError):
    """A file that is not a usable LoRA (wrong format, missing tensors, NaN values)."""


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


def _adapter_metadata(metadata: dict | None) -> dict[str, dict]:
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


def _to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA state dict in peft naming, component by component.

    diffusers' own ``convert_all_state_dict_to_peft`` guesses one naming for the whole file
    and leaves the UNet half unconverted when text-encoder weights are present.
    """
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    out = {}
    for comp in _COMPONENTS:
        part = {k[len(comp) + 1:]: v for k, v in state.items() if k.startswith(comp + ".")}
        if not part:
            continue
        if comp == "unet":
            part = convert_unet_state_dict_to_peft(part)
        else:
            part = convert_state_dict_to_peft(part)
            # A1111 and ComfyUI name text-encoder layers from "text_model" (transformers 5 dropped that level)
            part = {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in part.items()}
        out.update({f"{comp}.{k}": v for k, v in part.items()})
    return out


# diffusers ResnetBlock2D layer -> the original (SGM) ResBlock layer
_SGM_RESNET = {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
               "conv_shortcut": "skip_connection"}
# layers outside the down/mid/up blocks
_SGM_TOP = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2"}


def sgm_unet_module_name(name: str, layers_per_block: int = SDXL_LAYERS_PER_BLOCK) -> str:
    """The original SDXL (SGM/LDM) name of a diffusers UNet layer, the one kohya sd-scripts uses.

    The SGM UNet numbers its blocks flat: ``input_blocks`` are conv_in, then per down block
    ``layers_per_block`` [resnet, attention] pairs and a downsampler; ``output_blocks`` hold
    ``layers_per_block + 1`` [resnet, attention, upsampler] groups per up block (in SDXL every
    up block with an upsampler has attentions, so the upsampler is always the third layer);
    ``middle_block`` is [resnet, attention, resnet]. Inside an attention block the names are the
    same in both layouts (``transformer_blocks.0.attn1.to_q``, ``proj_in``, ``ff.net.0.proj``).

    Args:
        name: a dotted module name in the diffusers UNet, e.g.
            ``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.
        layers_per_block: the UNet config's ``layers_per_block`` (2 for SDXL).

    Returns:
        The dotted SGM name, e.g. ``input_blocks.4.1.transformer_blocks.0.attn1.to_q``.

    Raises:
        ValueError: for a layer that has no SGM counterpart.
    """
    per = layers_per_block + 1
    if name in _SGM_TOP:
        return _SGM_TOP[name]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(attentions|resnets|downsamplers)\.(\d+)\.(.+)", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{(i + 1) * per}.0.{'op' if rest == 'conv' else rest}"
        if j >= layers_per_block:
            raise ValueError(f"{name}: layer {j} of a down block, but layers_per_block is {layers_per_block}")
        if kind == "attentions":
            return f"input_blocks.{1 + i * per + j}.1.{rest}"
        return f"input_blocks.{1 + i * per + j}.0.{_SGM_RESNET.get(rest, rest)}"
    m = re.fullmatch(r"mid_block\.(attentions|resnets)\.(\d+)\.(.+)", name)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "attentions":
            return f"middle_block.1.{rest}"
        return f"middle_block.{2 * j}.{_SGM_RESNET.get(rest, rest)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(attentions|resnets|upsamplers)\.(\d+)\.(.+)", name)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            return f"output_blocks.{i * per + layers_per_block}.2.{rest}"
        if j >= per:
            raise ValueError(f"{name}: layer {j} of an up block, but layers_per_block is {layers_per_block}")
        if kind == "attentions":
            return f"output_blocks.{i * per + j}.1.{rest}"
        return f"output_blocks.{i * per + j}.0.{_SGM_RESNET.get(rest, rest)}"
    raise ValueError(f"{name}: no original SDXL (SGM) name for this UNet layer")


def _sgm_unet_keys(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Rename the ``unet.`` keys of a peft-named state dict to the SGM layout; other keys stay."""
    out = {}
    for key, value in state.items():
        if key.startswith("unet."):
            module, sep, tail = key[len("unet."):].partition(".lora_")
            key = "unet." + sgm_unet_module_name(module, layers_per_block) + sep + tail
        out[key] = value
    return out


def save_kohya(diffusers_file: str | os.PathLike, out_path: str | os.PathLike, *,
               base_model: str = "sdxl_base_v1-0", output_name: str | None = None,
               layers_per_block: int = SDXL_LAYERS_PER_BLOCK, title: str | None = None, trigger: str | None = None,
               resolution: int | None = None) -> Path:
    """Convert a diffusers-format LoRA file to the kohya format (A1111, Forge, ComfyUI, kohya sd-scripts).

    UNet layers get the original SDXL (SGM) names that sd-scripts writes, computed from
    ``layers_per_block``; text-encoder layers get sd-scripts' ``lora_te1_``/``lora_te2_`` names.

    Args:
        diffusers_file: a file written by :func:`save_lora`.
        out_path: the kohya file to write (atomically).
        base_model: recorded as ``ss_base_model_version``.
        output_name: recorded as ``ss_output_name`` (defaults to the file stem).
        layers_per_block: the UNet config's ``layers_per_block`` (2 for SDXL); names depend on it.
        title: ``modelspec.title`` (defaults to ``output_name``).
        trigger: the trigger phrase, recorded as ``modelspec.trigger_phrase``.
        resolution: training resolution, recorded as ``modelspec.resolution``.

    Returns:
        ``out_path``.
    """
    from diffusers.utils import convert_state_dict_to_kohya
    from safetensors import safe_open
    from safetensors.torch import save_file

    diffusers_file = Path(diffusers_file)
    with safe_open(diffusers_file, "pt") as handle:
        metadata = handle.metadata() or {}
        state = {k: handle.get_tensor(k) for k in handle.keys()}
    configs = _adapter_metadata(metadata)
    kohya = convert_state_dict_to_kohya(_sgm_unet_keys(_to_peft(state), layers_per_block))
    # diffusers writes alpha = rank; ours may differ, and A1111 scales by alpha / rank.
    prefixes = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2"}
    for key in [k for k in kohya if k.endswith(".alpha")]:
        comp = next((c for p, c in prefixes.items() if key.startswith(p)), "unet")
        alpha = configs.get(comp, {}).get("lora_alpha")
        if alpha is not None:
            kohya[key] = torch.tensor(float(alpha))
    unet_cfg = configs.get("unet", {})
    ranks = {int(v.shape[0]) for k, v in kohya.items() if k.startswith("lora_unet_") and k.endswith(".lora_down.weight")}
    alphas = {float(v) for k, v in kohya.items() if k.startswith("lora_unet_") and k.endswith(".alpha")}
    dim = unet_cfg.get("r", next(iter(ranks)) if len(ranks) == 1 else "")
    alpha = unet_cfg.get("lora_alpha", f"{next(iter(alphas)):g}" if len(alphas) == 1 else "")
    out_path = Path(out_path)
    name = output_name or out_path.stem
    meta = {
        "ss_network_module": "networks.lora",
        "ss_base_model_version": base_model,
        "ss_output_name": name,
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(alpha),
        "ss_converted_from": "diffusers",
        # Stability AI's model spec, as sd-scripts writes it for an SDXL LoRA
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": title or name,
        "modelspec.date": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if trigger:
        meta["modelspec.trigger_phrase"] = trigger
    if resolution:
        meta["modelspec.resolution"] = f"{resolution}x{resolution}"
    kohya = {k: v.contiguous() for k, v in kohya.items()}
    with atomic_path(out_path) as tmp:
        save_file(kohya, str(tmp), metadata=meta)
    return out_path


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
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if path.is_dir():
        path = path / LORA_WEIGHT_NAME
    if not path.is_file():
        raise LoraFileError(f"{path}: no such file; train a LoRA first or pass the .safetensors file")
    try:
        with safe_open(path, "pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    except (SafetensorError, OSError) as exc:
        raise LoraFileError(f"{path}: not a readable safetensors file ({exc}); it may be truncated, re-download or retrain") from exc
    keys = list(tensors)
    if any(k.endswith((".lora.down.weight", ".lora_linear_layer.down.weight")) for k in keys):
        fmt, down_marks = "diffusers", (".lora.down.weight", ".lora_linear_layer.down.weight")
    elif any(k.endswith(".lora_down.weight") for k in keys):
        fmt, down_marks = "kohya", (".lora_down.weight",)
    elif any(k.endswith(".lora_A.weight") for k in keys):
        fmt, down_marks = "peft", (".lora_A.weight",)
    else:
        raise LoraFileError(f"{path}: holds no LoRA tensors (expected lora.down/lora_down/lora_A keys)")
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
    configs = _adapter_metadata(metadata)
    if "unet" in configs and configs["unet"].get("lora_alpha") is not None:
        alpha = float(configs["unet"]["lora_alpha"])
    elif fmt == "kohya":
        alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha")]
        alpha = alphas[0] if alphas else None
    if check_finite:
        bad = [k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise LoraFileError(f"{path}: {len(bad)} tensors hold NaN/inf (e.g. {bad[0]}); training diverged - "
                                "use an earlier checkpoint, or retrain with a lower learning rate")
    weights = [v for k, v in tensors.items() if not k.endswith(".alpha")]
    return LoraFileInfo(
        path=path, format=fmt, components=components, n_modules=len(downs), rank=max(ranks), alpha=alpha,
        dtype=str(weights[0].dtype).removeprefix("torch.") if weights else "?",
        n_parameters=sum(v.numel() for v in weights), size_mb=path.stat().st_size / 1e6, metadata=metadata,
    )


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
            raise LoraFileError(f"{path}: no {name} LoRA weights in this file, but this run trains {name}")
        model = getattr(model, "module", model)
        if name == "unet":
            peft_sd = convert_unet_state_dict_to_peft(part)
        else:
            peft_sd = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        expected = [k for k in model.state_dict() if ".lora_" in k]
        mismatch = f"{path}: its {name} LoRA layers do not match this run"
        try:
            result = set_peft_model_state_dict(model, peft_sd, adapter_name="default")
        except RuntimeError as exc:  # shape mismatch: another rank
            raise LoraFileError(f"{mismatch} ({str(exc).splitlines()[-1].strip()}); resume with the same rank and "
                                "target modules") from None
        unexpected = list(getattr(result, "unexpected_keys", None) or [])
        if unexpected or len(peft_sd) != len(expected):
            raise LoraFileError(f"{path}: its {name} LoRA layers do not match this run ({len(peft_sd)} tensors in the "
                                f"file, {len(expected)} in the model); resume with the same rank and target modules")
        if any(v.is_floating_point() and not torch.isfinite(v).all() for v in peft_sd.values()):
            raise LoraFileError(f"{path}: {name} LoRA holds NaN/inf; resume from an earlier checkpoint")


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
