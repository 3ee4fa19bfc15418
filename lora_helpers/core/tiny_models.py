"""Tiny models built from configs, saved to disk, loaded through ``from_pretrained``.

Our CI and dev machines have no GPU and no model hub, so every stage runs on small
randomly initialised models with the real architectures (SDXL UNet with the
``text_time`` embedding, VAE, both CLIP text encoders, BLIP, CLIP). They are written to
a folder and loaded by the same ``from_pretrained`` call Colab uses with hub ids — there
is no test-only branch in the library.

Builders are deterministic for a seed. ``build_full_sdxl`` makes the real-size SDXL with
random weights (on a GPU in seconds, on CPU in minutes), for memory and speed benchmarks only.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from lora_helpers.core.tiny_tokenizers import write_blip_tokenizer, write_clip_tokenizer

__all__ = [
    "TINY_MODELS_VERSION",
    "SDXL_UNET_CONFIG",
    "build_tiny_sdxl",
    "build_tiny_blip",
    "build_tiny_clip",
    "build_tiny_models",
    "build_full_sdxl",
    "add_cli_arguments",
    "run_cli",
]

# Bump when a builder changes, so cached tiny models are rebuilt.
TINY_MODELS_VERSION = 1

def _tiny_sdxl_dims(size: str) -> dict:
    if size == "tiny":
        return dict(blocks=(32, 64), layers=1, heads=(2, 4), tlayers=(1, 2), text_hidden=32, text_layers=2,
                    time_dim=8, vae_blocks=(8, 16, 32, 32), vae_groups=8, sample=64)
    if size == "small":
        # Real SDXL topology (3 levels, deeper transformer at the bottom) at a fraction of the
        # width: enough work per step that CPU timings mean something.
        return dict(blocks=(64, 128, 256), layers=2, heads=(2, 4, 8), tlayers=(1, 1, 2), text_hidden=64, text_layers=2,
                    time_dim=32, vae_blocks=(16, 32, 64, 64), vae_groups=16, sample=128)
    raise ValueError(f"size must be 'tiny' or 'small', not {size!r}")


def build_tiny_sdxl(folder: str | os.PathLike, *, seed: int = 0, size: str = "tiny") -> Path:
    """Write a small random SDXL pipeline that ``StableDiffusionXLPipeline.from_pretrained`` loads.

    Args:
        folder: output folder (diffusers layout: unet/, vae/, text_encoder/, text_encoder_2/,
            tokenizer/, tokenizer_2/, scheduler/, model_index.json).
        seed: weights are a function of the seed alone.
        size: "tiny" (64 px default, tests) or "small" (128 px, CPU benchmarks).

    Returns:
        The folder.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    d = _tiny_sdxl_dims(size)
    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tok1 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tok1"))
        tok2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tok2", pad_token="!"))
    text_cfg = dict(
        vocab_size=len(tok1), hidden_size=d["text_hidden"], intermediate_size=2 * d["text_hidden"],
        num_hidden_layers=d["text_layers"], num_attention_heads=4, max_position_embeddings=77,
        bos_token_id=tok1.bos_token_id, eos_token_id=tok1.eos_token_id, pad_token_id=tok1.pad_token_id,
        projection_dim=d["text_hidden"], hidden_act="gelu",
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_cfg))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg))
    n = len(d["blocks"])
    unet = UNet2DConditionModel(
        sample_size=d["sample"] // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=d["blocks"],
        layers_per_block=d["layers"],
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        attention_head_dim=d["heads"],
        transformer_layers_per_block=d["tlayers"],
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=d["time_dim"],
        # 6 add-time ids (original size, crop, target size) + the pooled text embedding
        projection_class_embeddings_input_dim=6 * d["time_dim"] + d["text_hidden"],
        cross_attention_dim=2 * d["text_hidden"],  # both encoders' hidden states, concatenated
        norm_num_groups=min(32, d["blocks"][0]),
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=d["vae_blocks"],  # 4 levels: 8x downsampling, as SDXL's VAE
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=d["vae_groups"],
        sample_size=d["sample"],
        scaling_factor=0.13025,
        force_upcast=True,
    )
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        steps_offset=1, timestep_spacing="leading", prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoder, text_encoder_2=text_encoder_2, tokenizer=tok1, tokenizer_2=tok2,
        unet=unet, scheduler=scheduler,
    )
    pipe.save_pretrained(folder)
    return folder


def build_tiny_blip(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a tiny BLIP captioning model and processor (``BlipForConditionalGeneration``).

    Returns:
        The folder; ``BlipForConditionalGeneration.from_pretrained(folder)`` and
        ``BlipProcessor.from_pretrained(folder)`` load it.
    """
    from transformers import (
        AutoTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessorPil, BlipProcessor,
    )

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(write_blip_tokenizer(Path(tmp) / "tok"))
    dec = tokenizer.convert_tokens_to_ids("[DEC]")
    config = BlipConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=64, encoder_hidden_size=32,
            bos_token_id=dec, pad_token_id=tokenizer.pad_token_id, sep_token_id=tokenizer.sep_token_id,
            eos_token_id=tokenizer.sep_token_id,
        ),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = BlipForConditionalGeneration(config)
    model.generation_config.max_new_tokens = 20
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = BlipProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def build_tiny_clip(folder: str | os.PathLike, *, seed: int = 0) -> Path:
    """Write a tiny CLIP model and processor (image and text towers, projection 32).

    Returns:
        The folder; ``CLIPModel.from_pretrained(folder)`` and ``CLIPProcessor.from_pretrained(folder)`` load it.
    """
    from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPProcessor, CLIPTokenizer

    folder = Path(folder)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tok"))
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8),
        projection_dim=32,
    )
    torch.manual_seed(seed)
    model = CLIPModel(config)
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    processor = CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)  # parallel test workers build once, not N times
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_tiny_models(root: str | os.PathLike, *, seed: int = 0, small: bool = False) -> Path:
    """Build ``root/sdxl``, ``root/blip``, ``root/clip`` (and ``root/sdxl-small`` if asked).

    Safe to call from several processes: one builds, the others wait and reuse. A
    ``complete`` marker is written last, so a half-built folder is never used.

    Returns:
        ``root``.
    """
    root = Path(root)
    with _lock(root.parent / f".{root.name}.lock"):
        if (root / "complete").exists() and (not small or (root / "sdxl-small").exists()):
            return root
        root.mkdir(parents=True, exist_ok=True)
        builders = [("sdxl", lambda p: build_tiny_sdxl(p, seed=seed)), ("blip", lambda p: build_tiny_blip(p, seed=seed)),
                    ("clip", lambda p: build_tiny_clip(p, seed=seed))]
        if small:
            builders.append(("sdxl-small", lambda p: build_tiny_sdxl(p, seed=seed, size="small")))
        for name, build in builders:
            if (root / name).exists() and (root / "complete").exists():
                continue
            tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=root))
            try:
                build(tmp)
                shutil.rmtree(root / name, ignore_errors=True)
                os.replace(tmp, root / name)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        (root / "complete").write_text(json.dumps({"version": TINY_MODELS_VERSION, "seed": seed}))
    return root


# The SDXL 1.0 base UNet (2.6 B parameters), for GPU memory/speed benchmarks.
SDXL_UNET_CONFIG = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_embed_type_num_heads=64,
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, norm_num_groups=32,
)


def build_full_sdxl(folder: str | os.PathLike, *, device: str | torch.device = "cuda", seed: int = 0) -> Path:
    """Write a real-size SDXL pipeline with random weights in the hub's fp16 layout (about 7 GB on disk).

    Only for memory and speed benchmarks: likeness means nothing with random weights, but the
    memory and time of a training step are those of SDXL. Written one component at a time, so
    at most one model is in memory: on CPU the components are built directly in fp16 (the
    UNet alone would be 10.3 GB in fp32) and the UNet's peak is about 10 GB while its file is
    written; on a GPU they are built in fp32 and halved.

    Args:
        folder: output folder in diffusers layout (``*.fp16.safetensors`` files, as on the hub).
        device: where to initialise: a GPU takes seconds, a CPU several minutes.
        seed: weight seed.

    Returns:
        The folder.
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from diffusers import __version__ as diffusers_version
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    device = torch.device(device)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tok1 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tok1"))
        tok2 = CLIPTokenizer.from_pretrained(write_clip_tokenizer(Path(tmp) / "tok2", pad_token="!"))
    tok1.save_pretrained(folder / "tokenizer")
    tok2.save_pretrained(folder / "tokenizer_2")
    ids = dict(bos_token_id=tok1.bos_token_id, eos_token_id=tok1.eos_token_id, pad_token_id=tok1.pad_token_id,
               vocab_size=49408, max_position_embeddings=77)
    builders = {
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(
            hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
            projection_dim=768, hidden_act="quick_gelu", **ids)),
        "text_encoder_2": lambda: CLIPTextModelWithProjection(CLIPTextConfig(
            hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
            projection_dim=1280, hidden_act="gelu", **ids)),
        "vae": lambda: AutoencoderKL(
            block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=1024,
            scaling_factor=0.13025, force_upcast=True),
        "unet": lambda: UNet2DConditionModel(**SDXL_UNET_CONFIG),
    }
    build_dtype = torch.float16 if device.type == "cpu" else torch.float32
    for i, (name, build) in enumerate(builders.items()):
        torch.manual_seed(seed + i)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(build_dtype)
        try:
            with torch.device(device):
                model = build()
        finally:
            torch.set_default_dtype(previous)
        model.to(dtype=torch.float16).save_pretrained(folder / name, variant="fp16")
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                           timestep_spacing="leading").save_pretrained(folder / "scheduler")
    classes = {"scheduler": ["diffusers", "EulerDiscreteScheduler"],
               "text_encoder": ["transformers", "CLIPTextModel"],
               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    # what StableDiffusionXLPipeline.save_pretrained writes, written last: its presence marks a complete model
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": diffusers_version,
         "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True, "image_encoder": [None, None],
         **classes}, indent=2, sort_keys=True) + "\n")
    return folder


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m lora_helpers tiny-models``."""
    parser.add_argument("out_dir", type=Path, help="folder to write sdxl/, blip/, clip/ into")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--small", action="store_true", help="also build sdxl-small/ (128 px, for CPU benchmarks)")
    parser.add_argument("--full", action="store_true",
                        help="also build sdxl-full/: real-size SDXL, random fp16 weights (~7 GB; a GPU takes "
                             "seconds, a CPU several minutes and ~10 GB of RAM)")


def run_cli(args: argparse.Namespace) -> int:
    """Build the requested models and print where they went."""
    root = build_tiny_models(args.out_dir, seed=args.seed, small=args.small)
    if args.full:
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            print("no GPU: building the full-size SDXL on CPU (several minutes, ~10 GB of RAM)")
        build_full_sdxl(root / "sdxl-full", device="cuda" if on_gpu else "cpu", seed=args.seed)
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        size = sum(f.stat().st_size for f in sub.rglob("*") if f.is_file())
        print(f"{sub}  ({size / 1e6:.1f} MB)")
    return 0
