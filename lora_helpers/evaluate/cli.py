"""``python -m lora_helpers evaluate``: score a training run or a folder of images, or compare runs."""

from __future__ import annotations

import argparse
from functools import partial
from pathlib import Path
from typing import Callable

from lora_helpers.core.run_folder import CONFIG_FILE, DEFAULT_TOKEN
from lora_helpers.evaluate.compare import compare_runs, format_comparison
from lora_helpers.evaluate.config import EvaluateConfig
from lora_helpers.evaluate.identity import reference_embeddings
from lora_helpers.evaluate.prompts import PROMPTS_PEOPLE, read_prompts_file
from lora_helpers.evaluate.report import format_summary, write_evaluation
from lora_helpers.evaluate.run import evaluate_run
from lora_helpers.evaluate.scoring import evaluate_images
from lora_helpers.generate import check_number, check_seed, check_size, check_steps, cli_type

__all__ = ["add_cli_arguments", "run_cli"]


def _count(text: str, name: str, example: str, least: int) -> int:
    """A whole number of at least ``least``, or ValueError naming the flag (wrapped by ``cli_type``)."""
    try:
        value = int(text)
    except ValueError:
        value = least - 1
    if value < least:
        raise ValueError(f"{name} must be a whole number of at least {least}, e.g. {example}; not {text!r}")
    return value


def _number(name: str, example: str, **bounds) -> Callable[[str], float]:
    """An argparse type for a finite number within ``bounds`` (see ``check_number``)."""
    return cli_type(partial(check_number, name=name, example=example, **bounds))


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``python -m lora_helpers evaluate`` to ``parser``.

    Args:
        parser: the subcommand's parser.
    """
    d = EvaluateConfig()
    parser.add_argument("target", type=Path, help="a training run folder (has config.json) or a folder of images")
    parser.add_argument("--references", type=Path, required=True,
                        help="the person's photos: a prepared dataset/ folder (its held-out photos give the held-out "
                             "identity) or a plain folder of photos")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: TARGET/evaluation)")
    parser.add_argument("--compare", type=Path, nargs="+", default=None, metavar="OTHER_RUN",
                        help="also evaluate these runs with the same prompts, seeds and references, and write "
                             "comparison.csv and comparison.png beside TARGET's scores (each run at its best checkpoint)")
    parser.add_argument("--checkpoints", default="all", help="'all', 'final', or comma-separated names or steps")
    # Numbers are checked while parsing: one line naming the flag, before references or models load.
    parser.add_argument("--max-checkpoints", type=cli_type(partial(_count, name="max-checkpoints", example="4", least=0)),
                        default=d.max_checkpoints, help="with 'all': at most this many, evenly spaced (0: no limit)")
    parser.add_argument("--scales", type=_number("scale", "1.0", minimum=0), nargs="+", default=list(d.scales),
                        help="LoRA scales (0 = base model)")
    parser.add_argument("--seeds", type=cli_type(check_seed), nargs="+", default=list(d.seeds),
                        help="seeds, whole numbers from 0 to 2**64-1")
    parser.add_argument("--categories", nargs="+", default=None, choices=list(PROMPTS_PEOPLE))
    parser.add_argument("--prompts-per-category", default=None,
                        type=cli_type(partial(_count, name="prompts-per-category", example="2", least=1)))
    parser.add_argument("--prompts-file", type=Path, default=None,
                        help="UTF-8 text file, one prompt template per line ({subject} is filled in)")
    parser.add_argument("--identifier", default=None, help="word removed from prompts before CLIP-T (default: the run's trigger, or TOK)")
    parser.add_argument("--clip-model", default=None, help="CLIP hub id or folder (default: ViT-L/14; tiny in smoke mode)")
    parser.add_argument("--no-clip", action="store_true", help="identity only")
    parser.add_argument("--face-backend", default=d.face_backend, choices=["dlib", "dlib5", "insightface"])
    parser.add_argument("--threshold", type=_number("threshold", "0.91", minimum=-1, maximum=1), default=None,
                        help="same-person cosine (default: the backend's)")
    parser.add_argument("--copy-threshold", type=_number("copy-threshold", "0.9", minimum=-1, maximum=1),
                        default=d.copy_threshold,
                        help="fingerprint correlation from which an image is a near-copy of a training photo")
    parser.add_argument("--identity-weight", type=_number("identity-weight", "0.7", minimum=0, maximum=1),
                        default=d.identity_weight)
    parser.add_argument("--min-prompt-adherence", type=_number("min-prompt-adherence", "0.2", minimum=0), default=None,
                        help="absolute CLIP-T floor for the choice")
    parser.add_argument("--steps", type=cli_type(check_steps), default=None, help="inference steps (default: the generate stage's)")
    parser.add_argument("--guidance-scale", type=_number("guidance-scale", "5.0", minimum=0), default=None)
    parser.add_argument("--resolution", type=cli_type(partial(check_size, name="resolution")), default=None,
                        help="square size in px, a multiple of 8 (default: the generate stage's)")


def run_cli(args: argparse.Namespace) -> int:
    """Run ``python -m lora_helpers evaluate``: a run folder is generated and scored, a folder of images scored.

    Bad input (a missing folder or prompts file, no face in the references, a damaged LoRA)
    raises; ``lora_helpers.cli.main`` prints it as one ``error:`` line and exits 1.

    Args:
        args: parsed flags (see :func:`add_cli_arguments`).

    Returns:
        The exit code: 0.
    """
    ckpts = args.checkpoints if args.checkpoints in ("all", "final") else [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    config = EvaluateConfig(
        face_backend=args.face_backend, threshold=args.threshold, clip_model=args.clip_model, use_clip=not args.no_clip,
        copy_threshold=args.copy_threshold,
        seeds=tuple(args.seeds), scales=tuple(args.scales), checkpoints=ckpts, max_checkpoints=args.max_checkpoints or None,
        categories=tuple(args.categories) if args.categories else None, prompts_per_category=args.prompts_per_category,
        identity_weight=args.identity_weight, min_prompt_adherence=args.min_prompt_adherence,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, resolution=args.resolution,
    )
    # Inputs are read before the references are embedded and any model loads.
    templates = read_prompts_file(args.prompts_file) if args.prompts_file else None
    target: Path = args.target
    if not target.is_dir():
        raise FileNotFoundError(f"{target} is not a folder; give a training run folder or a folder of images")
    out = args.out or target / "evaluation"
    is_run = (target / CONFIG_FILE).is_file()
    for other in args.compare or []:  # checked before the first run is evaluated, not after an hour of it
        if not is_run or not (other / CONFIG_FILE).is_file():
            bad = target if not is_run else other
            raise FileNotFoundError(f"--compare compares training runs: {bad / CONFIG_FILE} not found "
                                    "(give run folders written by `python -m lora_helpers train`)")
    # Embedded once: every compared run is scored against the same photos (each run then drops
    # the held-out photos it trained on).
    refs = reference_embeddings(args.references, backend=config.face_backend, threshold=config.threshold,
                                copy_threshold=config.copy_threshold)
    if is_run:
        result = evaluate_run(target, references=refs, prompts=templates, config=config, out_dir=out,
                              identifier=args.identifier)
    else:
        rows = evaluate_images(target, references=refs, config=config, identifier=args.identifier or DEFAULT_TOKEN)
        result = write_evaluation(rows, refs, config, Path(out), extra={"images": str(target)})
    print(format_summary(result))
    print(f"scores: {result.files['scores']}")
    if args.compare:
        comparison = compare_runs([result, *args.compare], references=refs, config=config,
                                  prompts=templates, out_dir=out)
        print(format_comparison(comparison))
        print(f"comparison: {comparison.files['table']}")
    return 0
