"""One identifier per person in a dataset of several people ("TOK1 person", "TOK2 person").

Prepare names each photo's person in its ``metadata.jsonl`` row (``"subject": "ada"``). Each
person gets their own identifier, and each caption carries its own person's identifier exactly
once and never another person's: training ties each identifier to one face only when no caption
mixes them. By default the identifiers are the token with a number (``TOK1``, ``TOK2``, in the
order of the people's names); ``CaptionConfig.subjects`` chooses a person's token, class noun and
name (``{"ada": {"token": "ADA", "class_noun": "woman"}}``, or the text ``"ada: ADA woman;
grace: GRACE woman"``). Numbers already given in ``caption_config.json`` are kept, so adding a
person never renames another (their kept captions would otherwise name the wrong identifier).

Identifiers that share CLIP tokens ("TOK1" and "TOK2" both start with the token "tok") start
training with the same meaning, and the people tend to blend; :func:`shared_token_warnings`
says so. Pivotal tokens for several people are not supported yet and are refused.
"""

from __future__ import annotations

import dataclasses
import re
from itertools import combinations

from lora_helpers.caption.text import identifier_of
from lora_helpers.core.run_folder import SUBJECT_FIELD, SUBJECTS_KEY

__all__ = ["SUBJECT_SETTINGS", "parse_subject_settings", "dataset_subjects", "subject_phrases",
           "shared_token_warnings"]

SUBJECT_SETTINGS = ("token", "class_noun", "name")  # what CaptionConfig.subjects may set per person
_TOKEN = re.compile(r"[A-Za-z0-9_]+")


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", str(text).strip().lower()).strip("_")


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


def dataset_subjects(rows: list[dict | None]) -> list[str]:
    """The people named in ``metadata.jsonl`` rows, sorted; [] for a one-person dataset."""
    return sorted({str(row[SUBJECT_FIELD]) for row in rows if row and row.get(SUBJECT_FIELD)})


def subject_phrases(config, people: list[str], previous: dict, phrase) -> dict[str, dict[str, str]]:
    """Each person's identifier settings and phrase: the ``"subjects"`` map of ``caption_config.json``.

    Args:
        config: the :class:`~lora_helpers.caption.stage.CaptionConfig` (token, class noun, format,
            per-person ``subjects``).
        people: the dataset's people (:func:`dataset_subjects`).
        previous: the last ``caption_config.json`` (its ``"subjects"`` keep each person's number).
        phrase: ``subject_phrase(config) -> str`` of the caption stage.

    Returns:
        ``{person: {"trigger": "TOK1 person", "token": "TOK1", "class_noun": "person"[, "name": ...]}}``.

    Raises:
        ValueError: pivotal tokens, settings for a person the dataset does not have, or two people
            given the same identifier.
    """
    if config.identifier_format == "pivotal":
        raise ValueError("pivotal tokens for several people are not supported yet: use identifier_format 'tok' "
                         "(TOK1 person, TOK2 person) or 'at' for a dataset of several people")
    chosen = parse_subject_settings(config.subjects)
    unknown = sorted(set(chosen) - set(people))
    if unknown:
        raise ValueError(f"subjects names {', '.join(unknown)}, but the dataset's people are {', '.join(people)} "
                         "(from metadata.jsonl); use those names")
    earlier = previous.get(SUBJECTS_KEY) if isinstance(previous.get(SUBJECTS_KEY), dict) else {}
    numbered = re.compile(rf"{re.escape(config.token)}(\d+)")
    kept = {who: int(m.group(1)) for who, s in earlier.items()
            if who in people and isinstance(s, dict) and (m := numbered.fullmatch(str(s.get("token", ""))))}
    free = (n for n in range(1, len(people) + len(kept) + 2) if n not in kept.values())
    out = {}
    for who in people:
        settings = {"token": f"{config.token}{kept[who] if who in kept else next(free)}",
                    "class_noun": config.class_noun, "name": None, **chosen.get(who, {})}
        trigger = phrase(dataclasses.replace(config, subjects=None, **settings))
        out[who] = {"trigger": trigger, **{k: v for k, v in settings.items() if v}}
    by_identifier: dict[str, str] = {}
    for who, s in out.items():
        ident = identifier_of(s["trigger"]).lower()
        if ident in by_identifier:
            raise ValueError(f"{by_identifier[ident]} and {who} would both be called {identifier_of(s['trigger'])!r}; "
                             "give each person their own token in subjects")
        by_identifier[ident] = who
    return out


def _pieces(identifier: str, tokenizer) -> set[str]:
    if tokenizer is not None:
        ids = tokenizer(identifier, add_special_tokens=False)["input_ids"]
        return set(tokenizer.convert_ids_to_tokens(ids))
    return set(re.findall(r"[a-z]+|\d+", identifier.lower().lstrip("@")))


def shared_token_warnings(identifiers: dict[str, str], tokenizer=None) -> list[str]:
    """Warnings for pairs of people whose identifiers share CLIP tokens.

    Args:
        identifiers: ``{person: identifier}`` ("TOK1").
        tokenizer: the CLIP tokenizer; None compares letter and digit runs instead (an estimate).

    Returns:
        One message per pair that shares a token.
    """
    pieces = {who: _pieces(ident, tokenizer) for who, ident in identifiers.items()}
    how = "" if tokenizer is not None else " (estimated; no CLIP tokenizer at hand)"
    out = []
    for a, b in combinations(identifiers, 2):
        shared = sorted(pieces[a] & pieces[b])
        if shared:
            out.append(f"the identifiers {identifiers[a]!r} ({a}) and {identifiers[b]!r} ({b}) share the CLIP "
                       f"token{'s' if len(shared) > 1 else ''} {', '.join(repr(s) for s in shared)}{how}: the two "
                       "people start from the same meaning and may blend; give each a token of its own "
                       "(e.g. subjects='ada: sks; grace: ohwx')")
    return out
