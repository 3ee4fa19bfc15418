"""Stage 2: BLIP captions with one identifier per caption ("TOK person"), written beside dataset/ (notebook 02)."""

from lora_helpers.caption.blip import BLIP_MODELS, generate_captions, load_blip
from lora_helpers.caption.files import (
    CaptionError, CaptionRow, CaptionWarning, caption_table, load_captions, read_metadata, save_caption,
    subject_triggers,
)
from lora_helpers.caption.config import parse_subject_settings
from lora_helpers.caption.subjects import shared_token_warnings
from lora_helpers.caption.stage import (
    CaptionConfig, CaptionResult, caption_dataset, dataset_identifiers, identifier_warnings, subject_phrase,
)
from lora_helpers.caption.text import (
    CLIP_MAX_TOKENS, COMMON_WORDS, check_identifier, clip_token_count, count_identifier, identifier_of,
    load_clip_tokenizer, standardise_caption,
)

__all__ = [
    "BLIP_MODELS", "CaptionConfig", "CaptionError", "CaptionResult", "CaptionRow", "CaptionWarning", "caption_dataset",
    "caption_table", "generate_captions", "load_blip", "load_captions", "read_metadata", "save_caption", "subject_phrase",
    "CLIP_MAX_TOKENS", "COMMON_WORDS", "check_identifier", "clip_token_count", "count_identifier", "identifier_of",
    "load_clip_tokenizer", "standardise_caption",
    "dataset_identifiers", "identifier_warnings", "parse_subject_settings", "shared_token_warnings", "subject_triggers",
]
