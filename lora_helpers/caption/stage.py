"""Caption the prepared photos with BLIP and put one unique identifier in every caption.

DreamBooth learns the person through a rare identifier ("TOK person") that appears in
every training caption; everything else in the caption (clothes, pose, place, light)
is what the model should *not* tie to the identifier. So each caption is BLIP's
description of the picture with its generic subject ("a woman", "arafed man") replaced
by the identifier, exactly once, on word boundaries (a plain substring replace turns
"tokyo" into "TOK personyo").

Outputs, beside the images in ``dataset/``:

* ``metadata.jsonl``: the Hugging Face ``imagefolder`` format; each row keeps the keys the
  prepare stage wrote and gains ``"text"``.
* ``images/<stem>.txt``: kohya's sidecar format. People edit these by hand, so they win
  over ``metadata.jsonl`` when the two differ, and a re-run keeps existing captions
  unless ``overwrite`` is asked.
* ``caption_config.json``: the subject phrase (the trigger the trainer records) and template.

:func:`load_captions` is the one reader of captions (the trainer uses it). The string work
(identifier, clean-up, CLIP token counts) lives in :mod:`lora_helpers.caption.text`.
"""

from __future__ import annotations

import argparse
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

from lora_helpers.caption.text import (
    CLIP_MAX_TOKENS,
    COMMON_WORDS,
    check_identifier,
    clip_token_count,
    count_identifier,
    identifier_of,
    identifier_pattern,
    load_clip_tokenizer,
    standardise_caption,
)
from lora_helpers.core.fileio import read_jsonl, write_jsonl, write_text
from lora_helpers.core.images import ImageLoadError, list_images, load_image
from lora_helpers.core.run_folder import (
    DEFAULT_CLASS_NOUN, DEFAULT_TOKEN, read_caption_config, write_caption_config,
)

__all__ = [
    "BLIP_MODELS",
    "CLIP_MAX_TOKENS",
    "COMMON_WORDS",
    "CaptionConfig",
    "CaptionError",
    "CaptionResult",
    "CaptionRow",
    "CaptionWarning",
    "subject_phrase",
    "identifier_of",
    "count_identifier",
    "standardise_caption",
    "check_identifier",
    "clip_token_count",
    "load_clip_tokenizer",
    "load_blip",
    "generate_captions",
    "caption_dataset",
    "caption_table",
    "load_captions",
    "save_caption",
    "add_cli_arguments",
    "run_cli",
]

BLIP_MODELS = {
    "base": "Salesforce/blip-image-captioning-base",
    "large": "Salesforce/blip-image-captioning-large",
}
METADATA = "metadata.jsonl"


class CaptionError(ValueError):
    """Captions that cannot be trained on; ``problems`` maps file name to reason."""

    def __init__(self, message: str, problems: dict[str, str] | None = None):
        self.problems = dict(problems or {})
        super().__init__(message)


class CaptionWarning(UserWarning):
    """Something a person should look at in the captions (it does not stop training)."""


@dataclass
class CaptionConfig:
    """Settings of the caption stage.

    Attributes:
        model: BLIP hub id or local folder; "base" / "large" pick Salesforce's models;
            None takes :func:`lora_helpers.core.config.resolve_models` (tiny model in smoke mode).
        token: the rare word that becomes the person ("TOK", "sks", "ohwx").
        class_noun: what the person is ("person", "man", "woman"); keeps the prior.
        name: optional name after the class noun ("TOK person Ada").
        identifier_format: "tok" -> "TOK person [name]"; "at" -> "@name" (or "@tok").
        template: how subject and BLIP's description combine; needs ``{subject}``.
        batch_size: images per BLIP forward pass.
        num_beams: beam search width (1 = greedy); never sampling, so runs repeat.
        max_new_tokens: caption length bound.
        min_new_tokens: at least this many words-pieces, so captions describe something.
        repetition_penalty: >1 keeps BLIP from looping ("a man man man").
        prompt: optional text BLIP continues (conditional captioning, e.g. "a picture of").
        overwrite: re-caption images that already have a caption (hand edits are lost).
        device: None picks CUDA when present, else CPU.
    """

    model: str | None = None
    token: str = DEFAULT_TOKEN
    class_noun: str = DEFAULT_CLASS_NOUN
    name: str | None = None
    identifier_format: Literal["tok", "at"] = "tok"
    template: str = "a photo of {subject}, {caption}"
    batch_size: int = 8
    num_beams: int = 3
    max_new_tokens: int = 40
    min_new_tokens: int = 5
    repetition_penalty: float = 1.3
    prompt: str | None = None
    overwrite: bool = False
    device: str | None = None

    def __post_init__(self) -> None:
        if self.identifier_format not in ("tok", "at"):
            raise ValueError(f"identifier_format must be 'tok' or 'at', not {self.identifier_format!r}")
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.token or ""):
            raise ValueError(f"token {self.token!r}: use one word of letters/digits, e.g. 'TOK' or 'sks'")
        if "{subject}" not in self.template:
            raise ValueError(f"template {self.template!r} needs '{{subject}}', where the identifier goes")
        if self.batch_size < 1 or self.num_beams < 1 or self.max_new_tokens < 1:
            raise ValueError("batch_size, num_beams and max_new_tokens must be at least 1")


@dataclass
class CaptionResult:
    """What :func:`caption_dataset` did.

    Attributes:
        dataset_dir: the dataset folder.
        subject: the subject phrase in every caption (the trigger).
        captions: file name (relative to ``dataset_dir``) -> caption, for every captioned image.
        generated: file names captioned by BLIP in this run.
        kept: file names whose existing caption was kept.
        failed: file name -> reason, for images that got no caption.
        warnings: messages also issued as :class:`CaptionWarning`.
        seconds: time spent in BLIP (loading excluded).
    """

    dataset_dir: Path
    subject: str
    captions: dict[str, str] = field(default_factory=dict)
    generated: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return len(self.generated) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class CaptionRow:
    """One image and its caption as a person sees it (for tables and the editor)."""

    file_name: str
    path: Path
    text: str | None
    tokens: int | None
    has_identifier: bool
    problem: str | None


# --------------------------------------------------------------------------- identifier


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.strip().lower()).strip("_")


def subject_phrase(config: CaptionConfig) -> str:
    """The phrase that stands for the person in every caption.

    Returns:
        "TOK person", "TOK person Ada" (format "tok"), or "@ada" / "@tok" (format "at").
    """
    if config.identifier_format == "at":
        return "@" + (_slug(config.name) if config.name and _slug(config.name) else config.token.lower())
    return " ".join(p for p in (config.token, config.class_noun, (config.name or "").strip()) if p)


# --------------------------------------------------------------------------- BLIP


def _resolve_blip(model: str | None) -> str:
    if model is None:
        from lora_helpers.core.config import resolve_models

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
    from transformers import BlipForConditionalGeneration, BlipProcessor

    from lora_helpers.core.runtime import default_device, default_dtype

    model_id = _resolve_blip(model)
    device = default_device() if device is None else device
    dtype = default_dtype(device) if dtype is None else dtype
    processor = BlipProcessor.from_pretrained(model_id)
    blip = BlipForConditionalGeneration.from_pretrained(model_id, dtype=dtype).to(device).eval()
    return blip, processor


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
    import torch
    from tqdm.auto import tqdm

    param = next(model.parameters())
    out: list[str] = []
    with tqdm(total=len(images), desc="captioning", unit="img", disable=not progress) as bar:
        for start in range(0, len(images), batch_size):
            batch = list(images[start:start + batch_size])
            text = [prompt] * len(batch) if prompt else None
            inputs = processor(images=batch, text=text, return_tensors="pt").to(param.device)
            inputs["pixel_values"] = inputs["pixel_values"].to(param.dtype)
            with torch.inference_mode():
                ids = model.generate(
                    **inputs, do_sample=False, num_beams=num_beams, max_new_tokens=max_new_tokens,
                    min_new_tokens=min(min_new_tokens, max_new_tokens), repetition_penalty=repetition_penalty,
                )
            for caption in processor.batch_decode(ids, skip_special_tokens=True):
                caption = caption.strip()
                if prompt and caption.lower().startswith(prompt.lower()):
                    caption = caption[len(prompt):].strip()
                out.append(caption)
            bar.update(len(batch))
    return out


# --------------------------------------------------------------------------- dataset folder


@dataclass
class _Entry:
    file_name: str
    path: Path
    row: dict | None  # the metadata.jsonl row (None for folders without one)
    sidecar: str | None  # text of the .txt file (None when there is none)

    @property
    def sidecar_path(self) -> Path:
        return self.path.with_suffix(".txt")


def _read_sidecar(path: Path) -> str | None:
    return path.read_text(encoding="utf-8").strip() if path.is_file() else None


def _entries(dataset_dir: Path) -> tuple[list[_Entry], list[str]]:
    """The dataset's images, from metadata.jsonl rows, images/, or the folder itself.

    Returns:
        ``(entries, notes)``; notes name images that are listed but missing, or present
        but not listed (the prepare stage's metadata.jsonl decides what is trained on).
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {dataset_dir} (run the prepare stage, or check the path)")
    notes: list[str] = []
    meta = dataset_dir / METADATA
    entries: list[_Entry] = []
    if meta.is_file():
        listed = set()
        for i, row in enumerate(read_jsonl(meta), 1):
            name = row.get("file_name")
            if not isinstance(name, str) or not name:
                raise CaptionError(f"{meta}, line {i}: row without 'file_name'; fix or delete that line")
            path = dataset_dir / name
            listed.add(path.resolve())
            if not path.is_file():
                notes.append(f"{name}: listed in {METADATA} but the file is missing; re-run prepare or remove the row")
            entries.append(_Entry(name, path, row, _read_sidecar(path.with_suffix(".txt"))))
        folder = dataset_dir / "images" if (dataset_dir / "images").is_dir() else dataset_dir
        for path in list_images(folder):
            if path.resolve() not in listed:
                notes.append(f"{path.relative_to(dataset_dir).as_posix()}: not listed in {METADATA}, so not used")
    else:
        folder = dataset_dir / "images" if (dataset_dir / "images").is_dir() else dataset_dir
        for path in list_images(folder):
            name = path.relative_to(dataset_dir).as_posix()
            entries.append(_Entry(name, path, None, _read_sidecar(path.with_suffix(".txt"))))
    if not entries:
        raise CaptionError(
            f"no images in {dataset_dir}: expected {METADATA}, an images/ folder, or image files "
            "(.png, .jpg) in the folder itself; run the prepare stage first"
        )
    return entries, notes


def _existing_caption(entry: _Entry) -> str | None:
    if entry.sidecar:
        return entry.sidecar
    text = (entry.row or {}).get("text")
    return text.strip() if isinstance(text, str) and text.strip() else None


def _write_metadata(dataset_dir: Path, entries: list[_Entry], captions: dict[str, str]) -> Path:
    rows = []
    for e in entries:
        row = dict(e.row) if e.row is not None else {"file_name": e.file_name}
        if e.file_name in captions:
            row["text"] = captions[e.file_name]
        rows.append(row)
    return write_jsonl(Path(dataset_dir) / METADATA, rows)


def _warn(messages: list[str], message: str) -> None:
    messages.append(message)
    warnings.warn(message, CaptionWarning, stacklevel=3)


def caption_dataset(dataset_dir: str | Path, *, config: CaptionConfig | None = None, tokenizer=None,
                    progress: bool = True) -> CaptionResult:
    """Caption every image of a dataset folder and write both caption formats.

    Images come from ``metadata.jsonl`` rows when present (all other keys of each row are
    kept), else from ``images/``, else from the folder itself. Images that already have
    a caption (``.txt`` sidecar, else the row's "text") keep it unless
    ``config.overwrite``; BLIP is loaded only when something needs captioning and is
    freed from GPU and host memory before returning (training needs that memory).

    Args:
        dataset_dir: the dataset folder.
        config: a :class:`CaptionConfig` (defaults if None).
        tokenizer: CLIP tokenizer for the 77-token check; None tries :func:`load_clip_tokenizer`.
        progress: show a progress bar.

    Returns:
        A :class:`CaptionResult`.

    Raises:
        CaptionError: when the folder has no images.
    """
    from lora_helpers.core.runtime import free_memory

    config = config or CaptionConfig()
    dataset_dir = Path(dataset_dir)
    subject = subject_phrase(config)
    identifier = identifier_of(subject)
    tokenizer = tokenizer if tokenizer is not None else load_clip_tokenizer()
    result = CaptionResult(dataset_dir=dataset_dir, subject=subject)
    entries, notes = _entries(dataset_dir)
    for message in notes + check_identifier(subject, tokenizer):
        _warn(result.warnings, message)

    todo: list[_Entry] = []
    for e in entries:
        existing = _existing_caption(e)
        if existing and not config.overwrite:
            result.captions[e.file_name] = existing
            result.kept.append(e.file_name)
            if count_identifier(existing, identifier) != 1:
                _warn(result.warnings, f"{e.file_name}: kept caption has {identifier!r} "
                                       f"{count_identifier(existing, identifier)} times (want once): {existing!r}; edit it, "
                                       "or re-caption with overwrite")
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
            result.captions[e.file_name] = standardise_caption(text, subject=subject, template=config.template)
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
    _write_metadata(dataset_dir, entries, result.captions)
    write_caption_config(dataset_dir, {
        "trigger": subject, "subject": subject, "identifier": identifier, "template": config.template,
        "identifier_format": config.identifier_format, "token": config.token, "class_noun": config.class_noun,
        "name": config.name, "model": _resolve_blip(config.model),
        "generation": {k: v for k, v in asdict(config).items()
                       if k in ("num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty", "prompt")},
    })
    return result


def _gather(dataset_dir: Path) -> tuple[list[_Entry], list[str], list[str]]:
    """Entries plus the notes and the files whose sidecar and metadata text differ."""
    entries, notes = _entries(dataset_dir)
    differ = []
    for e in entries:
        text = (e.row or {}).get("text")
        if e.sidecar is not None and isinstance(text, str) and text.strip() and text.strip() != e.sidecar:
            differ.append(e.file_name)
    return entries, notes, differ


def _problem(e: _Entry, text: str | None, identifier: str | None) -> str | None:
    if not e.path.is_file():
        return "image file missing"
    if text is None:
        return f"no caption ({e.sidecar_path.name} missing and no 'text' in {METADATA}); run the caption stage"
    if not text:
        return f"empty caption in {e.sidecar_path.name if e.sidecar is not None else METADATA}; write one"
    if identifier and not identifier_pattern(identifier).search(text):
        return f"caption lacks the identifier {identifier!r}: {text!r}; add it (e.g. '{identifier} person')"
    return None


def _text_of(e: _Entry) -> str | None:
    if e.sidecar is not None:
        return e.sidecar
    text = (e.row or {}).get("text")
    return text.strip() if isinstance(text, str) else None


def load_captions(dataset_dir: str | Path, *, require_identifier: str | None = None) -> dict[str, str]:
    """Read the training captions: the one reader every stage uses.

    The ``.txt`` sidecar wins over ``metadata.jsonl``'s "text" (people edit sidecars);
    when both exist and differ, one :class:`CaptionWarning` lists the files.

    Args:
        dataset_dir: the dataset folder.
        require_identifier: a word or phrase (e.g. "TOK" or "TOK person") every caption must
            contain, on word boundaries, case-insensitive; None skips the check.

    Returns:
        ``{file_name: caption}`` in dataset order; file names are relative to ``dataset_dir``.

    Raises:
        CaptionError: naming every file without a caption, with an empty caption or without
            the identifier; or when there are no images at all. Images listed in
            ``metadata.jsonl`` but missing on disk are left out with a warning instead.
    """
    dataset_dir = Path(dataset_dir)
    entries, notes, differ = _gather(dataset_dir)
    for message in notes:
        warnings.warn(message, CaptionWarning, stacklevel=2)
    if differ:
        warnings.warn(f"{len(differ)} caption(s) differ between the .txt files and {METADATA}; using the .txt files: "
                      + ", ".join(differ), CaptionWarning, stacklevel=2)
    captions, problems = {}, {}
    for e in entries:
        if not e.path.is_file():  # already warned about; training skips it
            continue
        text = _text_of(e)
        problem = _problem(e, text, require_identifier)
        if problem:
            problems[e.file_name] = problem
        else:
            captions[e.file_name] = text
    if problems:
        lines = "\n".join(f"  {name}: {why}" for name, why in problems.items())
        raise CaptionError(f"{len(problems)} of {len(entries)} image(s) in {dataset_dir} cannot be trained on:\n{lines}",
                           problems)
    if not captions:
        raise CaptionError(f"no images in {dataset_dir}: every file listed in {METADATA} is missing; run prepare again")
    return captions


def caption_table(dataset_dir: str | Path, *, identifier: str | None = None, tokenizer=None) -> list[CaptionRow]:
    """Every image with its caption, token count and problem; never raises for bad captions.

    Args:
        dataset_dir: the dataset folder.
        identifier: the word every caption needs; None reads it from ``caption_config.json``.
        tokenizer: CLIP tokenizer; None uses the rough estimate.

    Returns:
        One :class:`CaptionRow` per image, in dataset order.
    """
    dataset_dir = Path(dataset_dir)
    if identifier is None:
        identifier = read_caption_config(dataset_dir).get("identifier")
    rows = []
    for e in _entries(dataset_dir)[0]:
        text = _text_of(e)
        rows.append(CaptionRow(
            file_name=e.file_name, path=e.path, text=text,
            tokens=clip_token_count(text, tokenizer) if text else None,
            has_identifier=bool(text and identifier and identifier_pattern(identifier).search(text)),
            problem=_problem(e, text, identifier),
        ))
    return rows


def save_caption(dataset_dir: str | Path, file_name: str, text: str) -> str:
    """Save a hand-edited caption to both formats (sidecar and metadata.jsonl), atomically.

    Args:
        dataset_dir: the dataset folder.
        file_name: the image, relative to ``dataset_dir`` (as in :func:`load_captions`).
        text: the caption; surrounding whitespace and line breaks are collapsed.

    Returns:
        The caption as saved.

    Raises:
        CaptionError: for an empty caption or an image not in the dataset.
    """
    dataset_dir = Path(dataset_dir)
    text = re.sub(r"\s+", " ", text or "").strip()
    if not text:
        raise CaptionError(f"{file_name}: empty caption not saved; write a caption", {file_name: "empty caption"})
    entries, _ = _entries(dataset_dir)
    match = [e for e in entries if e.file_name == file_name]
    if not match:
        raise CaptionError(f"{file_name}: not an image of {dataset_dir}", {file_name: "unknown image"})
    write_text(match[0].sidecar_path, text + "\n")
    captions = {e.file_name: t for e in entries if (t := _text_of(e))}
    captions[file_name] = text
    _write_metadata(dataset_dir, entries, captions)
    return text


# --------------------------------------------------------------------------- CLI


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``python -m lora_helpers caption``."""
    d = CaptionConfig()
    parser.add_argument("dataset_dir", type=Path, help="dataset folder (prepare's output, images/, or a folder of images)")
    parser.add_argument("--token", default=d.token, help="rare identifier word (default %(default)s)")
    parser.add_argument("--class-noun", default=d.class_noun, help="what the person is (default %(default)s)")
    parser.add_argument("--name", default=None, help="optional name after the class noun ('TOK person Ada')")
    parser.add_argument("--format", dest="identifier_format", choices=("tok", "at"), default=d.identifier_format,
                        help="'tok': 'TOK person [name]'; 'at': '@name'")
    parser.add_argument("--template", default=d.template, help="caption template (default %(default)r)")
    parser.add_argument("--model", default=None,
                        help="BLIP hub id or folder, or 'base'/'large' (default: base; the tiny model in smoke mode)")
    parser.add_argument("--batch-size", type=int, default=d.batch_size)
    parser.add_argument("--num-beams", type=int, default=d.num_beams, help="1 = greedy")
    parser.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    parser.add_argument("--prompt", default=None, help="text for BLIP to continue, e.g. 'a picture of'")
    parser.add_argument("--overwrite", action="store_true", help="re-caption images that have captions (loses hand edits)")


def run_cli(args: argparse.Namespace) -> int:
    """Caption the dataset and print each caption; exit 1 when an image got no caption."""
    config = CaptionConfig(
        model=args.model, token=args.token, class_noun=args.class_noun, name=args.name,
        identifier_format=args.identifier_format, template=args.template, batch_size=args.batch_size,
        num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, repetition_penalty=args.repetition_penalty,
        prompt=args.prompt, overwrite=args.overwrite,
    )
    try:
        result = caption_dataset(args.dataset_dir, config=config)
    except (CaptionError, FileNotFoundError) as exc:
        print(f"error: {exc}")
        return 1
    for name, text in result.captions.items():
        how = "kept" if name in result.kept else "new"
        print(f"[{how}] {name}: {text}")
    for name, why in result.failed.items():
        print(f"[failed] {name}: {why}")
    rate = f", {result.images_per_second:.2f} images/s" if result.generated else ""
    print(f"subject {result.subject!r}: {len(result.generated)} captioned, {len(result.kept)} kept, "
          f"{len(result.failed)} failed{rate}; wrote {args.dataset_dir / METADATA} and .txt sidecars")
    for message in result.warnings:
        print(f"warning: {message}")
    return 1 if result.failed else 0
