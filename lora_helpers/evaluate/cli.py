"""``python -m lora_helpers evaluate``: score a training run or a folder of images."""

from __future__ import annotations

import argparse
from pathlib import Path

from lora_helpers.core.run_folder import CONFIG_FILE, DEFAULT_TOKEN
from lora_helpers.evaluate.config import EvaluateConfig
from lora_helpers.evaluate.metrics import reference_embeddings
from lora_helpers.evaluate.prompts import PROMPTS_PEOPLE
from lora_helpers.evaluate.report import format_summary, write_evaluation
from lora_helpers.evaluate.run import evaluate_run
from lora_helpers.evaluate.scoring import evaluate_images

__all__ = ["add_cli_arguments", "run_cli"]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``python -m lora_helpers evaluate`` to ``parser``.

    Args:
        parser: the subcommand's parser.
    """
    d = EvaluateConfig()
    parser.add_argument("target", type=Path, help="a training run folder (has config.json) or a folder of images")
    parser.add_argument("--references", type=Path, required=True,
                        help="the person's photos: a prepared dataset/ folder or a plain folder of photos")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: TARGET/evaluation)")
    parser.add_argument("--checkpoints", default="all", help="'all', 'final', or comma-separated names or steps")
    parser.add_argument("--max-checkpoints", type=int, default=d.max_checkpoints,
                        help="with 'all': at most this many, evenly spaced (0: no limit)")
    parser.add_argument("--scales", type=float, nargs="+", default=list(d.scales), help="LoRA scales (0 = base model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(d.seeds))
    parser.add_argument("--categories", nargs="+", default=None, choices=list(PROMPTS_PEOPLE))
    parser.add_argument("--prompts-per-category", type=int, default=None)
    parser.add_argument("--prompts-file", type=Path, default=None, help="one prompt template per line ({subject} is filled in)")
    parser.add_argument("--identifier", default=None, help="word removed from prompts before CLIP-T (default: the run's trigger, or TOK)")
    parser.add_argument("--clip-model", default=None, help="CLIP hub id or folder (default: ViT-L/14; tiny in smoke mode)")
    parser.add_argument("--no-clip", action="store_true", help="identity only")
    parser.add_argument("--face-backend", default=d.face_backend, choices=["dlib", "dlib5", "insightface"])
    parser.add_argument("--threshold", type=float, default=None, help="same-person cosine (default: the backend's)")
    parser.add_argument("--identity-weight", type=float, default=d.identity_weight)
    parser.add_argument("--min-prompt-adherence", type=float, default=None, help="absolute CLIP-T floor for the choice")
    parser.add_argument("--steps", type=int, default=None, help="inference steps (default: the generate stage's)")
    parser.add_argument("--guidance-scale", type=float, default=None)
    parser.add_argument("--resolution", type=int, default=None)


def run_cli(args: argparse.Namespace) -> int:
    """Run ``python -m lora_helpers evaluate``: a run folder is generated and scored, a folder of images scored.

    Args:
        args: parsed flags (see :func:`add_cli_arguments`).

    Returns:
        The exit code: 0, 1 on bad input (the message is printed), 2 when the target is not a folder.
    """
    ckpts = args.checkpoints if args.checkpoints in ("all", "final") else [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    config = EvaluateConfig(
        face_backend=args.face_backend, threshold=args.threshold, clip_model=args.clip_model, use_clip=not args.no_clip,
        seeds=tuple(args.seeds), scales=tuple(args.scales), checkpoints=ckpts, max_checkpoints=args.max_checkpoints or None,
        categories=tuple(args.categories) if args.categories else None, prompts_per_category=args.prompts_per_category,
        identity_weight=args.identity_weight, min_prompt_adherence=args.min_prompt_adherence,
        num_inference_steps=args.steps, guidance_scale=args.guidance_scale, resolution=args.resolution,
    )
    target: Path = args.target
    if not target.is_dir():
        print(f"error: {target} is not a folder (give a run folder or a folder of images)")
        return 2
    out = args.out or target / "evaluation"
    templates = None
    if args.prompts_file:
        templates = [l.strip() for l in args.prompts_file.read_text(encoding="utf-8").splitlines() if l.strip()]
    try:
        if (target / CONFIG_FILE).is_file():
            result = evaluate_run(target, references=args.references, prompts=templates, config=config, out_dir=out,
                                  identifier=args.identifier)
        else:
            refs = reference_embeddings(args.references, backend=config.face_backend, threshold=config.threshold)
            rows = evaluate_images(target, references=refs, config=config, identifier=args.identifier or DEFAULT_TOKEN)
            result = write_evaluation(rows, refs, config, Path(out), extra={"images": str(target)})
    except (FileNotFoundError, ValueError, ModuleNotFoundError) as exc:
        print(f"error: {exc}")
        return 1
    print(format_summary(result))
    print(f"scores: {result.files['scores']}")
    return 0
