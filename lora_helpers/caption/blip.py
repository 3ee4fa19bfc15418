"""BLIP, the captioning model: load it and describe images with it, deterministically.

The caption stage (:func:`lora_helpers.caption.stage.caption_dataset`) loads BLIP only when
an image needs a caption and frees it before returning; the identifier and clean-up of the
raw captions happen there and in :mod:`lora_helpers.caption.text`.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator, Sequence

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


class _ImageAttention(torch.nn.Module):
    """A BLIP decoder layer's cross-attention, with each image's keys and values computed once and
    shared by all its beams.

    transformers' beam search repeats the image embeddings for every beam, computes the keys and
    values of all 577 patches per beam, and reads them per beam at every token (and re-gathers
    them along the beams after each token): in a batch of 8 with 3 beams that is hundreds of MB
    copied and read per token, for rows that are equal within an image. Here the beams of an
    image are rows of one query matrix against that image's keys. The arithmetic is the same
    (scores, scale, softmax, weighted sum), so the captions are transformers' own.

    Args:
        attention: the layer's ``crossattention.self`` (a ``BlipTextSelfAttention``).
        image_embeds: the image encoder's output, ``(images, patches, width)``.
        num_beams: beams per image.
    """

    def __init__(self, attention, image_embeds: torch.Tensor, num_beams: int):
        super().__init__()
        self.attention, self.num_beams = attention, num_beams
        heads, size = attention.num_attention_heads, attention.attention_head_size
        shape = (*image_embeds.shape[:-1], heads, size)
        # (images, heads, patches, size), contiguous: every token reads them in one pass per image
        self.keys = attention.key(image_embeds).view(shape).transpose(1, 2).contiguous()
        self.values = attention.value(image_embeds).view(shape).transpose(1, 2).contiguous()

    def forward(self, hidden_states: torch.Tensor, **_unused) -> tuple[torch.Tensor, torch.Tensor]:
        # the images have no padding, so no mask; the cache holds no cross-attention (nothing to re-gather)
        images, heads, patches, size = self.keys.shape
        rows, length, _ = hidden_states.shape  # rows = images x beams, each image's beams together
        query = self.attention.query(hidden_states).view(images, self.num_beams, length, heads, size)
        query = query.permute(0, 3, 1, 2, 4).reshape(images, heads, self.num_beams * length, size)
        scores = torch.matmul(query, self.keys.transpose(-1, -2)) / math.sqrt(size)
        probs = torch.softmax(scores, dim=-1)
        context = torch.matmul(probs, self.values).view(images, heads, self.num_beams, length, size)
        context = context.permute(0, 2, 3, 1, 4).reshape(rows, length, heads * size)
        probs = probs.view(images, heads, self.num_beams, length, patches).transpose(1, 2)
        return context, probs.reshape(rows, heads, length, patches)


@contextlib.contextmanager
def _attend_once_per_image(model, image_embeds: torch.Tensor, num_beams: int) -> Iterator[None]:
    """While the block runs, BLIP's decoder layers attend to the images through :class:`_ImageAttention`."""
    layers = [layer.crossattention for layer in model.text_decoder.bert.encoder.layer]
    originals = [layer.self for layer in layers]
    try:
        for layer, attention in zip(layers, originals):
            layer.self = _ImageAttention(attention, image_embeds, num_beams)
        yield
    finally:
        for layer, attention in zip(layers, originals):
            layer.self = attention


def _generate_ids(model, inputs, *, num_beams: int, **generate_kwargs) -> torch.Tensor:
    """Token ids of BLIP's captions for one batch: what ``BlipForConditionalGeneration.generate``
    returns, with the image attention of :class:`_ImageAttention`."""
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
    with _attend_once_per_image(model, image_embeds, num_beams):
        return model.text_decoder.generate(
            input_ids=input_ids[:, :-1], attention_mask=None if attention_mask is None else attention_mask[:, :-1],
            eos_token_id=text.sep_token_id, pad_token_id=text.pad_token_id, encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device),
            num_beams=num_beams, **generate_kwargs)


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
