"""BLIP, the captioning model: load it and describe images with it, deterministically.

The caption stage (:func:`lora_helpers.caption.stage.caption_dataset`) loads BLIP only when
an image needs a caption and frees it before returning; the identifier and clean-up of the
raw captions happen there and in :mod:`lora_helpers.caption.text`.
"""

from __future__ import annotations

from typing import Sequence

import torch
from tqdm.auto import tqdm

from lora_helpers.core.config import resolve_models
from lora_helpers.core.runtime import default_device, default_dtype

__all__ = ["BLIP_MODELS", "resolve_blip", "load_blip", "generate_captions"]

BLIP_MODELS = {
    "base": "Salesforce/blip-image-captioning-base",
    "large": "Salesforce/blip-image-captioning-large",
}


def resolve_blip(model: str | None) -> str:
    """The BLIP hub id or folder that ``model`` stands for.

    Args:
        model: hub id, local folder, "base" or "large"; None takes
            :func:`lora_helpers.core.config.resolve_models` (the tiny model in smoke mode).

    Returns:
        A hub id or a folder path.
    """
    if model is None:
        return resolve_models().blip
    return BLIP_MODELS.get(model, model)


def load_blip(model: str | None = None, *, device=None, dtype=None):
    """Load BLIP for captioning.

    Args:
        model: hub id, local folder, "base" or "large"; None resolves the default.
        device: None -> CUDA when present, else CPU.
        dtype: None -> fp16 on CUDA, fp32 on CPU.

    Returns:
        ``(model, processor)``, the model in eval mode on ``device``.
    """
    # transformers' model classes take seconds to import; only loading needs them.
    from transformers import BlipForConditionalGeneration, BlipProcessor

    model_id = resolve_blip(model)
    device = default_device() if device is None else device
    dtype = default_dtype(device) if dtype is None else dtype
    processor = BlipProcessor.from_pretrained(model_id)
    blip = BlipForConditionalGeneration.from_pretrained(model_id, dtype=dtype).to(device).eval()
    return blip, processor


def generate_captions(
    images: Sequence,
    *,
    model,
    processor,
    batch_size: int = 8,
    num_beams: int = 3,
    max_new_tokens: int = 40,
    min_new_tokens: int = 5,
    repetition_penalty: float = 1.3,
    prompt: str | None = None,
    progress: bool = True,
) -> list[str]:
    """Raw BLIP captions for PIL images, in batches, deterministically.

    Args:
        images: RGB PIL images.
        model, processor: from :func:`load_blip`.
        batch_size: images per forward pass.
        num_beams: 1 = greedy; more = beam search (never sampling).
        max_new_tokens, min_new_tokens: caption length bounds.
        repetition_penalty: >1 discourages loops.
        prompt: optional text for BLIP to continue; removed from the returned captions.
        progress: show a tqdm bar.

    Returns:
        One caption per image, in order.
    """
    param = next(model.parameters())
    out: list[str] = []
    with tqdm(total=len(images), desc="captioning", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = list(images[start:start + batch_size])
            text = [prompt] * len(batch) if prompt else None
            inputs = processor(images=batch, text=text, return_tensors="pt").to(param.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
            with torch.inference_mode():
                ids = model.generate(
                    **inputs, do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
                    min_new_tokens=min(min_new_tokens, max_new_tokens), repetition_penalty=repetition_penalty,
                )
            for caption in processor.batch_decode(ids, skip_special_tokens=True):
                caption = caption.strip()
                if prompt and caption.lower().startswith(prompt.lower()):
                    caption = caption[len(prompt):].strip()
                out.append(caption)
            bar.update(len(batch))
    return out
