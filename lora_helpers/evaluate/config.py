"""Settings of the evaluation stage: face backend, CLIP, what to generate and how to choose."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from lora_helpers.evaluate.memorisation import COPY_THRESHOLD
from lora_helpers.generate import check_number, check_seeds, check_size, check_steps

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
        copy_threshold: fingerprint correlation from which a generated image counts as a
            near-copy of a training photo (``memorised``; see
            :mod:`lora_helpers.evaluate.memorisation`).
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

    Raises:
        ValueError: for a setting out of range, naming it and a valid value.
    """

    face_backend: str = "dlib"
    threshold: float | None = None
    clip_model: str | None = None
    use_clip: bool = True
    copy_threshold: float = COPY_THRESHOLD
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

    def __post_init__(self) -> None:
        # Checked here, before references are embedded and models load: a NaN scale or a
        # seed torch cannot take would otherwise fail (or draw black) minutes into a run.
        self.seeds = tuple(check_seeds(self.seeds))
        # Negative scales would be dropped without a word (only scales above 0 are generated).
        self.scales = tuple(check_number(s, "scales", "0 0.5 1.0", minimum=0) for s in self.scales)
        if not self.scales:
            raise ValueError("scales is empty; give at least one LoRA scale, e.g. 0 0.5 1.0 (0 = the base model)")
        self.num_inference_steps = check_steps(self.num_inference_steps, "num_inference_steps")
        self.resolution = check_size(self.resolution, "resolution")
        if self.guidance_scale is not None:
            self.guidance_scale = check_number(self.guidance_scale, "guidance_scale", "5.0", minimum=0)
        if self.threshold is not None:
            self.threshold = check_number(self.threshold, "threshold", "0.91 (dlib) or 0.4 (ArcFace)", minimum=-1, maximum=1)
        self.copy_threshold = check_number(self.copy_threshold, "copy_threshold", "0.9", minimum=-1, maximum=1)
        self.identity_weight = check_number(self.identity_weight, "identity_weight", "0.7", minimum=0, maximum=1)
        for name, example in (("min_prompt_adherence", "0.2"), ("min_adherence_vs_base", "0.9")):
            if getattr(self, name) is not None:
                setattr(self, name, check_number(getattr(self, name), name, example, minimum=0))
        for name, example, optional in (("max_checkpoints", "4", True), ("prompts_per_category", "2", True),
                                        ("batch_size", "16", False)):
            value = getattr(self, name)
            if value is None and optional:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a whole number of at least 1{' (or None for all)' * optional}, "
                                 f"e.g. {example}; not {value!r}")
