"""The standard evaluation prompts for a person, filled in with the run's subject phrase; for a
multi-person run, the standard set once per person and a few prompts naming two people."""

from __future__ import annotations

import itertools
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from lora_helpers.core.run_folder import DEFAULT_TRIGGER
from lora_helpers.core.subjects import expand_subject, fill_subjects, placeholders

__all__ = ["PROMPTS_PEOPLE", "PROMPTS_TWO_PEOPLE", "EvalPrompt", "people_prompts", "subject_prompts",
           "read_prompts_file"]


# Standard prompts for a person, in the spirit of the DreamBooth paper's live-subject
# prompts: the same face must survive framing, places, activities, outfits and styles.
PROMPTS_PEOPLE: dict[str, tuple[str, ...]] = {
    "portrait": (
        "a close-up portrait photo of {subject}",
        "a headshot of {subject}, studio lighting, plain background",
        "a photo of {subject} smiling at the camera",
        "a black and white portrait photo of {subject}",
    ),
    "full_body": (
        "a full body photo of {subject} standing in a park",
        "a full body photo of {subject} walking down a city street",
    ),
    "place": (
        "a photo of {subject} on the beach",
        "a photo of {subject} in the snow",
        "a photo of {subject} in the jungle",
        "a photo of {subject} with a mountain in the background",
    ),
    "activity": (
        "a photo of {subject} reading a book in a cafe",
        "a photo of {subject} riding a bicycle",
        "a photo of {subject} cooking in a kitchen",
    ),
    "outfit": (
        "a photo of {subject} wearing a red hat",
        "a photo of {subject} in a chef outfit",
        "a photo of {subject} in a firefighter outfit",
    ),
    "style": (
        "an oil painting of {subject}",
        "a pencil sketch of {subject}",
        "a watercolor painting of {subject}",
        "a comic book illustration of {subject}",
    ),
}


# Two people in one picture: both must appear, each with their own face.
PROMPTS_TWO_PEOPLE: tuple[str, ...] = (
    "a photo of {a} and {b} at a cafe",
    "a photo of {a} and {b} standing side by side in a park",
    "a photo of {a} shaking hands with {b}",
)


@dataclass(frozen=True)
class EvalPrompt:
    """One evaluation prompt: ``text`` is what the generator sees; ``subjects`` the people of a
    multi-person run it names (slugs; () for a one-person run)."""

    prompt_id: str
    category: str
    template: str
    text: str
    subjects: tuple[str, ...] = ()


def people_prompts(
    subject: str = DEFAULT_TRIGGER,
    *,
    categories: Iterable[str] | None = None,
    per_category: int | None = None,
    templates: Sequence[str] | None = None,
) -> list[EvalPrompt]:
    """The standard prompt set (or your own templates) filled in with ``subject``.

    Args:
        subject: identifier and class, e.g. ``"TOK person"``.
        categories: categories of :data:`PROMPTS_PEOPLE` to use (None: all).
        per_category: keep the first N prompts of each category.
        templates: your own prompts instead; ``{subject}`` is filled in when present.

    Returns:
        A list of :class:`EvalPrompt` with stable ids such as ``"place-01"``.
    """
    if templates is not None:
        return [EvalPrompt(f"custom-{i:02d}", "custom", t, t.replace("{subject}", subject)) for i, t in enumerate(templates)]
    chosen = list(categories) if categories is not None else list(PROMPTS_PEOPLE)
    unknown = [c for c in chosen if c not in PROMPTS_PEOPLE]
    if unknown:
        raise ValueError(f"unknown prompt categories {unknown}; choose from {list(PROMPTS_PEOPLE)}")
    out = []
    for cat in chosen:
        for i, t in enumerate(PROMPTS_PEOPLE[cat][:per_category]):
            out.append(EvalPrompt(f"{cat}-{i:02d}", cat, t, t.replace("{subject}", subject)))
    return out


def _person_prompt(prompt_id: str, category: str, template: str, triggers: dict[str, str]) -> EvalPrompt:
    """A prompt naming people by ``{<slug>}``, filled in (an unknown name or ``{subject}`` is refused, naming them)."""
    text = fill_subjects(template, triggers)
    named = tuple(s for s in triggers if s in placeholders(template))
    if not named:
        raise ValueError(f"prompt {template!r} names nobody; this run has several people: write "
                         + ", ".join("{" + s + "}" for s in triggers))
    return EvalPrompt(prompt_id, category, template, text, named)


def subject_prompts(
    triggers: dict[str, str],
    *,
    categories: Iterable[str] | None = None,
    per_category: int | None = None,
    templates: Sequence[str] | None = None,
    pairs: Sequence[str] = PROMPTS_TWO_PEOPLE,
) -> list[EvalPrompt]:
    """Prompts for a multi-person run: the standard set once per person, and two-person prompts for
    every pair of people.

    Args:
        triggers: slug -> trigger phrase (``{"ada": "TOK1 person", ...}``), in the run's order.
        categories, per_category: as for :func:`people_prompts`.
        templates: your own prompts instead: one with ``{subject}`` is made once per person, one with
            ``{<slug>}`` placeholders once as written.
        pairs: two-person templates with ``{a}`` and ``{b}`` (ignored with ``templates``; the first
            ``per_category`` of them).

    Returns:
        :class:`EvalPrompt` s with ``subjects`` set and ids such as ``"ada-place-01"`` or
        ``"ada+grace-together-00"``.

    Raises:
        ValueError: an unknown category, or a template naming nobody or someone the run does not know
            (see :func:`lora_helpers.core.subjects.fill_subjects`).
    """
    out: list[EvalPrompt] = []
    if templates is not None:
        for i, t in enumerate(templates):
            # {subject} becomes one prompt per person, as in the generate stage's grids
            for one in expand_subject([t], list(triggers)):
                p = _person_prompt("", "custom", one, triggers)
                out.append(replace(p, prompt_id=f"{'+'.join(p.subjects)}-custom-{i:02d}", template=t))
        return out
    for slug, phrase in triggers.items():
        out += [EvalPrompt(f"{slug}-{p.prompt_id}", p.category, p.template, p.text, (slug,))
                for p in people_prompts(phrase, categories=categories, per_category=per_category)]
    for a, b in itertools.combinations(triggers, 2):
        for i, t in enumerate(pairs[:per_category]):
            # {a} and {b} first become the two people's placeholders, in one pass (a slug may be "a" or "b")
            named = re.sub(r"\{([ab])\}", lambda m: "{" + {"a": a, "b": b}[m.group(1)] + "}", t)
            out.append(replace(_person_prompt(f"{a}+{b}-together-{i:02d}", "together", named, triggers), template=t))
    return out


def read_prompts_file(path: str | os.PathLike) -> list[str]:
    """Prompt templates from a text file, one per line (blank lines skipped, ``{subject}`` kept).

    Args:
        path: a UTF-8 text file (a byte-order mark is fine).

    Returns:
        The templates, in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: a folder, text that is not UTF-8 (naming the line), or no prompts in it.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prompts file not found: {path} (check the path; it holds one prompt per line)")
    if path.is_dir():
        raise ValueError(f"prompts file {path} is a folder; give a text file with one prompt per line")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # Windows editors save Latin-1/cp1252 ("café" as one byte 0xe9); guessing the encoding
        # could silently change a prompt, so the line is named and the fix is the user's.
        line = data[: exc.start].count(b"\n") + 1
        raise ValueError(f"{path}, line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x}); save the file as "
                         "UTF-8 (in most editors: Save As, Encoding: UTF-8) and run again") from None
    templates = [line.strip() for line in text.splitlines() if line.strip()]
    if not templates:
        raise ValueError(f"prompts file {path} holds no prompts; write one per line, e.g. 'a photo of {{subject}} "
                         "on the beach'")
    return templates
