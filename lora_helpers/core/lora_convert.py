"""LoRA files for the other tools: the kohya/SGM layout that AUTOMATIC1111, Forge, ComfyUI and
kohya sd-scripts read.

The kohya file holds the same weights as our diffusers file, under the names kohya sd-scripts
writes for SDXL (the original SGM/LDM UNet layout, ``lora_unet_input_blocks_4_1_...``), with
one ``.alpha`` tensor per module and ``modelspec.*`` metadata: AUTOMATIC1111, Forge and ComfyUI
load it, and sd-scripts can merge it or train on from it (``sdxl_merge_lora.py``,
``--network_weights``), which find modules by those names only.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import torch

from lora_helpers.core.fileio import atomic_path
from lora_helpers.core.lora_files import COMPONENTS, adapter_metadata

__all__ = ["SDXL_LAYERS_PER_BLOCK", "sgm_unet_module_name", "save_kohya"]

SDXL_LAYERS_PER_BLOCK = 2


def _to_peft(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers-format LoRA state dict in peft naming, component by component.

    diffusers' own ``convert_all_state_dict_to_peft`` guesses one naming for the whole file
    and leaves the UNet half unconverted when text-encoder weights are present.
    """
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    out = {}
    for comp in COMPONENTS:
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
    configs = adapter_metadata(metadata)
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
