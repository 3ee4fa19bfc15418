"""Does a LoRA file fit *this* pipeline? Checked tensor by tensor before diffusers loads it.

Every LoRA tensor must name a module of the pipeline's UNet or text encoders, with matching
input/output sizes. This catches LoRAs for other base models (SD 1.5 keys, SD 2.x widths, a
real-SDXL LoRA on a small test model) before diffusers silently ignores them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from lora_helpers.core.lora_files import (
    _PICKLE_SUFFIXES, LoraFileError, quiet_diffusers, read_safetensors, refuse_nonfinite,
)

__all__ = ["check_lora_file"]

_LORA_MARKERS = ("lora", "alpha", "dora_scale")
# Cross-attention width of each family: the tell-tale of which base model a LoRA was made for.
_FAMILY_BY_CONTEXT_DIM = {768: "Stable Diffusion 1.x", 1024: "Stable Diffusion 2.x", 2048: "SDXL"}


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
        LoraFileError: pickled file, damaged file, not a LoRA, NaN/inf values, or a LoRA for another model.
    """
    path = Path(path)
    if path.suffix.lower() not in _PICKLE_SUFFIXES and path.suffix.lower() != ".safetensors" and path.exists():
        raise LoraFileError(path, "expected a .safetensors LoRA file")
    raw, metadata = read_safetensors(path)
    if not raw:
        raise LoraFileError(path, "the file holds no tensors; copy it again or re-run training")
    raw_keys = list(raw)
    if not any(marker in k.lower() for k in raw_keys for marker in _LORA_MARKERS):
        raise LoraFileError(path, f"not a LoRA: none of its {len(raw)} tensors is a LoRA weight (e.g. {raw_keys[0]!r}); "
                                  "this looks like a full model checkpoint. Load it as the base model instead")
    fmt = "kohya" if any(k.startswith(("lora_unet_", "lora_te")) for k in raw_keys) else \
        "diffusers" if any(k.startswith(("unet.", "text_encoder")) for k in raw_keys) else "other"
    refuse_nonfinite(path, raw)

    try:
        with quiet_diffusers():
            converted, _alphas = pipe.lora_state_dict({k: v for k, v in raw.items()}, unet_config=pipe.unet.config)
    except Exception as exc:  # noqa: BLE001 - the converters raise assorted errors on foreign layouts
        family = _describe_family(None, raw_keys, metadata)
        raise LoraFileError(path, f"not a LoRA layout we can read ({exc})"
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
        raise LoraFileError(
            path,
            f"this LoRA does not fit the base model {pipe.name_or_path!r} ({here}, cross-attention width {ours}): "
            f"{made_for}{len(problems)} of its tensors do not match ({examples}). "
            "Use a LoRA trained for this base model, or load the base model it was trained on.",
        )
    return {"format": fmt, "num_tensors": len(raw), "targets": targets,
            "rank": max(ranks) if ranks else None, "metadata": metadata}
