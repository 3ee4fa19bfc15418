"""Pivotal-tuning token embeddings: their token names and the one file format that carries them.

Pivotal tuning adds new tokens (``<s0>``, ``<s1>``, ...) to both SDXL tokenizers and learns an
input embedding for each in both text encoders. The file is SDXL's embedding format: one
safetensors file with ``clip_l`` [N, 768] (first text encoder) and ``clip_g`` [N, 1280] (second).
AUTOMATIC1111, Forge and ComfyUI read it as an embedding named after the file; diffusers loads it
with ``pipe.load_textual_inversion(file["clip_l"], token=[...], text_encoder=pipe.text_encoder,
tokenizer=pipe.tokenizer)`` and the same for ``clip_g`` / ``text_encoder_2`` (:func:`load_embeddings`
does exactly that). The token names travel in the file's metadata.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file

from lora_helpers.core.fileio import atomic_path

__all__ = [
    "EMBEDDING_SUFFIX",
    "PivotalEmbeddings",
    "EmbeddingFileError",
    "pivotal_tokens",
    "pivotal_identifier",
    "pivotal_token_count",
    "embedding_file_name",
    "find_embedding_file",
    "save_embeddings",
    "read_embeddings",
    "load_embeddings",
    "unload_embeddings",
    "pool_at_end_token",
]

EMBEDDING_SUFFIX = "_emb.safetensors"
# The keys every SDXL embedding file has, with the width of each text encoder's embeddings in SDXL
# (other models of the same architecture, such as the tiny test models, are narrower).
_KEYS = {"clip_l": 768, "clip_g": 1280}
_TOKEN = re.compile(r"<s\d+>")
_IDENTIFIER = re.compile(r"(?:<s\d+>)+")


class EmbeddingFileError(ValueError):
    """An embedding file that cannot be used (named, with the reason and what to do)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path, self.reason = Path(path), reason
        super().__init__(f"{path}: {reason}")


def pivotal_tokens(n: int, start: int = 0) -> list[str]:
    """The names of ``n`` new tokens: ``<s0>``, ``<s1>``, ... (as diffusers' advanced SDXL script and cog-sdxl).

    Args:
        n: how many.
        start: the first number (several people: ``<s2><s3>`` for the second of two tokens each).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of pivotal tokens must be a whole number of at least 1 (e.g. 2), not {n!r}")
    return [f"<s{i}>" for i in range(start, start + n)]


def pivotal_identifier(n: int, start: int = 0) -> str:
    """The identifier the captions carry for ``n`` new tokens: ``"<s0><s1>"`` (one word, no spaces)."""
    return "".join(pivotal_tokens(n, start))


def pivotal_token_count(identifier: str) -> int:
    """How many new tokens an identifier is made of: 2 for ``"<s0><s1>"``, 0 for a word such as ``"TOK"``."""
    return len(_TOKEN.findall(identifier)) if _IDENTIFIER.fullmatch(identifier or "") else 0


def embedding_file_name(output_name: str) -> str:
    """``<output_name>_emb.safetensors``: in A1111/ComfyUI the file's stem is the word that calls it."""
    return f"{output_name}{EMBEDDING_SUFFIX}"


def find_embedding_file(folder: str | os.PathLike) -> Path | None:
    """The embedding file of a run or checkpoint folder, or None when it has none.

    Raises:
        EmbeddingFileError: the folder holds several (which one belongs to the LoRA is unclear).
    """
    found = sorted(Path(folder).glob(f"*{EMBEDDING_SUFFIX}"))
    if len(found) > 1:
        raise EmbeddingFileError(folder, f"holds {len(found)} embedding files ({', '.join(p.name for p in found)}); "
                                         "keep the one that belongs to this LoRA")
    return found[0] if found else None


@dataclass
class PivotalEmbeddings:
    """Learned embeddings of the new tokens.

    Attributes:
        tokens: their names, in order (``<s0>``, ``<s1>``).
        clip_l: [N, 768] for the first text encoder.
        clip_g: [N, 1280] for the second.
    """

    tokens: list[str]
    clip_l: torch.Tensor
    clip_g: torch.Tensor

    @property
    def identifier(self) -> str:
        return "".join(self.tokens)


def save_embeddings(path: str | os.PathLike, embeddings: PivotalEmbeddings, *, trigger: str | None = None) -> Path:
    """Write the embeddings atomically in SDXL's embedding format (fp32 ``clip_l`` / ``clip_g``).

    Args:
        path: the file (``<name>_emb.safetensors``).
        embeddings: what to write.
        trigger: the phrase the captions used ("<s0><s1> person"), kept in the metadata.

    Returns:
        The file.
    """
    path = Path(path)
    tensors = {"clip_l": embeddings.clip_l.detach().float().cpu().contiguous(),
               "clip_g": embeddings.clip_g.detach().float().cpu().contiguous()}
    metadata = {"tokens": ",".join(embeddings.tokens), "format": "sdxl-embedding"}
    if trigger:
        metadata["trigger"] = trigger
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_embeddings(path: str | os.PathLike) -> PivotalEmbeddings:
    """Read and check an embedding file.

    Args:
        path: a ``clip_l`` / ``clip_g`` safetensors file (ours, or one made by another trainer).

    Returns:
        The embeddings; files without our token list get ``<s0>``, ``<s1>``, ... for their rows.

    Raises:
        EmbeddingFileError: unreadable, a missing key, a wrong width, rows that disagree in number,
            or NaN/inf values.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys, metadata = set(f.keys()), f.metadata() or {}
            missing = [k for k in _KEYS if k not in keys]
            if missing:
                raise EmbeddingFileError(path, f"no {' or '.join(missing)} tensor (keys: {', '.join(sorted(keys)) or 'none'}); "
                                               "an SDXL embedding file holds clip_l and clip_g")
            tensors = {k: f.get_tensor(k).float() for k in _KEYS}
    except (SafetensorError, OSError) as exc:
        raise EmbeddingFileError(path, f"not a readable safetensors file ({exc}); copy it again") from exc
    for key, width in _KEYS.items():
        t = tensors[key]
        if t.dim() == 1:
            tensors[key] = t = t[None]
        if t.dim() != 2 or t.shape[0] < 1:
            raise EmbeddingFileError(path, f"{key} has shape {tuple(t.shape)}; an SDXL embedding is [N, {width}]")
        if not torch.isfinite(t).all():
            raise EmbeddingFileError(path, f"{key} holds NaN or inf values; use an earlier checkpoint's file")
    n = tensors["clip_l"].shape[0]
    if tensors["clip_g"].shape[0] != n:
        raise EmbeddingFileError(path, f"clip_l has {n} rows but clip_g {tensors['clip_g'].shape[0]}; the file is damaged")
    tokens = [t for t in metadata.get("tokens", "").split(",") if t] or pivotal_tokens(n)
    if len(tokens) != n:
        raise EmbeddingFileError(path, f"metadata names {len(tokens)} tokens for {n} rows; the file is damaged")
    return PivotalEmbeddings(tokens=tokens, clip_l=tensors["clip_l"], clip_g=tensors["clip_g"])


def pool_at_end_token(encoder, tokenizer) -> None:
    """Make a CLIP text encoder take its pooled output at the end-of-text token, whatever ids were added.

    SDXL's configs carry ``eos_token_id = 2``, a legacy value with which transformers pools at the
    *highest* token id. Without added tokens that is the end-of-text token (49407, the last id);
    with ``<s0><s1>`` added (ids 49408, 49409) it would be the new token instead, and the pooled
    embedding (SDXL's second conditioning) would differ from what ComfyUI and AUTOMATIC1111 compute,
    which pool at the end-of-text token. Setting the real id makes all of them agree.
    """
    if tokenizer.eos_token_id is None:
        return
    encoder.config.eos_token_id = tokenizer.eos_token_id
    for module in encoder.modules():  # the model itself in transformers 5, its .text_model before
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = tokenizer.eos_token_id


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as tlog

    old = tlog.get_verbosity()
    tlog.set_verbosity_error()
    try:
        yield
    finally:
        tlog.set_verbosity(old)


def load_embeddings(pipe, embeddings: PivotalEmbeddings | str | os.PathLike) -> PivotalEmbeddings:
    """Put the tokens and their embeddings into both text encoders of an SDXL pipeline.

    The first time, through diffusers' ``load_textual_inversion`` (new tokens, larger embedding
    matrix); when the tokens are already there (another checkpoint of the same run), their rows
    are overwritten in place, so switching checkpoints never grows the vocabulary.

    Args:
        pipe: an SDXL pipeline with both text encoders and tokenizers.
        embeddings: embeddings, or an embedding file.

    Returns:
        The embeddings now active.

    Raises:
        EmbeddingFileError: see :func:`read_embeddings`, or embeddings of another width than the encoders'.
    """
    source = embeddings
    if not isinstance(embeddings, PivotalEmbeddings):
        embeddings = read_embeddings(embeddings)
    for name, rows, encoder in (("clip_l", embeddings.clip_l, pipe.text_encoder),
                                ("clip_g", embeddings.clip_g, pipe.text_encoder_2)):
        width = encoder.get_input_embeddings().weight.shape[1]
        if rows.shape[1] != width:
            where = source if not isinstance(source, PivotalEmbeddings) else "embeddings"
            raise EmbeddingFileError(where, f"{name} rows are {rows.shape[1]} wide but this pipeline's text encoder "
                                            f"takes {width}; the embeddings were trained for another model")
    pairs = ((pipe.tokenizer, pipe.text_encoder, embeddings.clip_l),
             (pipe.tokenizer_2, pipe.text_encoder_2, embeddings.clip_g))
    for tokenizer, encoder, rows in pairs:
        vocab = tokenizer.get_vocab()
        if all(t in vocab for t in embeddings.tokens):
            weight = encoder.get_input_embeddings().weight
            with torch.no_grad():
                for token, row in zip(embeddings.tokens, rows):
                    weight[vocab[token]] = row.to(weight.device, weight.dtype)
        else:
            with _quiet_transformers():  # "new embeddings will be initialized from ..." (they are overwritten)
                pipe.load_textual_inversion(rows, token=list(embeddings.tokens), text_encoder=encoder,
                                            tokenizer=tokenizer)
        pool_at_end_token(encoder, tokenizer)
    return embeddings


def unload_embeddings(pipe, tokens: list[str]) -> None:
    """Remove the tokens from both tokenizers and text encoders (back to the base model's vocabulary).

    Args:
        pipe: an SDXL pipeline the tokens were loaded into with :func:`load_embeddings`.
        tokens: their names.
    """
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        present = [t for t in tokens if t in tokenizer.get_vocab()]
        if present:
            pipe.unload_textual_inversion(tokens=present, tokenizer=tokenizer, text_encoder=encoder)
