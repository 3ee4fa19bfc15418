"""The tiny models load through the standard from_pretrained path and work."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import torch
from PIL import Image


def _photo(seed: int = 0, size: int = 64) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_cli_writes_loadable_folders(tmp_path):
    out = tmp_path / "models"
    result = subprocess.run([sys.executable, "-m", "lora_helpers", "tiny-models", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in ("sdxl", "blip", "clip"):
        assert (out / name).is_dir() and str(out / name) in result.stdout
    assert (out / "complete").exists()

    from transformers import BlipForConditionalGeneration

    model = BlipForConditionalGeneration.from_pretrained(out / "blip")
    assert model.config.vision_config.image_size == 32


def test_builders_are_deterministic(tmp_path):
    from safetensors.torch import load_file

    from lora_helpers.core.tiny_models import build_tiny_clip

    a = load_file(next((build_tiny_clip(tmp_path / "a", seed=3)).glob("*.safetensors")))
    b = load_file(next((build_tiny_clip(tmp_path / "b", seed=3)).glob("*.safetensors")))
    c = load_file(next((build_tiny_clip(tmp_path / "c", seed=4)).glob("*.safetensors")))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_tiny_sdxl_generates_requested_size(tiny_models):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_models / "sdxl")
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.tokenizer.model_max_length == 77
    images = [
        pipe("a photo of TOK person", num_inference_steps=2, height=64, width=48,
             generator=torch.Generator().manual_seed(s)).images[0]
        for s in (0, 0, 1)
    ]
    assert images[0].size == (48, 64)
    a, b, c = (np.asarray(im, dtype=np.int16) for im in images)
    assert np.array_equal(a, b), "same seed must give the same image"
    assert np.abs(a - c).mean() > 1, "another seed must give another image"


def test_tiny_tokenizer_keeps_identifier_whole(tiny_models):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_models / "sdxl" / "tokenizer")
    assert tok.tokenize("a photo of TOK person") == ["a</w>", "photo</w>", "of</w>", "tok</w>", "person</w>"]
    # Unknown words still tokenize (byte-level fallback), they are just longer.
    assert len(tok.tokenize("zyxwv")) > 1


def test_tiny_blip_captions(tiny_models):
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model = BlipForConditionalGeneration.from_pretrained(tiny_models / "blip").eval()
    processor = BlipProcessor.from_pretrained(tiny_models / "blip")
    inputs = processor(images=[_photo(0), _photo(1)], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, num_beams=1, do_sample=False)
    captions = processor.batch_decode(out, skip_special_tokens=True)
    assert len(captions) == 2 and all(c.strip() for c in captions)


def test_tiny_clip_embeds_image_and_text(tiny_models):
    from transformers import CLIPModel, CLIPProcessor

    model = CLIPModel.from_pretrained(tiny_models / "clip").eval()
    processor = CLIPProcessor.from_pretrained(tiny_models / "clip")
    inputs = processor(text=["a photo of a person", "a red car"], images=[_photo(0)], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    assert out.image_embeds.shape == (1, 32)
    assert out.text_embeds.shape == (2, 32)
    assert not torch.allclose(out.text_embeds[0], out.text_embeds[1])
