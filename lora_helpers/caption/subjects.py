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
from pathlib import Path

from lora_helpers.caption.config import CaptionConfig, parse_subject_settings, subject_phrase
from lora_helpers.caption.files import CaptionError, dataset_entries
from lora_helpers.caption.text import check_identifier, identifier_of
from lora_helpers.core.run_folder import SUBJECT_FIELD, SUBJECTS_KEY, read_caption_config
from lora_helpers.core.embeddings import pivotal_identifier, pivotal_token_count, pivotal_tokens

__all__ = ["dataset_subjects", "subject_phrases", "shared_token_warnings", "dataset_identifiers",
           "identifier_warnings", "subject_identifiers", "identifiers_of"]

def dataset_subjects(rows: list[dict | None]) -> list[str]:
    """The people named in ``metadata.jsonl`` rows, sorted; [] for a one-person dataset."""
    return sorted({str(row[SUBJECT_FIELD]) for row in rows if row and row.get(SUBJECT_FIELD)})


def subject_phrases(config: CaptionConfig, people: list[str], previous: dict) -> dict[str, dict[str, str]]:
    """Each person's identifier settings and phrase: the ``"subjects"`` map of ``caption_config.json``.

    Args:
        config: the :class:`~lora_helpers.caption.stage.CaptionConfig` (token, class noun, format,
            per-person ``subjects``).
        people: the dataset's people (:func:`dataset_subjects`).
        previous: the last ``caption_config.json`` (its ``"subjects"`` keep each person's number).

    Returns:
        ``{person: {"trigger": "TOK1 person", "token": "TOK1", "class_noun": "person"[, "name": ...]}}``.

    Raises:
        ValueError: pivotal tokens, settings for a person the dataset does not have, or two people
            given the same identifier.
    """
    if config.identifier_format == "pivotal":
        return _pivotal_phrases(config, people)
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
        trigger = subject_phrase(dataclasses.replace(config, subjects=None, **settings))
        out[who] = {"trigger": trigger, **{k: v for k, v in settings.items() if v}}
    by_identifier: dict[str, str] = {}
    for who, s in out.items():
        ident = identifier_of(s["trigger"]).lower()
        if ident in by_identifier:
            raise ValueError(f"{by_identifier[ident]} and {who} would both be called {identifier_of(s['trigger'])!r}; "
                             "give each person their own token in subjects")
        by_identifier[ident] = who
    return out


def _pivotal_phrases(config: CaptionConfig, people: list[str]) -> dict[str, dict[str, str]]:
    """New tokens for each person, in the dataset's order: ``<s0><s1> person``, ``<s2><s3> person``, ..."""
    chosen = parse_subject_settings(config.subjects)
    n = config.pivotal_tokens
    out = {}
    for k, who in enumerate(people):
        mine = chosen.get(who, {})
        ident = pivotal_identifier(n, start=n * k)
        noun, name = mine.get("class_noun") or config.class_noun, mine.get("name") or config.name
        trigger = " ".join(p for p in (ident, noun, (name or "").strip()) if p)
        out[who] = {"trigger": trigger, "token": ident, "class_noun": noun,
                    "pivotal_tokens": pivotal_tokens(n, start=n * k), **({"name": name} if name else {})}
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
    # new tokens (pivotal tuning) are each person's own by construction
    identifiers = {who: ident for who, ident in identifiers.items() if not pivotal_token_count(ident)}
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


def dataset_identifiers(dataset_dir: str | Path, config: CaptionConfig | None = None) -> dict[str | None, str]:
    """The phrase each person of a dataset gets in captions.

    Args:
        dataset_dir: the dataset folder (its ``metadata.jsonl`` rows name the people, if several).
        config: the caption settings (defaults if None).

    Returns:
        ``{None: "TOK person"}`` for one person; ``{"ada": "TOK1 person", "grace": "TOK2 person"}`` for several.

    Raises:
        CaptionError: a row that cannot be used, or settings that do not fit the dataset's people.
    """
    config = config or CaptionConfig()
    entries, _ = dataset_entries(Path(dataset_dir))
    return subject_identifiers(config, Path(dataset_dir), dataset_subjects([e.row for e in entries]))[1]


def identifier_warnings(phrases: dict[str | None, str], tokenizer=None) -> list[str]:
    """Warnings about identifiers that would learn badly: common or long words, and people sharing CLIP tokens.

    Args:
        phrases: from :func:`dataset_identifiers`.
        tokenizer: the CLIP tokenizer; None estimates.

    Returns:
        Messages (empty when every identifier looks fine).
    """
    out = [m for p in phrases.values() for m in check_identifier(p, tokenizer)]
    if len(phrases) > 1:
        out += shared_token_warnings({who: identifier_of(p) for who, p in phrases.items()}, tokenizer)
    return out


def subject_identifiers(config: CaptionConfig, dataset_dir: Path, people: list[str]) -> tuple[dict | None, dict]:
    """``(the "subjects" map or None, {person or None: phrase})`` for a dataset of several people or one."""
    if not people:
        return None, {None: subject_phrase(config)}
    try:
        settings = subject_phrases(config, people, read_caption_config(dataset_dir))
    except ValueError as exc:  # settings that do not fit the dataset: nothing is written
        raise CaptionError(str(exc)) from None
    return settings, {who: s["trigger"] for who, s in settings.items()}


def identifiers_of(phrases: dict, who) -> tuple[str, list[str]]:
    """The person's identifier and every other person's."""
    return identifier_of(phrases[who]), [identifier_of(p) for w, p in phrases.items() if w != who]
