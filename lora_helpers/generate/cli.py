"""``python -m lora_helpers generate``: images and a grid from a run folder or a LoRA file."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from lora_helpers.core.lora_files import LoraFileError, read_safetensors, refuse_nonfinite
from lora_helpers.generate.cache import ImageCache
from lora_helpers.generate.combine import load_loras
from lora_helpers.generate.grids import (
    DEFAULT_SCALES, GRID_KINDS, base_vs_lora, checkpoint_progress, prompt_seed_grid, scale_sweep,
)
from lora_helpers.generate.images import SCHEDULERS, GenerateConfig, generate_images, save_images
from lora_helpers.generate.lora import find_lora_file, fuse_lora, load_lora
from lora_helpers.generate.pipeline import MEMORY_SAVING_MODES, choose_base_model, load_pipeline
from lora_helpers.generate.settings import check_number, check_prompts, check_seed, check_size, check_steps, cli_type

__all__ = ["add_cli_arguments", "run_cli"]


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the flags of ``python -m lora_helpers generate`` to ``parser``.

    Args:
        parser: the subcommand's parser.
    """
    parser.add_argument("source", help="run folder, or a LoRA .safetensors file (diffusers or kohya/A1111 layout)")
    parser.add_argument("--prompt", "-p", dest="prompts", action="append", required=True,
                        help="prompt; repeat for several. {subject} becomes the run's trigger phrase; with several "
                             "people {NAME} calls one (a run folder's name, or a person of a run of several)")
    parser.add_argument("--negative-prompt", default="", help="what to avoid (default: none)")
    # Checked while parsing, so a bad number is one line naming the flag before any model loads.
    parser.add_argument("--seeds", type=cli_type(check_seed), nargs="+", default=[0],
                        help="seeds, whole numbers from 0 to 2**64-1 (default: 0)")
    parser.add_argument("--size", type=cli_type(check_size), default=None,
                        help="square size in px, a multiple of 8: 512 or 1024 (default 1024; 64 in smoke mode)")
    parser.add_argument("--steps", type=cli_type(check_steps), default=None, help="denoising steps (default 30; 2 in smoke mode)")
    parser.add_argument("--guidance", type=cli_type(partial(check_number, name="guidance", example="5.0", minimum=0)),
                        default=GenerateConfig.guidance, help="guidance scale (default %(default)s)")
    scale = cli_type(partial(check_number, name="scale", example="1.0"))
    parser.add_argument("--scale", type=scale, default=1.0, help="LoRA strength (default 1.0)")
    parser.add_argument("--also", nargs="+", default=[], metavar="RUN",
                        help="more run folders or LoRA files to combine with SOURCE (two people in one picture)")
    parser.add_argument("--weights", type=scale, nargs="+", default=None,
                        help="one strength per LoRA with --also, SOURCE first (default 1.0 each; try 0.8 0.8)")
    parser.add_argument("--scales", type=scale, nargs="+", default=list(DEFAULT_SCALES), help="strengths for --grid scale")
    parser.add_argument("--grid", choices=GRID_KINDS, default=None, help="also write a grid of this kind")
    parser.add_argument("--out", type=Path, default=Path("outputs/generate"), help="output folder (default %(default)s)")
    parser.add_argument("--base-model", default=None, help="SDXL hub id or folder (default: the run's, else SDXL base 1.0)")
    parser.add_argument("--vae", default="auto", help="VAE hub id or folder; 'auto' = fp16-fix VAE on GPU; 'none' = the base model's")
    parser.add_argument("--scheduler", default=None, help=f"one of {', '.join(SCHEDULERS)} or a diffusers class name")
    parser.add_argument("--trigger", default=None, help="phrase for {subject} (default: the run's config.json)")
    parser.add_argument("--fuse", action="store_true", help="fuse the LoRA into the weights (faster at one scale)")
    parser.add_argument("--memory-saving", choices=MEMORY_SAVING_MODES, default="auto", help="default %(default)s")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: CUDA when present)")
    parser.add_argument("--cache-dir", type=Path, default=None, help="image cache folder (default: OUT/cache)")
    parser.add_argument("--no-cache", action="store_true", help="always run the model")


def run_cli(args: argparse.Namespace) -> int:
    """Generate the requested images (and grid) and print where they went.

    Args:
        args: parsed flags (see :func:`add_cli_arguments`).

    Returns:
        The exit code: 0, or 2 on bad input (the message goes to stderr).
    """
    try:
        # Every setting before the slow model load: a mistake costs a second, not minutes.
        config = GenerateConfig(negative_prompt=args.negative_prompt, size=args.size, steps=args.steps,
                                guidance=args.guidance, scheduler=args.scheduler)
        check_prompts(args.prompts)
        base = choose_base_model(args.source, args.base_model)
        if args.grid == "checkpoints" and not Path(args.source).is_dir():
            raise ValueError("--grid checkpoints needs a run folder as SOURCE")
        sources = [args.source, *args.also]
        if args.also and (args.fuse or args.grid == "checkpoints"):
            raise ValueError("--also combines LoRAs unfused and without --grid checkpoints; drop --fuse / --grid checkpoints")
        if args.weights is not None and len(args.weights) != len(sources):
            raise ValueError(f"--weights: {len(args.weights)} given for {len(sources)} LoRAs (SOURCE and --also); "
                             "give one each, e.g. --weights 0.8 0.8")
        # A bad path, a damaged file or NaN weights fail here, before the slow model load.
        for source in sources:
            lora_file, _ = find_lora_file(source)
            refuse_nonfinite(lora_file, read_safetensors(lora_file)[0])
        pipe = load_pipeline(base, vae=None if str(args.vae).lower() == "none" else args.vae, device=args.device,
                             memory_saving=args.memory_saving)
        if args.also:
            info = load_loras(pipe, sources, weights=args.weights, scale=args.scale)
        else:
            info = load_lora(pipe, args.source, scale=args.scale, trigger=args.trigger)
        if args.fuse:
            fuse_lora(pipe, info)
        cache = None if args.no_cache else ImageCache(args.cache_dir or args.out / "cache")
        print(info)
        items = generate_images(pipe, args.prompts, args.seeds, config=config, lora_info=info, cache=cache)
        for path in save_images(items, args.out / "images"):
            print(path)
        if args.grid:
            if args.grid == "prompt-seed":
                grid = prompt_seed_grid(pipe, args.prompts, args.seeds, config=config, lora_info=info, cache=cache)
            elif args.grid == "scale":
                grid = scale_sweep(pipe, info, args.prompts, args.seeds, scales=args.scales, config=config, cache=cache)
            elif args.grid == "checkpoints":
                grid = checkpoint_progress(pipe, args.source, args.prompts, seeds=args.seeds, config=config,
                                           cache=cache, scale=args.scale)
            else:
                grid = base_vs_lora(pipe, info, args.prompts, args.seeds, config=config, cache=cache)
            print(grid.save(args.out / f"grid_{args.grid}.png"))
        hits = sum(it.cached for it in items)
        print(f"{len(items)} images in {args.out / 'images'} ({hits} from the cache)"
              + (f", grid in {args.out / f'grid_{args.grid}.png'}" if args.grid else ""))
        return 0
    except (LoraFileError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
