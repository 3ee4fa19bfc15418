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


def _beam_cache(decoder, image_embeds: torch.Tensor, num_beams: int):
    """A decoder cache that holds each image's cross-attention keys and values, computed once.

    transformers' beam search computes the cross-attention keys and values of the image
    (577 tokens x 12 layers for BLIP-base) once per *beam*, from the image embeddings
    repeated for every beam, and after each token re-gathers that whole cache along the
    beams (``reorder_cache``): copying hundreds of MB per token in a batch of 8. Both are
    wasted: every beam of an image attends to the same image. So the keys and values are
    computed per image here and repeated for the beams, and only the self-attention half
    of the cache follows the beams (beam search reorders within an image's own beams,
    where the cross-attention rows are equal, so the captions are the same).
    """
    # transformers costs seconds to import; only captioning needs these
    from transformers import DynamicCache, EncoderDecoderCache

    cross = DynamicCache()
    for index, layer in enumerate(decoder.bert.encoder.layer):
        attention = layer.crossattention.self
        shape = (*image_embeds.shape[:-1], -1, attention.attention_head_size)
        keys, values = (proj(image_embeds).view(shape).transpose(1, 2).repeat_interleave(num_beams, dim=0)
                        for proj in (attention.key, attention.value))
        cross.update(keys, values, index)
    cache = EncoderDecoderCache(DynamicCache(), cross)  # a filled cross-attention cache counts as computed
    cache.reorder_cache = cache.self_attention_cache.reorder_cache
    return cache


def _generate_ids(model, inputs, *, num_beams: int, **generate_kwargs) -> torch.Tensor:
    """Token ids of BLIP's captions for one batch: ``BlipForConditionalGeneration.generate`` with the
    cross-attention work done once per image (:func:`_beam_cache`)."""
    pixels = inputs["pixel_values"]
    # On a CPU the image encoder runs image by image: its attention over 577 patches makes
    # tensors of 16 MB per image, and a batch of them falls out of the CPU's caches (a batch
    # of 8 measured 25 % slower per image). Batching pays in the decoder, where every token
    # reads all the weights. A GPU takes the batch at once.
    step = 1 if pixels.device.type == "cpu" else len(pixels)
    image_embeds = torch.cat([model.vision_model(pixel_values=pixels[i:i + step])[0]
                              for i in range(0, len(pixels), step)])
    text = model.config.text_config
    input_ids = inputs.get("input_ids")
    if input_ids is None:  # no prompt: start from [DEC] alone
        input_ids = torch.full((image_embeds.shape[0], 2), text.eos_token_id, dtype=torch.long,
                               device=image_embeds.device)
    input_ids = input_ids.clone()
    input_ids[:, 0] = text.bos_token_id  # [CLS] -> [DEC], and the closing [SEP] goes, as BLIP's generate does
    attention_mask = inputs.get("attention_mask")
    return model.text_decoder.generate(
        input_ids=input_ids[:, :-1], attention_mask=None if attention_mask is None else attention_mask[:, :-1],
        eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id, encoder_hidden_states=image_embeds,
        encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
        cache=_beam_cache(model.text_decoder, image_embeds, num_beams), num_beams=num_beams, **generate_kwargs)


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
                ids = _generate_ids(
                    model, inputs, do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
                    min_new_tokens=min(min_new_tokens, max_new_tokens), repetition_penalty=repetition_penalty,
                )
            for caption in processor.batch_decode(ids, skip_special_tokens=True):
                caption = caption.strip()
                if prompt and caption.lower().startswith(prompt.lower()):
                    caption = caption[len(prompt):].strip()
                out.append(caption)
            bar.update(len(batch))
    return out
