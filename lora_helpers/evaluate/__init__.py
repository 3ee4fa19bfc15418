"""Stage 5: identity likeness and prompt adherence of generated images, scores.csv and plots (notebook 05)."""

from lora_helpers.evaluate.metrics import (
    ARCFACE_SAME_PERSON_COSINE, ClipScorer, IdentityScore, ReferenceSet, clip_image_scores, clip_scores, diversity,
    face_backend, identity_scores, identity_summary, load_clip, reference_embeddings, remove_identifier,
)
from lora_helpers.evaluate.plots import plot_identity_vs_prompt
from lora_helpers.evaluate.scoring import (
    PROMPTS_PEOPLE, Choice, EvalPrompt, EvaluateConfig, EvaluationResult, best_checkpoint, evaluate_images,
    evaluate_run, format_summary, identity_validation_hook, people_prompts, read_scores_csv, summarize,
    write_scores_csv,
)

__all__ = [
    "ARCFACE_SAME_PERSON_COSINE", "ClipScorer", "IdentityScore", "ReferenceSet", "clip_image_scores", "clip_scores",
    "diversity", "face_backend", "identity_scores", "identity_summary", "load_clip", "reference_embeddings",
    "remove_identifier", "plot_identity_vs_prompt",
    "PROMPTS_PEOPLE", "Choice", "EvalPrompt", "EvaluateConfig", "EvaluationResult", "best_checkpoint", "evaluate_images",
    "evaluate_run", "format_summary", "identity_validation_hook", "people_prompts", "read_scores_csv", "summarize",
    "write_scores_csv",
]
