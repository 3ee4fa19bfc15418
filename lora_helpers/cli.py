"""Command line: ``python -m lora_helpers SUBCOMMAND ...``.

Each stage module owns its subcommand through two functions,
``add_cli_arguments(parser)`` and ``run_cli(args) -> int``; this file only lists them,
so a stage's flags live next to the code they configure.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys

__all__ = ["SUBCOMMANDS", "EXPECTED_ERRORS", "build_parser", "describe_error", "main"]

# name -> (module, one-line help); each module holds add_cli_arguments and run_cli.
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
    """Build the top-level parser with one subparser per stage."""
    parser = argparse.ArgumentParser(
        prog="python -m lora_helpers",
        description="Personalise Stable Diffusion XL with a LoRA: prepare -> caption -> train -> generate -> evaluate.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full Python traceback of an error")
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_cli_arguments(p)
        p.set_defaults(_run=module.run_cli)
    return parser


def describe_error(exc: BaseException) -> str:
    """One or two lines for an expected failure: what went wrong, naming the file, and what to do."""
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        where = f" writing {exc.filename}" if exc.filename else ""
        return f"error: the disk is full{where}; free some space (or choose a folder on another disk) and run again"
    if isinstance(exc, PermissionError) and exc.filename:
        return f"error: no permission to write {exc.filename}; choose a folder you can write to"
    if isinstance(exc, (IsADirectoryError, NotADirectoryError, FileExistsError)) and exc.filename:
        return f"error: {exc.filename}: {exc.strerror or exc}; a file stands where a folder should be, or the other way round"
    return f"error: {exc}"


# Failures that bad input, a full disk or a wrong path cause: a sentence, not a traceback.
EXPECTED_ERRORS = (OSError, ValueError, RuntimeError, ImportError, ArithmeticError)


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
    except EXPECTED_ERRORS as exc:
        if args.debug:
            raise
        print(describe_error(exc), file=sys.stderr)
        print("(run with --debug for the full traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
