"""LoRA files: diffusers and kohya formats keep rank and alpha; bad files are named; resume loads exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_helpers.lora_io import (
    LoraFileError,
    add_text_encoder_lora,
    load_lora_into_models,
    read_lora_file,
    save_kohya,
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


def test_diffusers_file_loads_every_layer_of_the_attention_blocks(tiny_models, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    unet = _unet(tiny_models, targets=tuple(ATTENTION_BLOCK_TARGETS))
    path = save_lora(tmp_path, unet=unet)
    trained = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v
               for k, v in _lora_state(unet).items()}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    pipe.load_lora_weights(str(path), adapter_name="d")
    loaded = {k.replace(".d.", "."): v for k, v in pipe.unet.state_dict().items() if ".lora_" in k}
    # a file whose first key is proj_in's used to lose every attention projection on loading
    assert loaded.keys() == trained.keys() and all(torch.equal(loaded[k], trained[k]) for k in trained)


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
