"""People in prompts: ``{subject}`` and ``{<slug>}`` placeholders, filled with trigger phrases.

A one-person run calls its person ``{subject}``. A run (or a set of LoRAs) with several people
names each by its slug: "{ada} and {grace} at a cafe" becomes "TOK1 person and TOK2 person at
a cafe". ``{subject}`` is then ambiguous: generation refuses it naming the slugs, while grids,
validation and evaluation make one prompt per person (:func:`expand_subject`).
"""

from __future__ import annotations

import re
from typing import Mapping, Sequence

__all__ = ["SUBJECT_PLACEHOLDER", "fill_subjects", "expand_subject", "placeholders"]

SUBJECT_PLACEHOLDER = "{subject}"
_PLACEHOLDER = re.compile(r"\{([A-Za-z0-9_-]+)\}")


def _names(triggers: Mapping[str, str]) -> str:
    return ", ".join("{" + slug + "}" for slug in triggers)


def placeholders(prompt: str) -> list[str]:
    """The names of the ``{name}`` placeholders in ``prompt``, in order ("subject" included)."""
    return _PLACEHOLDER.findall(prompt)


def fill_subjects(prompt: str, triggers: Mapping[str, str] | None = None, *, subject: str | None = None) -> str:
    """Replace ``{<slug>}`` with that person's trigger and ``{subject}`` with ``subject``.

    Args:
        prompt: a prompt template.
        triggers: slug -> trigger phrase of each person the LoRA(s) know ({} or None: one person).
        subject: the phrase for ``{subject}`` (the one person's trigger), or None.

    Returns:
        The prompt the model sees. Braces that name nobody are left as written when no people
        are named (a one-person run), so ordinary prompts never break.

    Raises:
        ValueError: ``{subject}`` with several people and no single phrase (naming the slugs to
            use), ``{subject}`` with no phrase known, or a ``{name}`` that is none of the people.
    """
    triggers = dict(triggers or {})

    def replace(match: re.Match) -> str:
        name = match.group(1)
        if name == "subject":
            if subject:
                return subject
            if triggers:
                raise ValueError(f"prompt {prompt!r} uses {{subject}}, but the LoRA knows several people: write "
                                 f"{_names(triggers)} instead (e.g. '{{{next(iter(triggers))}}} at a cafe')")
            raise ValueError(f"prompt {prompt!r} uses {{subject}} but no trigger phrase is known: load the LoRA from "
                             "its run folder (config.json has 'trigger'), pass trigger= to load_lora, or set "
                             "GenerateConfig.subject")
        if name in triggers:
            return triggers[name]
        if triggers:
            raise ValueError(f"prompt {prompt!r} names {{{name}}}, who is not one of the LoRA's people; "
                             f"use {_names(triggers)}")
        return match.group(0)

    return _PLACEHOLDER.sub(replace, prompt)


def expand_subject(prompts: Sequence[str], slugs: Sequence[str]) -> list[str]:
    """One prompt per person for each prompt with ``{subject}`` (as ``{<slug>}``); others stay as they are.

    Args:
        prompts: prompt templates.
        slugs: the people, in order; empty: nothing is expanded.

    Returns:
        The prompts, each ``{subject}`` prompt replaced by one per slug, in place.
    """
    out: list[str] = []
    for prompt in prompts:
        if slugs and SUBJECT_PLACEHOLDER in prompt:
            out += [prompt.replace(SUBJECT_PLACEHOLDER, "{" + slug + "}") for slug in slugs]
        else:
            out.append(prompt)
    return out
