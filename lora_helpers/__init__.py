"""lora_helpers: personalise Stable Diffusion XL with a LoRA from a few photos.

Stages (each a module, a notebook and a CLI subcommand):
prepare -> caption -> train -> generate/inspect -> evaluate.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
