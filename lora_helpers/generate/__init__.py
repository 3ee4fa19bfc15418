"""Stage 4: SDXL with a LoRA: generation, labelled grids, the image cache (notebook 04)."""

from lora_helpers.generate.cache import ImageCache
from lora_helpers.generate.combine import LoraSet, load_loras, run_slug
from lora_helpers.generate.grids import (
    DEFAULT_SCALES, GRID_KINDS, GridResult, base_vs_lora, checkpoint_progress, prompt_seed_grid, scale_sweep,
)
from lora_helpers.generate.images import GeneratedImage, fill_subject, generate_images, save_images
from lora_helpers.generate.lora import (
    LoraInfo, activate_lora, find_lora_file, fuse_lora, load_lora, lora_digest, unfuse_lora, unload_lora,
)
from lora_helpers.generate.pipeline import MEMORY_SAVING_MODES, choose_base_model, describe_pipeline, load_pipeline
from lora_helpers.generate.settings import (
    MAX_SEED, SCHEDULERS, GenerateConfig, check_number, check_prompts, check_seed, check_seeds, check_size,
    check_steps, cli_type, resolve_size, resolve_steps,
)

__all__ = [
    "ImageCache", "LoraSet", "load_loras", "run_slug",
    "DEFAULT_SCALES", "GRID_KINDS", "SCHEDULERS", "GenerateConfig", "GeneratedImage", "GridResult", "base_vs_lora",
    "checkpoint_progress", "fill_subject", "generate_images", "prompt_seed_grid", "resolve_size", "resolve_steps",
    "save_images", "scale_sweep",
    "MAX_SEED", "check_number", "check_prompts", "check_seed", "check_seeds", "check_size", "check_steps", "cli_type",
    "MEMORY_SAVING_MODES", "LoraInfo", "activate_lora", "choose_base_model", "describe_pipeline", "find_lora_file",
    "fuse_lora", "load_lora", "load_pipeline", "lora_digest", "unfuse_lora", "unload_lora",
]
