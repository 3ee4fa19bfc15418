"""Stage 2: caption the prepared photos with BLIP and put one unique identifier in every caption.

DreamBooth learns the person through a rare identifier ("TOK person") that appears in
every training caption; everything else in the caption (clothes, pose, place, light)
is what the model should *not* tie to the identifier. So each caption is BLIP's
description of the picture with its generic subject ("a woman", "arafed man") replaced
by the identifier, exactly once, on word boundaries (a plain substring replace turns
"tokyo" into "TOK personyo").

Outputs, beside the images in ``dataset/``: ``metadata.jsonl`` rows gain ``"text"``, every
image gets an ``images/<stem>.txt`` sidecar, and ``caption_config.json`` records the subject
phrase (the trigger the trainer records), the template and, under ``"written"``, the caption
written for each image. People edit captions in either file; because the stage knows what
it wrote, a re-run keeps a hand edit from whichever file holds it (and copies it to the
other), and leaves both files alone, naming the image, when both were edited differently.
``overwrite`` re-captions everything.

Several people (rows of ``metadata.jsonl`` naming their ``"subject"``): each person gets an
identifier of their own ("TOK1 person", "TOK2 person"), every caption carries its own person's
exactly once and no other's, and ``caption_config.json`` maps each person to theirs under
``"subjects"`` instead of one "trigger" (:mod:`~lora_helpers.caption.subjects`).

The pieces live beside this module: :mod:`~lora_helpers.caption.blip` (the model),
:mod:`~lora_helpers.caption.files` (reading and writing both caption formats,
:func:`~lora_helpers.caption.files.load_captions`) and :mod:`~lora_helpers.caption.text`
(identifier, clean-up, CLIP token counts).
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lora_helpers.caption.blip import generate_captions, load_blip, resolve_blip
from lora_helpers.caption.config import CaptionConfig, subject_phrase
from lora_helpers.caption.edits import WRITTEN_KEY, written_captions
from lora_helpers.caption.files import METADATA, CaptionWarning, DatasetEntry, dataset_entries, write_metadata
from lora_helpers.caption.subjects import (
    dataset_identifiers, dataset_subjects, identifier_warnings, identifiers_of, subject_identifiers,
)
from lora_helpers.caption.text import (
    CLIP_MAX_TOKENS, clip_token_count, count_identifier, identifier_of, load_clip_tokenizer, standardise_caption,
)
from lora_helpers.core.embeddings import pivotal_tokens
from lora_helpers.core.fileio import write_text
from lora_helpers.core.images import ImageLoadError, load_image
from lora_helpers.core.run_folder import SUBJECT_FIELD, SUBJECTS_KEY, write_caption_config
from lora_helpers.core.runtime import free_memory

__all__ = [
    "CaptionConfig",
    "CaptionResult",
    "subject_phrase",
    "dataset_identifiers",
    "identifier_warnings",
    "caption_dataset",
    "add_cli_arguments",
    "run_cli",
]


@dataclass
class CaptionResult:
    """What :func:`caption_dataset` did.

    Attributes:
        dataset_dir: the dataset folder.
        subject: the subject phrase in every caption (the trigger); "" with several people.
        captions: file name (relative to ``dataset_dir``) -> caption, for every captioned image.
        generated: file names captioned by BLIP in this run.
        kept: file names whose existing caption was kept.
        failed: file name -> reason, for images that got no caption (a missing or unreadable
            image, an unreadable ``.txt`` file, a caption edited differently in both files;
            the files of such an image are left as they were).
        warnings: messages also issued as :class:`CaptionWarning`.
        seconds: time spent in BLIP (loading excluded).
        subjects: with several people, each person's phrase (``{"ada": "TOK1 person"}``); else {}.
    """

    dataset_dir: Path
    subject: str
    captions: dict[str, str] = field(default_factory=dict)
    generated: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0
    subjects: dict[str, str] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return len(self.generated) / self.seconds if self.seconds > 0 else 0.0


def _warn(messages: list[str], message: str) -> None:
    messages.append(message)
    warnings.warn(message, CaptionWarning, stacklevel=3)


def caption_dataset(dataset_dir: str | Path, *, config: CaptionConfig | None = None, tokenizer=None,
                    progress: bool = True) -> CaptionResult:
    """Caption every image of a dataset folder and write both caption formats.

    Images come from ``metadata.jsonl`` rows when present (all other keys of each row are
    kept), else from ``images/``, else from the folder itself. Images that already have
    a caption keep it unless ``config.overwrite``: the hand-edited one when the ``.txt``
    sidecar and the row's "text" differ (see :mod:`~lora_helpers.caption.edits`). BLIP is
    loaded only when something needs captioning and is freed from GPU and host memory
    before returning (training needs that memory).

    Args:
        dataset_dir: the dataset folder.
        config: a :class:`CaptionConfig` (defaults if None).
        tokenizer: CLIP tokenizer for the 77-token check; None tries :func:`load_clip_tokenizer`.
        progress: show a progress bar.

    Returns:
        A :class:`CaptionResult`.

    Raises:
        CaptionError: when the folder has no images, or a row of ``metadata.jsonl`` cannot
            be used (broken, or naming a file outside the folder); nothing is written then.
    """
    config = config or CaptionConfig()
    dataset_dir = Path(dataset_dir)
    tokenizer = tokenizer if tokenizer is not None else load_clip_tokenizer()
    entries, notes = dataset_entries(dataset_dir)
    people = dataset_subjects([e.row for e in entries])
    settings, phrases = subject_identifiers(config, dataset_dir, people)
    subject = "" if people else phrases[None]
    result = CaptionResult(dataset_dir=dataset_dir, subject=subject, subjects=dict(phrases) if people else {})
    written = written_captions(dataset_dir)
    checks = identifier_warnings(phrases, tokenizer)
    if config.subjects and not people:
        checks.append("subjects names people, but no row of metadata.jsonl names its person (a one-person dataset), "
                      "so one identifier is used; prepare with subjects='folders' or 'group' for several people")
    for message in notes + checks:
        _warn(result.warnings, message)

    todo: list[DatasetEntry] = []
    for e in entries:
        current = e.current(written)
        existing = current.text
        who = (e.row or {}).get(SUBJECT_FIELD) if people else None
        if who not in phrases:
            result.failed[e.file_name] = (f"its row in {METADATA} names no person of the dataset ({who!r}) while "
                                          f"others do; set its 'subject' to one of {', '.join(people)}, or prepare again")
            _warn(result.warnings, f"{e.file_name}: {result.failed[e.file_name]}")
        elif current.problem and not config.overwrite:
            # Both files stay as they are: which caption is meant is the person's call.
            result.failed[e.file_name] = current.problem
            _warn(result.warnings, f"{e.file_name}: {current.problem}")
        elif existing and not config.overwrite:
            result.captions[e.file_name] = existing
            result.kept.append(e.file_name)
            identifier, others = identifiers_of(phrases, who)
            stray = [o for o in others if count_identifier(existing, o)]
            if count_identifier(existing, identifier) != 1 or stray:
                also = f" and another person's {', '.join(map(repr, stray))}" if stray else ""
                _warn(result.warnings, f"{e.file_name}: kept caption has {identifier!r} "
                                       f"{count_identifier(existing, identifier)} times (want once){also}: {existing!r}; "
                                       "edit it, or re-caption with overwrite")
        elif e.path.is_file():
            todo.append(e)
        else:
            result.failed[e.file_name] = "image file missing"

    images, ready = [], []
    for e in todo:
        try:
            images.append(load_image(e.path))
            ready.append(e)
        except ImageLoadError as exc:
            result.failed[e.file_name] = exc.reason
            _warn(result.warnings, f"{e.file_name}: {exc.reason}; no caption written (fix or remove the image)")

    if images:
        model, processor = load_blip(config.model, device=config.device)
        try:
            start = time.perf_counter()
            raw = generate_captions(
                images, model=model, processor=processor, batch_size=config.batch_size, num_beams=config.num_beams,
                max_new_tokens=config.max_new_tokens, min_new_tokens=config.min_new_tokens,
                repetition_penalty=config.repetition_penalty, prompt=config.prompt, progress=progress,
            )
            result.seconds = time.perf_counter() - start
        finally:
            # Training loads SDXL next; BLIP must not hold GPU or host memory meanwhile.
            del model, processor
            images.clear()
            free_memory()
        for e, text in zip(ready, raw):
            who = (e.row or {}).get(SUBJECT_FIELD) if people else None
            result.captions[e.file_name] = standardise_caption(text, subject=phrases[who], template=config.template,
                                                               forbidden=identifiers_of(phrases, who)[1])
            result.generated.append(e.file_name)

    for e in entries:
        text = result.captions.get(e.file_name)
        if text is None:
            continue
        n = clip_token_count(text, tokenizer)
        if n > CLIP_MAX_TOKENS:
            _warn(result.warnings, f"{e.file_name}: caption has {n} CLIP tokens, over the {CLIP_MAX_TOKENS} "
                                   "that SDXL reads; the end is cut off, shorten it")
        if e.sidecar != text:
            write_text(e.sidecar_path, text + "\n")
    # Reorder to the dataset's order (kept and generated were collected apart).
    result.captions = {e.file_name: result.captions[e.file_name] for e in entries if e.file_name in result.captions}
    write_metadata(dataset_dir, entries, result.captions)
    # Both files now hold these captions; a later difference from them is a hand edit.
    written.update(result.captions)
    # One person: one trigger; several: only the per-person map, so nobody takes one trigger for all.
    who = {SUBJECTS_KEY: settings} if people else {"trigger": subject, "subject": subject,
                                                    "identifier": identifier_of(subject)}
    write_caption_config(dataset_dir, {
        **who, "template": config.template,
        "identifier_format": config.identifier_format, "token": config.token, "class_noun": config.class_noun,
        **({"pivotal_tokens": pivotal_tokens(config.pivotal_tokens)} if config.identifier_format == "pivotal" else {}),
        "name": config.name, "model": resolve_blip(config.model),
        "generation": {k: v for k, v in asdict(config).items()
                       if k in ("num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "prompt")},
        WRITTEN_KEY: written,
    })
    return result


# --------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``python -m lora_helpers caption`` to ``parser``."""
    d = CaptionConfig()
    parser.add_argument("dataset_dir", type=Path, help="dataset folder (prepare's output, images/, or a folder of images)")
    parser.add_argument("--token", default=d.token, help="rare identifier word (default %(default)s)")
    parser.add_argument("--class-noun", default=d.class_noun, help="what the person is (default %(default)s)")
    parser.add_argument("--name", default=None, help="optional name after the class noun ('TOK person Ada')")
    parser.add_argument("--format", dest="identifier_format", choices=("tok", "at", "pivotal"),
                        default=d.identifier_format,
                        help="'tok': 'TOK person [name]'; 'at': '@name'; 'pivotal': '<s0><s1> person [name]', new tokens "
                             "learned in training (pivotal tuning)")
    parser.add_argument("--pivotal-tokens", type=int, default=d.pivotal_tokens,
                        help="how many new tokens --format pivotal uses (default %(default)s)")
    parser.add_argument("--template", default=d.template, help="caption template (default %(default)r)")
    parser.add_argument("--model", default=None,
                        help="BLIP hub id or folder, or 'base'/'large' (default: base; the tiny model in smoke mode)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--num-beams", type=int, default=d.num_beams, help="1 = greedy")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    parser.add_argument("--prompt", default=None, help="text for BLIP to continue, e.g. 'a picture of'")
    parser.add_argument("--overwrite", action="store_true", help="re-caption images that have captions (loses hand edits)")
    parser.add_argument("--subjects", default=None,
                        help="several people: each one's token [class noun [name]], e.g. 'ada: ADA woman; grace: GRACE' "
                             "(default TOK1 person, TOK2 person, ...)")


def run_cli(args: argparse.Namespace) -> int:
    """Caption the dataset and print each caption.

    Args:
        args: arguments parsed with the flags of :func:`add_cli_arguments`.

    Returns:
        The exit code: 0 done, 1 an image got no caption or the folder has none, or a setting is wrong.
    """
    try:
        config = CaptionConfig(
            model=args.model, token=args.token, class_noun=args.class_noun, name=args.name,
            identifier_format=args.identifier_format, pivotal_tokens=args.pivotal_tokens, template=args.template,
            batch_size=args.batch_size,
            num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
            prompt=args.prompt, overwrite=args.overwrite, subjects=getattr(args, "subjects", None),
        )
        with warnings.catch_warnings():
            # Printed below as "warning:" lines, once each.
            warnings.simplefilter("ignore", CaptionWarning)
            result = caption_dataset(args.dataset_dir, config=config)
    except (ValueError, FileNotFoundError) as exc:  # CaptionError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, text in result.captions.items():
        how = "kept" if name in result.kept else "new"
        print(f"[{how}] {name}: {text}")
    for name, why in result.failed.items():
        print(f"[failed] {name}: {why}")
    rate = f", {result.images_per_second:.2f} images/s" if result.generated else ""
    who = ", ".join(f"{k}: {v!r}" for k, v in result.subjects.items()) or f"subject {result.subject!r}"
    print(f"{who}: {len(result.generated)} captioned, {len(result.kept)} kept, "
          f"{len(result.failed)} failed{rate}; wrote {args.dataset_dir / METADATA} and .txt sidecars")
    for message in result.warnings:
        print(f"warning: {message}")
    return 1 if result.failed else 0
