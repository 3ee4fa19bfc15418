"""lora_helpers: personalise Stable Diffusion XL with a LoRA from a few photos.

Stages (each a module, a notebook and a CLI subcommand):
prepare -> caption -> train -> generate/inspect -> evaluate.
"""

from importlib import metadata as _metadata

try:
    # One source of truth: the version pyproject.toml gave the installed distribution.
    __version__ = _metadata.version("lora_helpers")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
