"""Generation settings and their checks: :class:`GenerateConfig`, seeds, sizes, steps, strengths.

Every setting is checked where it is made (``GenerateConfig.__post_init__``, and the CLIs'
argparse types built from the same functions), so a bad value is one sentence naming the
setting and a valid value before any model loads, not a traceback from inside torch after
minutes of loading. NaN slips through every ``<``/``>`` comparison, so numbers are checked
for being finite explicitly: a NaN guidance or LoRA scale gives a black picture.
"""

from __future__ import annotations

import argparse
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from lora_helpers.core.config import default_resolution, smoke_mode

__all__ = [
    "SCHEDULERS", "MAX_SEED", "GenerateConfig", "check_seed", "check_seeds", "check_steps", "check_size",
    "check_number", "check_prompts", "cli_type", "resolve_size", "resolve_steps",
]

# Short names people type; any diffusers scheduler class name works too.
SCHEDULERS = {
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "ddim": "DDIMScheduler",
    "unipc": "UniPCMultistepScheduler",
}

# torch.Generator.manual_seed takes 0..2**64-1 and wraps negative seeds around silently
# (-1 gives the picture of 18446744073709551615), so both ends are refused here.
MAX_SEED = 2**64 - 1


def _whole(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (int, 3.0, "42"), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            return None
    return None


def check_seed(value: Any, name: str = "seed") -> int:
    """A seed as an int, or ValueError naming ``name`` and the valid range.

    Args:
        value: an int or the text of one (CLI).
        name: the setting's name in the message.

    Returns:
        The seed.

    Raises:
        ValueError: not a whole number, negative, or above 2**64-1.
    """
    seed = _whole(value)
    if seed is None or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{name} must be a whole number from 0 to {MAX_SEED} (2**64-1), e.g. 0; got {value!r}")
    return seed


def check_seeds(values: Any, name: str = "seeds") -> list[int]:
    """One seed or several, checked with :func:`check_seed`.

    Args:
        values: an int or a sequence of them.
        name: the setting's name in the message about an empty list.

    Returns:
        The seeds as a list.

    Raises:
        ValueError: no seeds, or a bad one.
    """
    values = [values] if _whole(values) is not None or isinstance(values, (str, float)) else list(values)
    if not values:
        raise ValueError(f"no {name} given: pass at least one seed, e.g. [0, 1, 2]")
    return [check_seed(v) for v in values]


def check_steps(value: Any, name: str = "steps") -> int | None:
    """Denoising steps: None (the default) or a whole number of at least 1.

    Raises:
        ValueError: naming ``name``; 0 would otherwise fall back to the default unnoticed.
    """
    if value is None:
        return None
    steps = _whole(value)
    if steps is None or steps < 1:
        raise ValueError(f"{name} must be a whole number of at least 1 (e.g. 30), not {value!r}")
    return steps


def check_size(value: Any, name: str = "size") -> int | None:
    """Image side in px: None (the default) or a multiple of 8 of at least 64 (the VAE works in 8 px blocks).

    Raises:
        ValueError: naming ``name`` and the sizes SDXL was trained at.
    """
    if value is None:
        return None
    size = _whole(value)
    if size is None or size < 64 or size % 8:
        raise ValueError(f"{name} must be a multiple of 8 and at least 64 (SDXL: 1024, or 512 to save time), "
                         f"not {value!r}")
    return size


def check_number(value: Any, name: str, example: str, *, minimum: float | None = None,
                 maximum: float | None = None) -> float:
    """A finite number within the bounds, or ValueError naming ``name`` and an ``example``.

    Args:
        value: a number or its text (CLI).
        name: the setting's name in the message.
        example: a valid value to suggest.
        minimum, maximum: inclusive bounds (None: unbounded).

    Returns:
        The value as a float.
    """
    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or (minimum is not None and number < minimum) or \
            (maximum is not None and number > maximum):
        bounds = (f" from {minimum:g} to {maximum:g}" if minimum is not None and maximum is not None
                  else f" of at least {minimum:g}" if minimum is not None
                  else f" of at most {maximum:g}" if maximum is not None else "")
        raise ValueError(f"{name} must be a finite number{bounds} (e.g. {example}), not {value!r}")
    return number


def check_prompts(prompts: str | Sequence[str]) -> list[str]:
    """One prompt or several as a list; refuses none and blank ones.

    Raises:
        ValueError: naming the empty prompt by its position.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompts:
        raise ValueError("no prompts given: pass at least one prompt, e.g. 'a photo of {subject}'")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt #{i + 1} is empty; write a prompt such as 'a photo of {{subject}} in a park'")
    return prompts


def cli_type(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse ``type=`` from a check function.

    argparse shows only an ``ArgumentTypeError``'s own text (for a ValueError it prints
    "invalid value"), so the check's message, with its valid value, reaches the user.

    Args:
        check: takes the flag's text, returns the value or raises ValueError.

    Returns:
        The converter for ``parser.add_argument(type=...)``.
    """
    def parse(text: str) -> Any:
        try:
            return check(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = getattr(check, "__name__", "value")
    return parse


@dataclass
class GenerateConfig:
    """Generation settings (one per request; change with ``dataclasses.replace``, which checks again).

    Attributes:
        negative_prompt: what to steer away from ("" = none: SDXL then uses zero embeddings).
        size: square side in px, e.g. 512 or 1024; None: 1024 (64 in smoke mode, where
            every size maps to the tiny model's 64 px).
        steps: denoising steps; None: 30 (2 in smoke mode).
        guidance: classifier-free guidance scale.
        lora_scale: LoRA strength; None: the LoRA's own (``LoraInfo.scale``).
        scheduler: None keeps the pipeline's; or a name from :data:`SCHEDULERS` / a diffusers class name.
        subject: replaces ``{subject}``; None: the LoRA run's trigger phrase.
        batch_size: images per pipeline call. 1 keeps every image bit-identical to a
            re-run of its seed alone; larger batches are faster on big GPUs but may change
            the last bits of some pixels (different kernels).

    Raises:
        ValueError: for a setting out of range, naming it and a valid value.
    """

    negative_prompt: str = ""
    size: int | None = None
    steps: int | None = None
    guidance: float = 5.0
    lora_scale: float | None = None
    scheduler: str | None = None
    subject: str | None = None
    batch_size: int = 1

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Check (and normalise) every setting; :func:`generate_images` calls it again, as fields can be set later.

        Raises:
            ValueError: naming the first bad setting and a valid value.
        """
        self.size = check_size(self.size)
        self.steps = check_steps(self.steps)
        self.guidance = check_number(self.guidance, "guidance", "5.0", minimum=0)
        if self.lora_scale is not None:
            self.lora_scale = check_number(self.lora_scale, "lora_scale", "1.0")
        batch = _whole(self.batch_size)
        if batch is None or batch < 1:
            raise ValueError(f"batch_size must be a whole number of at least 1, not {self.batch_size!r}")
        self.batch_size = batch
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"negative_prompt must be text ('' for none), not {self.negative_prompt!r}")


def resolve_size(size: int | None = None, *, smoke: bool | None = None) -> int:
    """Pixel size to generate at: ``size``, or the default; in smoke mode always the tiny model's size.

    Args:
        size: square side in px (a multiple of 8, at least 64), or None for the default.
        smoke: smoke mode; None reads the switch from the environment.

    Returns:
        The side in px.

    Raises:
        ValueError: for a size that is not a multiple of 8 or below 64 (in smoke mode too).
    """
    smoke = smoke_mode() if smoke is None else smoke
    # A bad size is reported in smoke mode too, so a notebook fails in CI as it would in Colab.
    size = check_size(size)
    if size is None or smoke:
        return default_resolution(smoke)
    return size


def resolve_steps(steps: int | None = None, *, smoke: bool | None = None) -> int:
    """Denoising steps: ``steps``, or 30 (2 in smoke mode).

    Args:
        steps: steps asked for, or None for the default.
        smoke: smoke mode; None reads the switch from the environment.

    Returns:
        The number of steps.

    Raises:
        ValueError: for fewer than one step.
    """
    steps = check_steps(steps)
    if steps is None:
        return 2 if (smoke_mode() if smoke is None else smoke) else 30
    return steps
