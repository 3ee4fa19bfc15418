"""Pivotal tuning: new identifier tokens learned in both text encoders beside the UNet LoRA.

A rare word like "TOK" carries whatever CLIP already knows about it. Pivotal tuning adds new
tokens (``<s0><s1>``) to both tokenizers and learns one input-embedding row per token and
encoder, with the text encoders themselves frozen. Only those rows train: each encoder's
embedding layer is wrapped so that ids past the original vocabulary read from a small fp32
parameter, which is all the optimizer sees (no gradient or optimizer state for the 49 408-row
matrix, and no other row can move). After ``pivotal_freeze_fraction`` of the steps the rows
freeze; the captions are then encoded once into the cache and the text encoders leave memory,
so the rest of the run costs what a run without pivotal tuning costs.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import nn

from lora_helpers.caption.text import identifier_of, identifier_pattern
from lora_helpers.core.embeddings import (PivotalEmbeddings, pivotal_identifier, pivotal_token_count, pivotal_tokens,
                                          pool_at_end_token, save_embeddings)
from lora_helpers.core.run_folder import SUBJECTS_KEY, read_caption_config
from lora_helpers.core.runtime import free_memory, say
from lora_helpers.train.config import TrainConfig
from lora_helpers.train.data import TrainImage

__all__ = ["PivotalEmbedding", "PivotalState", "pivotal_captions", "pivotal_subject_captions",
           "pivotal_identifiers", "pivotal_from_captions", "save_person_embeddings", "add_pivotal_tokens", "freeze_and_cache",
           "live_prompt_kwargs", "encoders_off_gpu"]

_TOKEN_RE = re.compile(r"<s\d+>")
# Noise on the initial rows, as a share of the embedding matrix's spread: enough to tell the
# tokens apart, small enough that "<s0><s1> person" starts out meaning "person".
_INIT_NOISE = 0.1


class PivotalEmbedding(nn.Module):
    """A frozen token embedding plus trainable rows for ids past its vocabulary.

    Args:
        base: the text encoder's token embedding (frozen).
        rows: [N, D] initial embeddings of the new tokens (kept in fp32).
    """

    def __init__(self, base: nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.base = base
        self.first_new = base.num_embeddings
        self.rows = nn.Parameter(rows.detach().float().clone().to(base.weight.device))
        self.num_embeddings = base.num_embeddings + rows.shape[0]
        self.embedding_dim = base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:  # some callers read the embedding matrix's dtype and device
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = ids >= self.first_new
        out = self.base(ids.masked_fill(new, 0))
        if not bool(new.any()):
            return out
        extra = self.rows.to(out.dtype)[(ids - self.first_new).clamp(min=0)]
        return torch.where(new[..., None], extra, out)


@dataclass
class PivotalState:
    """The new tokens of a run and where they are in training.

    Attributes:
        tokens: ``<s0>``, ``<s1>``, ...
        layers: the wrapped embedding layer of each text encoder.
        freeze_step: steps after which the rows stop training.
        frozen: True once they stopped (and the captions were cached).
    """

    tokens: list[str]
    layers: tuple[PivotalEmbedding, PivotalEmbedding]
    freeze_step: int
    frozen: bool = False

    @property
    def params(self) -> list[nn.Parameter]:
        return [layer.rows for layer in self.layers]

    def export(self) -> PivotalEmbeddings:
        """The rows as they are now, for the embedding file."""
        return PivotalEmbeddings(tokens=list(self.tokens), clip_l=self.layers[0].rows.detach().float().cpu(),
                                 clip_g=self.layers[1].rows.detach().float().cpu())

    def load(self, embeddings: PivotalEmbeddings) -> None:
        """Set the rows from a checkpoint's embeddings (same tokens, same widths)."""
        if list(embeddings.tokens) != list(self.tokens):
            raise ValueError(f"the checkpoint's tokens {embeddings.tokens} differ from this run's {self.tokens}")
        with torch.no_grad():
            for layer, rows in zip(self.layers, (embeddings.clip_l, embeddings.clip_g)):
                layer.rows.copy_(rows.to(layer.rows.device, layer.rows.dtype))


def pivotal_captions(images: Sequence[TrainImage], trigger: str, n_tokens: int) -> tuple[list[TrainImage], str]:
    """Captions and trigger with the identifier replaced by the new tokens.

    "a photo of TOK person" becomes "a photo of <s0><s1> person" (whole-word matches only,
    as the caption stage placed it). Captions already written with the tokens
    (``caption --format pivotal``) stay as they are.

    Args:
        images: the training images with their captions.
        trigger: the dataset's trigger phrase ("TOK person", or "<s0><s1> person").
        n_tokens: how many new tokens.

    Returns:
        ``(images, trigger)`` with the new identifier.

    Raises:
        ValueError: the captions were written with another number of tokens.
    """
    new = pivotal_identifier(n_tokens)
    old = identifier_of(trigger)
    if (have := pivotal_token_count(old)):
        if old != new:
            raise ValueError(f"the captions use {old!r} ({have} tokens) but pivotal_tokens={n_tokens}; "
                             f"set pivotal_tokens={have} or caption again")
        return list(images), trigger
    pattern = identifier_pattern(old)
    out = [replace(im, caption=pattern.sub(new, im.caption)) for im in images]
    return out, pattern.sub(new, trigger, count=1)


def pivotal_subject_captions(images: Sequence[TrainImage], subjects: dict[str, dict],
                             n_tokens: int) -> tuple[list[TrainImage], dict[str, dict], int]:
    """Several people: each person's identifier becomes their own new tokens (``<s0><s1>``, ``<s2><s3>``, ...).

    Captions written with new tokens (``caption --format pivotal``) keep theirs; rare-word identifiers
    (TOK1, TOK2) get a block of ``n_tokens`` each, in the order of ``subjects``.

    Args:
        images: the training images, each with its person.
        subjects: person -> {"trigger", ...} (from :func:`lora_helpers.train.data.read_subjects`).
        n_tokens: new tokens per person.

    Returns:
        ``(images, subjects with their new triggers, how many tokens in all)``.

    Raises:
        ValueError: the captions were written with another number of tokens per person.
    """
    out_subjects, replacements, total = {}, {}, 0
    for k, (slug, entry) in enumerate(subjects.items()):
        old = identifier_of(entry["trigger"])
        if (have := pivotal_token_count(old)):
            if have != n_tokens:
                raise ValueError(f"the captions call {slug} {old!r} ({have} tokens) but pivotal_tokens={n_tokens}; "
                                 f"set pivotal_tokens={have} or caption again")
            new = old
        else:
            new = pivotal_identifier(n_tokens, start=n_tokens * k)
        total = max(total, 1 + max(int(t[2:-1]) for t in _TOKEN_RE.findall(new)))
        replacements[slug] = (identifier_pattern(old), new)
        out_subjects[slug] = {**entry, "trigger": identifier_pattern(old).sub(new, entry["trigger"], count=1)}
    out = [replace(im, caption=replacements[im.subject][0].sub(replacements[im.subject][1], im.caption))
           if im.subject in replacements else im for im in images]
    return out, out_subjects, total


def pivotal_identifiers(images: Sequence[TrainImage], trigger: str | None, subjects: dict[str, dict],
                        n_tokens: int) -> tuple[list[TrainImage], str | None, dict[str, dict], int]:
    """``(images, trigger, subjects, tokens in all)`` with the identifiers replaced by new tokens: the one
    person's (:func:`pivotal_captions`), or each person's own (:func:`pivotal_subject_captions`)."""
    if subjects:
        images, subjects, total = pivotal_subject_captions(images, subjects, n_tokens)
        return images, trigger, subjects, total
    images, trigger = pivotal_captions(images, trigger, n_tokens)
    return images, trigger, subjects, n_tokens


def _initial_rows(base: nn.Embedding, tokenizer, init_word: str, n: int, generator: torch.Generator) -> torch.Tensor:
    weight = base.weight.detach()
    ids = [i for i in tokenizer(init_word, add_special_tokens=False).input_ids if i < weight.shape[0]]
    start = weight[ids].float().mean(dim=0) if ids else torch.zeros(weight.shape[1])
    # the spread of the matrix from a sample of rows: the whole fp32 copy would cost 250 MB on the GPU
    sample = torch.randperm(weight.shape[0], generator=generator)[:4096].to(weight.device)
    spread = float(weight[sample].float().std())
    noise = torch.randn(n, weight.shape[1], generator=generator) * spread * _INIT_NOISE
    return start.cpu()[None] + noise


def add_pivotal_tokens(text_encoders: Sequence[nn.Module], tokenizers: Sequence, *, n_tokens: int, init_word: str,
                       seed: int, freeze_step: int) -> PivotalState:
    """Add ``n_tokens`` new tokens to both tokenizers and trainable rows to both text encoders.

    Args:
        text_encoders: SDXL's two text encoders (frozen).
        tokenizers: their tokenizers.
        n_tokens: how many tokens (``<s0>`` ...).
        init_word: the rows start from this word's embedding (the class noun) plus a little noise.
        seed: seeds the noise.
        freeze_step: optimizer steps after which the rows stop training.

    Returns:
        The :class:`PivotalState`.

    Raises:
        ValueError: a tokenizer already has such a token, or its size disagrees with its encoder.
    """
    tokens = pivotal_tokens(n_tokens)
    generator = torch.Generator().manual_seed(seed + 101)
    layers = []
    for encoder, tokenizer in zip(text_encoders, tokenizers):
        base = encoder.get_input_embeddings()
        taken = [t for t in tokens if t in tokenizer.get_vocab()]
        if taken:
            raise ValueError(f"the tokenizer already has {', '.join(taken)}; pivotal tuning needs new tokens")
        if len(tokenizer) != base.num_embeddings:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but its text encoder {base.num_embeddings} "
                             "embeddings; use the model's own tokenizer")
        rows = _initial_rows(base, tokenizer, init_word, n_tokens, generator)
        tokenizer.add_tokens(tokens)
        pool_at_end_token(encoder, tokenizer)
        layer = PivotalEmbedding(base, rows)
        encoder.set_input_embeddings(layer)
        layers.append(layer)
    return PivotalState(tokens=tokens, layers=(layers[0], layers[1]), freeze_step=freeze_step)


def freeze_and_cache(state: PivotalState, cache, text_encoders, tokenizers, *, encode, device,
                     keep_encoders: bool = False, batch_size: int = 8) -> None:
    """Stop training the rows and encode every cached prompt with them, once.

    Args:
        state: the run's pivotal state (marked frozen).
        cache: the :class:`lora_helpers.train.latents.TrainCache`; its prompt embeddings are filled in.
        text_encoders, tokenizers: both of SDXL's, with the new tokens.
        encode: ``encode(text_encoders, tokenizers, prompts, device) -> (embeds, pooled)``.
        device: where the encoders are.
        keep_encoders: the encoders train a LoRA of their own: keep encoding live.
        batch_size: prompts per forward pass.
    """
    for p in state.params:
        p.requires_grad_(False)
        p.grad = None
    state.frozen = True
    if keep_encoders:
        return
    embeds, pooled = [], []
    with torch.no_grad():
        for i in range(0, len(cache.prompts), batch_size):
            pe, pp = encode(text_encoders, tokenizers, cache.prompts[i:i + batch_size], device)
            embeds.append(pe.cpu())
            pooled.append(pp.cpu())
    cache.prompt_embeds, cache.pooled_embeds = torch.cat(embeds), torch.cat(pooled)
    for layer in state.layers:
        layer.base = None  # the encoders are about to go: do not keep their embedding matrices alive here
    free_memory()


def live_prompt_kwargs(text_encoders, tokenizers, prompt: str, negative: str | None, *, encode, device,
                       dtype: torch.dtype) -> dict:
    """Pipeline keyword arguments for a validation prompt, encoded now with the new tokens as they are.

    Args:
        text_encoders, tokenizers: both of SDXL's, with the new tokens.
        prompt, negative: the prompt and negative prompt (None: none).
        encode: ``encode(text_encoders, tokenizers, prompts, device) -> (embeds, pooled)``.
        device, dtype: where and in which dtype the pipeline runs.

    Returns:
        ``prompt_embeds`` and ``pooled_prompt_embeds`` (and the negative ones when ``negative`` is given).
    """
    with torch.no_grad():
        pe, pooled = encode(text_encoders, tokenizers, [prompt], device)
        kwargs = {"prompt_embeds": pe.to(dtype), "pooled_prompt_embeds": pooled.to(dtype)}
        if negative:
            ne, npooled = encode(text_encoders, tokenizers, [negative], device)
            kwargs.update(negative_prompt_embeds=ne.to(dtype), negative_pooled_prompt_embeds=npooled.to(dtype))
    return kwargs


@contextlib.contextmanager
def encoders_off_gpu(text_encoders: Sequence, device: torch.device) -> Iterator[None]:
    """On a GPU, keep frozen text encoders in host RAM for the duration (validation images).

    The 8 GB plan has no room for both encoders and an image's activations at once; the prompts
    are encoded before, so the encoders are not needed meanwhile.
    """
    encoders = [te for te in text_encoders if te is not None]
    if device.type != "cuda" or not encoders:
        yield
        return
    for te in encoders:
        te.to("cpu")
    torch.cuda.empty_cache()
    try:
        yield
    finally:
        for te in encoders:
            te.to(device)


def pivotal_from_captions(cfg: TrainConfig, dataset_dir: Path) -> TrainConfig:
    """Captions written with new tokens (``caption --format pivotal``) train them, whatever the config says.

    Raises:
        ValueError: the config asks for another number of tokens (per person) than the captions carry.
    """
    if not dataset_dir.is_dir():
        return cfg
    caption_cfg = read_caption_config(dataset_dir)
    people = caption_cfg.get(SUBJECTS_KEY)
    phrases = ([str(p.get("trigger") or "") for p in people.values() if isinstance(p, dict)]
               if isinstance(people, dict) and people else [str(cfg.trigger or caption_cfg.get("trigger") or "")])
    counts = {pivotal_token_count(p.split()[0]) for p in phrases if p.split()}
    identifier = phrases[0].split()[0] if phrases and phrases[0].split() else ""
    n = counts.pop() if len(counts) == 1 else 0  # a mix of tokens and words is refused when the data is read
    if n and cfg.pivotal_tokens != n:
        if cfg.pivotal_tokens:
            raise ValueError(f"the captions use {n} new tokens ({identifier}) but pivotal_tokens={cfg.pivotal_tokens}; "
                             f"set pivotal_tokens={n} (--pivotal {n}) or caption again")
        say(f"the captions use new tokens {identifier}: training them (pivotal_tokens={n})")
        cfg = replace(cfg, pivotal_tokens=n)
    return cfg


def save_person_embeddings(folder: Path, embeddings: PivotalEmbeddings, subjects: dict[str, dict]) -> list[Path]:
    """One embedding file per person, ``embeddings/<name>.safetensors``, for several people.

    AUTOMATIC1111 and ComfyUI read an embedding file as one word (its stem): the combined file beside
    the LoRA would call everyone at once, so each person gets a file with only their own tokens.

    Args:
        folder: the run folder.
        embeddings: every new token's rows.
        subjects: person -> {"trigger", ...} ({}: one person, nothing to write).

    Returns:
        The files written.
    """
    out = []
    for slug, entry in subjects.items():
        mine = _TOKEN_RE.findall(identifier_of(entry["trigger"]))
        rows = [embeddings.tokens.index(t) for t in mine if t in embeddings.tokens]
        if not rows:
            continue
        person = PivotalEmbeddings(tokens=mine, clip_l=embeddings.clip_l[rows], clip_g=embeddings.clip_g[rows])
        out.append(save_embeddings(folder / "embeddings" / f"{slug}.safetensors", person, trigger=entry["trigger"]))
    return out
