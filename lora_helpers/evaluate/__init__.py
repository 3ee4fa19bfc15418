"""Stage 5: identity likeness (against training and held-out photos), memorisation, prompt adherence,
scores.csv and plots, and runs compared side by side (notebook 05)."""

from lora_helpers.evaluate.choice import Choice, best_checkpoint
from lora_helpers.evaluate.compare import Comparison, compare_runs, format_comparison
from lora_helpers.evaluate.config import EvaluateConfig
from lora_helpers.evaluate.hooks import identity_validation_hook
from lora_helpers.evaluate.identity import (
    IdentityScore, ReferenceSet, identity_scores, identity_summary, reference_embeddings, without_trained_photos,
)
from lora_helpers.evaluate.memorisation import COPY_THRESHOLD, CopyIndex, CopyMatch, copy_index, fingerprint
from lora_helpers.evaluate.metrics import (
    ARCFACE_SAME_PERSON_COSINE, ClipScorer, clip_image_scores, clip_scores, diversity, face_backend, load_clip,
    remove_identifier,
)
from lora_helpers.evaluate.plots import plot_comparison, plot_identity_vs_prompt
from lora_helpers.evaluate.prompts import PROMPTS_PEOPLE, EvalPrompt, people_prompts
from lora_helpers.evaluate.report import EvaluationResult, format_summary, held_out_line
from lora_helpers.evaluate.run import evaluate_run
from lora_helpers.evaluate.scores_csv import read_scores_csv, write_scores_csv
from lora_helpers.evaluate.scoring import evaluate_images
from lora_helpers.evaluate.summary import memorised_rows, summarize

__all__ = [
    "ARCFACE_SAME_PERSON_COSINE", "ClipScorer", "IdentityScore", "ReferenceSet", "clip_image_scores", "clip_scores",
    "diversity", "face_backend", "identity_scores", "identity_summary", "load_clip", "reference_embeddings",
    "remove_identifier", "plot_identity_vs_prompt", "plot_comparison", "without_trained_photos",
    "COPY_THRESHOLD", "CopyIndex", "CopyMatch", "copy_index", "fingerprint",
    "PROMPTS_PEOPLE", "Choice", "Comparison", "EvalPrompt", "EvaluateConfig", "EvaluationResult", "best_checkpoint",
    "compare_runs", "evaluate_images", "evaluate_run", "format_comparison", "format_summary",
    "held_out_line", "identity_validation_hook", "memorised_rows", "people_prompts", "read_scores_csv", "summarize",
    "write_scores_csv",
]
