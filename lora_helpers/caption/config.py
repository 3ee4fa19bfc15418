"""Settings of the caption stage (:class:`CaptionConfig`) and the phrase that stands for the person."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from lora_helpers.core.embeddings import pivotal_identifier, pivotal_tokens
from lora_helpers.core.run_folder import DEFAULT_CLASS_NOUN, DEFAULT_TOKEN

__all__ = ["CaptionConfig", "SUBJECT_SETTINGS", "parse_subject_settings", "subject_phrase"]

SUBJECT_SETTINGS = ("token", "class_noun", "name")  # what CaptionConfig.subjects may set per person
_TOKEN = re.compile(r"[A-Za-z0-9_]+")


def parse_subject_settings(value) -> dict[str, dict[str, str]]:
    """Per-person identifier settings from a mapping or a form field's text.

    Args:
        value: ``{"ada": {"token": "ADA", "class_noun": "woman"}}``, or text such as
            ``"ada: ADA woman; grace: GRACE"`` (person: token [class noun [name]]); None or "" for none.

    Returns:
        ``{person: {"token": ..., "class_noun": ..., "name": ...}}`` with only the keys given.

    Raises:
        ValueError: an entry that cannot be read, an unknown key, or a token that is not one word.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    if isinstance(value, str):
        parsed = {}
        for part in filter(str.strip, re.split(r"[;\n]", value)):
            who, sep, rest = part.partition(":")
            words = rest.split()
            if not sep or not words:
                raise ValueError(f"subjects: cannot read {part.strip()!r}; write 'person: TOKEN [class noun [name]]', "
                                 "entries separated by ';', e.g. 'ada: ADA woman; grace: GRACE woman'")
            parsed[who] = dict(zip(SUBJECT_SETTINGS, words[:2] + ([" ".join(words[2:])] if words[2:] else [])))
        value = parsed
    if not isinstance(value, dict):
        raise ValueError(f"subjects must map each person to their token and class noun, got {type(value).__name__}")
    out = {}
    for who, settings in value.items():
        if not isinstance(settings, dict) or not set(settings) <= set(SUBJECT_SETTINGS):
            raise ValueError(f"subjects[{who!r}]: expected a mapping with {', '.join(SUBJECT_SETTINGS)}, got {settings!r}")
        token = settings.get("token")
        if token is not None and not _TOKEN.fullmatch(str(token)):
            raise ValueError(f"subjects[{who!r}]: token {token!r}: use one word of letters/digits, e.g. 'ADA' or 'sks'")
        out[_slug(who)] = {k: str(v) for k, v in settings.items() if v not in (None, "")}
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).strip().lower()).strip("_")


@dataclass
class CaptionConfig:
    """Settings of the caption stage.

    Attributes:
        model: BLIP hub id or local folder; "base" / "large" pick Salesforce's models;
            None takes :func:`lora_helpers.core.config.resolve_models` (tiny model in smoke mode).
        token: the rare word that becomes the person ("TOK", "sks", "ohwx").
        class_noun: what the person is ("person", "man", "woman"); keeps the prior.
        name: optional name after the class noun ("TOK person Ada").
        identifier_format: "tok" -> "TOK person [name]"; "at" -> "@name" (or "@tok"); "pivotal" ->
            "<s0><s1> person [name]": new tokens that training adds to both text encoders and learns
            (pivotal tuning), instead of a word CLIP already has a meaning for.
        pivotal_tokens: how many new tokens the "pivotal" format uses.
        template: how subject and BLIP's description combine; needs ``{subject}``.
        batch_size: images per BLIP forward pass.
        num_beams: beam search width (1 = greedy); never sampling, so runs repeat.
        max_new_tokens: caption length bound.
        min_new_tokens: at least this many words-pieces, so captions describe something.
        repetition_penalty: >1 keeps BLIP from looping ("a man man man").
        prompt: optional text BLIP continues (conditional captioning, e.g. "a picture of").
        overwrite: re-caption images that already have a caption (hand edits are lost, and
            so are unreadable or conflicting captions).
        device: None picks CUDA when present, else CPU.
        subjects: for a dataset of several people, each person's token, class noun and name
            (``{"ada": {"token": "ADA", "class_noun": "woman"}}`` or ``"ada: ADA woman; grace: GRACE"``);
            people not named get ``token`` with a number ("TOK1", "TOK2") and ``class_noun``.
    """

    model: str | None = None
    token: str = DEFAULT_TOKEN
    class_noun: str = DEFAULT_CLASS_NOUN
    name: str | None = None
    identifier_format: Literal["tok", "at", "pivotal"] = "tok"
    pivotal_tokens: int = 2
    template: str = "a photo of {subject}, {caption}"
    batch_size: int = 8
    num_beams: int = 3
    max_new_tokens: int = 40
    min_new_tokens: int = 5
    repetition_penalty: float = 1.3
    prompt: str | None = None
    overwrite: bool = False
    device: str | None = None
    subjects: dict | str | None = None

    def __post_init__(self) -> None:
        self.subjects = parse_subject_settings(self.subjects) or None
        if self.identifier_format not in ("tok", "at", "pivotal"):
            raise ValueError(f"identifier_format must be 'tok', 'at' or 'pivotal', not {self.identifier_format!r}")
        if self.identifier_format == "pivotal":
            pivotal_tokens(self.pivotal_tokens)  # raises for a count below 1
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.token or ""):
            raise ValueError(f"token {self.token!r}: use one word of letters/digits, e.g. 'TOK' or 'sks'")
        if "{subject}" not in self.template:
            raise ValueError(f"template {self.template!r} needs '{{subject}}', where the identifier goes")
        if self.batch_size < 1 or self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size, num_beams and max_new_tokens must be at least 1")


def subject_phrase(config: CaptionConfig) -> str:
    """The phrase that stands for the person in every caption.

    Args:
        config: the caption settings (token, class noun, name, identifier format).

    Returns:
        "TOK person", "TOK person Ada" (format "tok"), or "@ada" / "@tok" (format "at").
    """
    if config.identifier_format == "pivotal":
        return " ".join(p for p in (pivotal_identifier(config.pivotal_tokens), config.class_noun,
                                    (config.name or "").strip()) if p)
    if config.identifier_format == "at":
        return "@" + (_slug(config.name) if config.name and _slug(config.name) else config.token.lower())
    return " ".join(p for p in (config.token, config.class_noun, (config.name or "").strip()) if p)

