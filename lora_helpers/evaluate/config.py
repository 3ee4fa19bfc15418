"""Settings of the evaluation stage: face backend, CLIP, what to generate and how to choose."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["EvaluateConfig"]


@dataclass
class EvaluateConfig:
    """Settings for the evaluation stage.

    Attributes:
        face_backend: ``"dlib"`` (offline, default) or ``"insightface"`` (ArcFace, when installed).
        threshold: same-person cosine; None takes the backend's own (dlib 0.91, ArcFace 0.4).
        clip_model: CLIP hub id or folder; None takes ``resolve_models().clip``
            (ViT-L/14, or the tiny CLIP in smoke mode).
        use_clip: compute CLIP-T, CLIP-I and diversity (identity needs no CLIP).
        seeds: seeds per prompt; the same seeds for every checkpoint and scale.
        scales: LoRA scales; 0.0 is the base model (the lower bound), generated once.
        checkpoints: ``"all"`` (every ``checkpoint-<step>`` and the final weights),
            ``"final"``, or a list of checkpoint names or steps.
        max_checkpoints: with more, evenly spaced ones are evaluated (the last included).
        categories: prompt categories from :data:`lora_helpers.evaluate.prompts.PROMPTS_PEOPLE` (None: all).
        prompts_per_category: keep the first N prompts of each category (None: all).
        identity_weight: weight of identity against prompt adherence in
            :func:`lora_helpers.evaluate.choice.best_checkpoint`.
        min_prompt_adherence: absolute CLIP-T floor for the choice.
        min_adherence_vs_base: CLIP-T floor as a share of the base model's CLIP-T.
        num_inference_steps, guidance_scale, resolution: generation settings
            (None: the generate stage's defaults).
        batch_size: images per CLIP forward pass.
    """

    face_backend: str = "dlib"
    threshold: float | None = None
    clip_model: str | None = None
    use_clip: bool = True
    seeds: tuple[int, ...] = (0, 1, 2, 3)
    scales: tuple[float, ...] = (0.0, 0.5, 0.8, 1.0)
    checkpoints: str | Sequence[str | int] = "all"
    max_checkpoints: int | None = 4
    categories: tuple[str, ...] | None = None
    prompts_per_category: int | None = None
    identity_weight: float = 0.7
    min_prompt_adherence: float | None = None
    min_adherence_vs_base: float | None = 0.9
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    resolution: int | None = None
    batch_size: int = 16
