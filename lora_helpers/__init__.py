"""lora_helpers: personalise Stable Diffusion XL with a LoRA from a few photos.

Stages (each a module, a notebook and a CLI subcommand):
prepare -> caption -> train -> generate/inspect -> evaluate.
"""

import logging as _logging
from importlib import metadata as _metadata

try:
    # One source of truth: the version pyproject.toml gave the installed distribution.
    __version__ = _metadata.version("lora_helpers")
except _metadata.PackageNotFoundError:  # a source tree on sys.path, not installed
    __version__ = "0+unknown"

__all__ = ["__version__"]

# diffusers imports bitsandbytes whenever it is installed, and on CPUs with AVX512-BF16 bitsandbytes
# then warns that an optional package for its 4-bit CPU kernel ("kernels") is missing: a line asking
# for a pip install in every notebook, about a path we never take (4-bit weights are for CUDA here).
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(
    lambda record: "gemm_4bit_forward" not in record.getMessage())
