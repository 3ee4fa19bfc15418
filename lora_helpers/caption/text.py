"""Caption text: the identifier, BLIP clean-up, and CLIP token counts.

Pure string work (no model), shared by the caption stage, its editor and the trainer's
checks. The identifier is matched on word boundaries, case-insensitively as CLIP reads
it: "TOK" never matches inside "tokyo".
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

from lora_helpers.core.config import resolve_models
from lora_helpers.core.embeddings import pivotal_token_count

__all__ = [
    "CLIP_MAX_TOKENS",
    "COMMON_WORDS",
    "identifier_of",
    "identifier_pattern",
    "count_identifier",
    "standardise_caption",
    "load_clip_tokenizer",
    "clip_token_count",
    "check_identifier",
]

# CLIP's context: 75 text tokens plus begin/end. SDXL silently drops what is beyond it.
CLIP_MAX_TOKENS = 77
_PLACEHOLDER = "\x00SUBJECT\x00"

# Words a model already has a strong meaning for: as an identifier they would drag that
# meaning into the person (and collide with captions). Not exhaustive; names are fine.
COMMON_WORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just me more most
    my myself no nor not now of off on once only or other our ours out over own same she should so some
    such than that the their them then there these they this those through to too under until up very
    was we were what when where which while who whom why will with would you your yours
    man men woman women person people boy girl child kid baby lady guy gentleman face head hair eye eyes
    photo photograph picture image portrait selfie painting drawing art style camera light dark
    red blue green white black yellow orange pink purple brown gray grey gold silver
    old new young big small long short good bad best top high low new first last one two three
    day night home house room city street park beach car dog cat tree water sky sun moon star
    love life time world year way thing work word name king queen god angel baby doll model star
    wearing standing sitting smiling looking holding posing suit shirt dress hat glasses
    """.split()
)

# What BLIP calls the subject; the first such phrase becomes the identifier. Age words
# go with it ("a young boy" -> "TOK person"), other adjectives stay ("a smiling TOK person").
_SUBJECT_NOUNS = (
    "man|woman|person|boy|girl|lady|guy|gentleman|child|kid|teenager|teen|adult|individual|baby|toddler|"
    "businessman|businesswoman"
)
_AGE_WORDS = r"young|old|older|elderly|middle[- ]aged|little|small|teenage|grown|adult"
_SUBJECT_RE = re.compile(
    rf"\b(?:(?:a|an|the|one)\s+)?(?:(?:{_AGE_WORDS})\s+){{0,2}}(?:{_SUBJECT_NOUNS})\b(?P<poss>'s)?",
    re.IGNORECASE,
)
# "arafed", "araffe", "arafe", "arrafed", ...: BLIP's hallucinated word for "a person".
_ARAFED_RE = re.compile(r"\bar{1,2}af{1,2}(?:e|ed|d|ly|y|fe)?\b", re.IGNORECASE)
_LEAD_RE = re.compile(
    r"^(?:there\s+(?:is|are)|this\s+is|it\s+is|here\s+is|"
    r"(?:(?:a|an|the)\s+)?(?:photo|photograph|photography|picture|image|pic|stock\s+photo)\s+of)\s+",
    re.IGNORECASE,
)
# Left dangling when generation stops at max_new_tokens ("standing in front of a").
_TRAIL_RE = re.compile(r"(?:[\s,;:-]+|\b(?:a|an|the|and|or|of|in|on|with|at|to|for|by|from|is|are)\s*)+$",
                       re.IGNORECASE)
_REPEAT_RE = re.compile(r"\b(\w+(?:\s+\w+){0,2})(?:\s+\1\b)+", re.IGNORECASE)


def identifier_of(subject: str) -> str:
    """The unique word inside a subject phrase: "TOK" of "TOK person", "@ada" of "@ada"."""
    return subject.split()[0]


def identifier_pattern(identifier: str) -> re.Pattern:
    """Regex for ``identifier`` as a whole word, case-insensitive ("@ada" too, where \\b fails)."""
    return re.compile(rf"(?<![\w@]){re.escape(identifier)}(?!\w)", re.IGNORECASE)


def count_identifier(text: str, identifier: str) -> int:
    """How often ``identifier`` occurs in ``text`` as a whole word (case-insensitive, as CLIP)."""
    return len(identifier_pattern(identifier).findall(text))


# --------------------------------------------------------------------------- standardisation


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"\s+([,.;:!?])", r"\1", text)
    text = re.sub(r"([,;:])(?:\s*[,;:])+", r"\1", text)
    text = re.sub(r"^[\s,;:.-]+", "", text)
    return re.sub(r"[\s,;:-]+$", "", text).strip()


def _render(template: str, subject: str, caption: str) -> str:
    # str.replace, not str.format: a caption or template may contain braces.
    return _tidy(template.replace("{subject}", subject).replace("{caption}", caption))


def _clean_blip(text: str) -> str:
    """BLIP's artefacts out: word pieces, "arafed", lead-ins, repeats, dangling words."""
    text = re.sub(r"\[(?:UNK|SEP|CLS|PAD|MASK|DEC)\]|##\w*", " ", text)
    text = _ARAFED_RE.sub(" ", text)
    text = _tidy(text)
    previous = None
    while previous != text:
        previous = text
        text = _REPEAT_RE.sub(r"\1", text)
        text = _tidy(_LEAD_RE.sub("", text))
        text = _tidy(_TRAIL_RE.sub("", text))
    return text


def standardise_caption(
    raw: str,
    *,
    subject: str,
    template: str = "a photo of {subject}, {caption}",
    identifier: str | None = None,
    forbidden: Sequence[str] = (),
) -> str:
    """Turn a raw BLIP caption into a training caption with the subject exactly once.

    The first generic subject phrase ("a woman", "arafed man", "a young boy's") is replaced
    by ``subject``; the whole sentence then takes the template's ``{subject}`` slot, so
    "a woman with long hair smiling" becomes "a photo of TOK person with long hair smiling".
    Without such a phrase the template adds the subject ("a photo of TOK person, a view
    of a city"). Stray copies of the identifier in BLIP's text are removed, on word
    boundaries only ("tokyo" stays).

    Args:
        raw: BLIP's caption.
        subject: the subject phrase, e.g. "TOK person" or "@ada".
        template: contains ``{subject}`` and usually ``{caption}``.
        identifier: the word that must occur once (default: first word of ``subject``).
        forbidden: identifiers of the dataset's other people: removed from BLIP's text, and
            refused in the template, so a caption never names someone else.

    Returns:
        The caption.

    Raises:
        ValueError: when the template itself already contains the identifier or has no
            ``{subject}``.
    """
    if "{subject}" not in template:
        raise ValueError(f"template {template!r} needs '{{subject}}'")
    identifier = identifier or identifier_of(subject)
    for word in (identifier, *forbidden):
        if count_identifier(template.replace("{subject}", " ").replace("{caption}", " "), word):
            raise ValueError(f"template {template!r} already contains the identifier {word!r}; remove it")
    text = _clean_blip(raw)
    # Mark the subject before removing stray identifiers, so a word-like identifier
    # ("man") cannot eat the very phrase it replaces.
    text, found = _SUBJECT_RE.subn(lambda m: _PLACEHOLDER + (m.group("poss") or ""), text, count=1)
    # BLIP's "there is a man that is standing" -> "TOK person standing".
    text = re.sub(rf"{_PLACEHOLDER}\s+(?:that|who)\s+(?:is|are)\b", _PLACEHOLDER, text)
    for word in (identifier, *forbidden):
        text = identifier_pattern(word).sub(" ", text)
    text = _clean_blip(text)
    if found:
        out = _render(template, text.replace(_PLACEHOLDER, subject), "")
    else:
        out = _render(template, subject, text)
    if count_identifier(out, identifier) != 1:  # only a subject that repeats its identifier gets here
        raise ValueError(f"subject {subject!r} gives {count_identifier(out, identifier)} copies of {identifier!r}")
    if any(count_identifier(out, word) for word in forbidden):  # a subject phrase naming another person
        raise ValueError(f"subject {subject!r} contains another person's identifier ({', '.join(forbidden)})")
    return out


# --------------------------------------------------------------------------- CLIP tokens


def load_clip_tokenizer(model: str | None = None, *, download: bool = False):
    """The SDXL (CLIP) tokenizer for token counts, or None when it is not at hand.

    Args:
        model: SDXL id or folder; None takes ``resolve_models().sdxl`` (the tiny local
            model in smoke mode).
        download: fetch the tokenizer's files (about 1.5 MB) from the hub when ``model`` is
            a hub id. Without it only a local folder or the local hub cache is used, so an
            offline machine never waits on the network.

    Returns:
        A ``CLIPTokenizer``, or None (callers then use a rough estimate).
    """
    # transformers is slow to import; only the token counts need the tokenizer.
    from transformers import CLIPTokenizer

    if model is None:
        model = resolve_models().sdxl
    try:
        if Path(model).exists():
            folder = Path(model) / "tokenizer"
            if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
                return None
        else:
            from huggingface_hub import hf_hub_download  # only a hub id needs it

            # Fetch the files explicitly: from_pretrained without them quietly builds an
            # empty tokenizer instead of failing.
            files = [hf_hub_download(model, f"tokenizer/{name}", local_files_only=not download)
                     for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")]
            folder = Path(files[0]).parent
        return CLIPTokenizer.from_pretrained(folder)
    except Exception:  # not cached, offline, or not a CLIP tokenizer: estimate instead
        return None


def clip_token_count(text: str, tokenizer=None) -> int:
    """Number of CLIP tokens of ``text``, begin and end tokens included.

    Args:
        text: a caption or prompt.
        tokenizer: a CLIP tokenizer; None gives a rough estimate: one token per common word
            (:data:`COMMON_WORDS`), one per four letters of other words, one per digit or
            punctuation mark. It errs high for long ordinary words ("building" counts 2, CLIP
            has 1), the safe side for a length warning.
    """
    if tokenizer is not None:
        return len(tokenizer(text, truncation=False, verbose=False)["input_ids"])
    count = 2
    for piece in re.findall(r"[A-Za-z]+|\d|[^\sA-Za-z\d]", text):
        count += 1 if not piece.isalpha() or piece.lower() in COMMON_WORDS else max(1, math.ceil(len(piece) / 4))
    return count


def check_identifier(subject: str, tokenizer=None) -> list[str]:
    """Warnings about an identifier that would learn badly.

    Args:
        subject: the subject phrase ("TOK person") or the identifier alone.
        tokenizer: CLIP tokenizer for the token count; None uses the rough estimate.

    Returns:
        Messages (empty when the identifier looks fine).
    """
    identifier = identifier_of(subject)
    if pivotal_token_count(identifier):
        return []  # new tokens: training adds them, CLIP has no meaning for them yet (the point)
    word = identifier.lstrip("@").lower()
    out = []
    if word in COMMON_WORDS or re.sub(r"s$", "", word) in COMMON_WORDS:
        out.append(f"identifier {identifier!r} is a common word: the model already means something by it and "
                   "captions may contain it; pick a rare token such as 'sks', 'ohwx' or 'zwx'")
    n = clip_token_count(identifier, tokenizer) - 2
    if n > 3:
        how = "" if tokenizer is not None else " (estimated; no CLIP tokenizer at hand)"
        out.append(f"identifier {identifier!r} splits into {n} CLIP tokens{how}; use a short rare word (1-3 tokens)")
    return out
