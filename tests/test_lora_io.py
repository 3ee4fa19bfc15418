"""LoRA files: diffusers and kohya formats keep rank and alpha; bad files are named; resume loads exactly."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_helpers.core.lora_convert import save_kohya, sgm_unet_module_name
from lora_helpers.core.lora_files import (
    LoraFileError,
    add_text_encoder_lora,
    load_lora_into_models,
    read_lora_file,
    save_lora,
)

ATTENTION_BLOCK_TARGETS = ["to_k", "to_q", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]


def _unet(tiny_models, *, rank: int = 4, alpha: float = 8.0, seed: int = 0,
          targets: tuple[str, ...] = ("to_k", "to_q", "to_v", "to_out.0")):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    unet = UNet2DConditionModel.from_pretrained(tiny_models / "sdxl", subfolder="unet")
    unet.requires_grad_(False)
    torch.manual_seed(seed)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets)))
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)  # a trained-looking LoRA (B starts at zero)
    return unet


def _text_encoder(tiny_models, seed: int):
    from peft import LoraConfig
    from transformers import CLIPTextModel

    te = CLIPTextModel.from_pretrained(tiny_models / "sdxl", subfolder="text_encoder")
    te.requires_grad_(False)
    torch.manual_seed(seed)
    add_text_encoder_lora(te, LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian",
                                         target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    for name, p in te.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    return te


def _lora_state(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}


def test_diffusers_file_keeps_rank_and_alpha(tiny_models, tmp_path):
    unet = _unet(tiny_models, rank=4, alpha=8.0)
    path = save_lora(tmp_path, unet=unet)
    info = read_lora_file(tmp_path)
    assert info.path == path and info.format == "diffusers" and info.components == ["unet"]
    assert (info.rank, info.alpha) == (4, 8.0)
    adapted = {n.rsplit(".lora_A", 1)[0] for n in _lora_state(unet) if ".lora_A" in n}
    assert info.n_modules == len(adapted)
    assert "rank 4, alpha 8" in str(info)


def test_kohya_file_carries_our_alpha(tiny_models, tmp_path):
    path = save_lora(tmp_path, unet=_unet(tiny_models, rank=4, alpha=8.0))
    kohya = save_kohya(path, tmp_path / "person_kohya.safetensors")
    tensors = load_file(kohya)
    assert all(k.startswith("lora_unet_") for k in tensors)
    alphas = [float(v) for k, v in tensors.items() if k.endswith(".alpha")]
    assert alphas and set(alphas) == {8.0}  # diffusers' converter would write the rank (4)
    info = read_lora_file(kohya)
    assert (info.format, info.rank, info.alpha) == ("kohya", 4, 8.0)
    assert info.metadata["ss_network_dim"] == "4" and info.metadata["ss_base_model_version"].startswith("sdxl")


def _expected_sgm_prefix(diffusers_module: str, config: dict) -> str:
    """sd-scripts' name of a LoRA module inside an attention block, worked out from the UNet config."""
    layers = config["layers_per_block"]
    block = re.match(r"(down_blocks|up_blocks)\.(\d+)\.attentions\.(\d+)\.(.+)", diffusers_module)
    if block:
        kind, i, j, inner = block[1], int(block[2]), int(block[3]), block[4]
        # SGM input_blocks: conv_in, then (resnet, attention) x layers + a downsampler per level;
        # output_blocks: (resnet, attention[, upsampler]) x (layers + 1) per level
        index = 1 + i * (layers + 1) + j if kind == "down_blocks" else i * (layers + 1) + j
        sgm = f"{'input' if kind == 'down_blocks' else 'output'}_blocks.{index}.1.{inner}"
    else:
        sgm = "middle_block.1." + diffusers_module.removeprefix("mid_block.attentions.0.")
    return "lora_unet_" + sgm.replace(".", "_")


def test_kohya_file_uses_the_sdxl_names_sd_scripts_merges(tiny_models, tmp_path):
    unet = _unet(tiny_models, targets=tuple(ATTENTION_BLOCK_TARGETS))
    config = json.loads((tiny_models / "sdxl" / "unet" / "config.json").read_text())
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in unet.named_parameters() if ".lora_A" in n}
    assert any("proj_in" in n for n in adapted) and any("ff.net.2" in n for n in adapted)
    path = save_lora(tmp_path, unet=unet)
    kohya = save_kohya(path, tmp_path / "person_kohya.safetensors", layers_per_block=config["layers_per_block"],
                       trigger="TOK person", resolution=64)
    tensors = load_file(kohya)
    prefixes = {k.split(".", 1)[0] for k in tensors}
    assert prefixes == {_expected_sgm_prefix(n, config) for n in adapted}
    assert not [p for p in prefixes if re.search(r"down_blocks|up_blocks|mid_block", p)]
    info = read_lora_file(kohya)
    assert (info.format, info.rank, info.alpha, info.n_modules) == ("kohya", 4, 8.0, len(adapted))
    meta = info.metadata
    assert meta["modelspec.sai_model_spec"] == "1.0.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert meta["modelspec.implementation"] == "https://github.com/Stability-AI/generative-models"
    assert meta["modelspec.title"] == "person_kohya" and meta["modelspec.trigger_phrase"] == "TOK person"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", meta["modelspec.date"])
    assert meta["modelspec.resolution"] == "64x64"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("4", "8.0")


def test_sgm_names_of_the_real_sdxl_unet():
    # names as they appear in sd_xl_base_1.0.safetensors (model.diffusion_model.*)
    expected = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": "input_blocks.4.1.transformer_blocks.0.attn1.to_q",
        "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
        "mid_block.attentions.0.transformer_blocks.9.ff.net.2": "middle_block.1.transformer_blocks.9.ff.net.2",
        "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0":
            "output_blocks.0.1.transformer_blocks.0.attn2.to_out.0",
        "up_blocks.0.attentions.2.proj_out": "output_blocks.2.1.proj_out",
        "up_blocks.1.attentions.1.transformer_blocks.1.attn1.to_k": "output_blocks.4.1.transformer_blocks.1.attn1.to_k",
        "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
        "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
        "mid_block.resnets.1.time_emb_proj": "middle_block.2.emb_layers.1",
        "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
        "up_blocks.2.resnets.0.conv_shortcut": "output_blocks.6.0.skip_connection",
        "conv_in": "input_blocks.0.0",
        "add_embedding.linear_1": "label_emb.0.0",
    }
    assert {name: sgm_unet_module_name(name) for name in expected} == expected
    assert sgm_unet_module_name("up_blocks.0.attentions.1.proj_in", layers_per_block=1) == "output_blocks.1.1.proj_in"
    with pytest.raises(ValueError, match="layers_per_block"):
        sgm_unet_module_name("down_blocks.1.attentions.2.proj_in")
    with pytest.raises(ValueError, match="time_proj"):
        sgm_unet_module_name("time_proj")


def test_diffusers_and_kohya_files_load_every_layer_and_give_identical_images(tiny_models, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet = _unet(tiny_models, targets=tuple(ATTENTION_BLOCK_TARGETS))
    path = save_lora(tmp_path, unet=unet)
    kohya = save_kohya(path, tmp_path / "person_kohya.safetensors", layers_per_block=unet.config.layers_per_block)
    trained = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in _lora_state(unet).items()}

    def render(source, name):
        pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights(str(source), adapter_name=name)
        loaded = {k.replace(f".{name}.", "."): v for k, v in pipe.unet.state_dict().items() if ".lora_" in k}
        # (a diffusers file whose first key was proj_in's used to lose every attention projection here)
        assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained), \
            f"{source.name}: not every LoRA layer was loaded as saved"
        image = pipe("a photo of TOK person", num_inference_steps=2, height=64, width=64,
                     generator=torch.Generator().manual_seed(0)).images[0]
        return np.asarray(image, dtype=np.int16)

    from_diffusers, from_kohya = render(path, "d"), render(kohya, "k")
    assert np.array_equal(from_diffusers, from_kohya)


def test_resume_loads_weights_exactly_and_refuses_other_shapes(tiny_models, tmp_path):
    trained = _unet(tiny_models, seed=0)
    te = _text_encoder(tiny_models, seed=0)
    path = save_lora(tmp_path, unet=trained, text_encoder=te)
    assert read_lora_file(path).components == ["unet", "text_encoder"]
    fresh, fresh_te = _unet(tiny_models, seed=1), _text_encoder(tiny_models, seed=1)
    assert any(not torch.equal(a, b) for a, b in zip(_lora_state(fresh).values(), _lora_state(trained).values()))
    load_lora_into_models(path, unet=fresh, text_encoder=fresh_te)
    for model, ref in ((fresh, trained), (fresh_te, te)):
        got, want = _lora_state(model), _lora_state(ref)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(LoraFileError, match="same rank"):
        load_lora_into_models(path, unet=_unet(tiny_models, rank=2))


def test_bad_files_are_named(tiny_models, tmp_path):
    not_lora = tmp_path / "weights.safetensors"
    save_file({"conv.weight": torch.zeros(2, 2)}, str(not_lora))
    with pytest.raises(LoraFileError, match="no LoRA tensors"):
        read_lora_file(not_lora)
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(save_lora(tmp_path / "ok", unet=_unet(tiny_models)).read_bytes()[:200])
    with pytest.raises(LoraFileError, match="cut.safetensors"):
        read_lora_file(truncated)
    nan_file = tmp_path / "nan.safetensors"
    tensors = load_file(tmp_path / "ok" / "pytorch_lora_weights.safetensors")
    key = next(iter(tensors))
    tensors[key] = tensors[key] * float("nan")
    save_file(tensors, str(nan_file))
    with pytest.raises(LoraFileError, match="NaN"):
        read_lora_file(nan_file)
    with pytest.raises(LoraFileError, match="no such file"):
        read_lora_file(tmp_path / "missing")
