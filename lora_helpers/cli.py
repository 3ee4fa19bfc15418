"""Command line: ``python -m lora_helpers SUBCOMMAND ...``.

Each stage module owns its subcommand through two functions,
``add_cli_arguments(parser)`` and ``run_cli(args) -> int``; this file only lists them,
so a stage's flags live next to the code they configure.
"""

from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

# name -> (module, one-line help). Modules are imported lazily: `--help` stays fast
# and one stage's heavy imports do not slow down another's.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "tiny-models": ("lora_helpers.core.tiny_models", "build the tiny offline models (tests, smoke mode) into a folder"),
    "prepare": ("lora_helpers.prepare.stage", "check photos and write face-centred aligned crops, masks and a report"),
    "caption": ("lora_helpers.caption.stage", "caption prepared photos with BLIP and an identifier such as 'TOK person'"),
    "train": ("lora_helpers.train.stage", "train an SDXL LoRA (DreamBooth) on a captioned dataset"),
    "generate": ("lora_helpers.generate.cli", "generate images and grids with a trained LoRA"),
    "evaluate": ("lora_helpers.evaluate.cli", "score identity likeness and prompt adherence of generated images"),
    "demo": ("lora_helpers.demo", "run the whole pipeline on sample_data/ (tiny models on CPU, or real SDXL)"),
}


def build_parser() -> argparse.ArgumentParser:
    """Build the top-level parser with one subparser per available stage."""
    parser = argparse.ArgumentParser(
        prog="python -m lora_helpers",
        description="Personalise Stable Diffusion XL with a LoRA: prepare -> caption -> train -> generate -> evaluate.",
    )
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name == module_name:  # stage not part of this build
                continue
            raise
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_cli_arguments(p)
        p.set_defaults(_run=module.run_cli)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted; outputs written so far are complete and kept", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
