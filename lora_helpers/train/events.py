"""Events of a training run, and the listeners that react to them (minGPT's trainer callbacks).

The library owns the loop (:func:`lora_helpers.train.loop.run_training`); what to print, plot
or show happens in listeners: the console progress bar, a notebook showing each validation
grid, a score written into the log. A listener is any object with some of these methods
(subclass :class:`TrainingListener` to get no-op defaults for the rest)::

    on_train_start(start)                           set-up done, before the first step
    on_step_end(step, row)                          after each optimizer step (row: its log.jsonl row,
                                                    the loss averaged over processes)
    on_validation(step, images, grid_path, record)  after each validation grid; add keys to
                                                    ``record`` to log them in that step's row
    on_checkpoint(step, folder)                     after each checkpoint is on disk
    on_train_end(result)                            the run folder is complete
    on_train_failed(step, error)                    the run stops with ``error`` (the exception raised)

A listener that raises does not end the training: its error becomes a warning (an hour on a
GPU is worth more than a print). ``KeyboardInterrupt`` still stops the run.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from lora_helpers.train.config import TrainConfig, TrainResult
from lora_helpers.train.memory import MemoryPlan

__all__ = ["TrainStart", "TrainingListener", "TrainingEvents", "ValidationHooks", "ValidationHook"]

# hook(step, images, run_dir) -> dict | None: the older way to react to validation images
ValidationHook = Callable[[int, list, Path], dict | None]


@dataclass(frozen=True)
class TrainStart:
    """What a listener learns when training starts.

    Attributes:
        run_dir: the run folder.
        config: the resolved config (``max_train_steps`` and ``lr_warmup_steps`` filled in).
        plan: the GPU memory plan it was checked against.
        start_step: 0, or the step a resumed run continues from.
        resumed_from: the checkpoint folder it resumed from, or None.
        n_images: training images.
        validation_prompts: the validation prompts as the model sees them (a ``{subject}`` prompt
            once per person, triggers filled in); the images are these x ``config.validation_seeds``.
    """

    run_dir: Path
    config: TrainConfig
    plan: MemoryPlan
    start_step: int
    resumed_from: Path | None
    n_images: int
    validation_prompts: tuple[str, ...] = ()


class TrainingListener:
    """Base class for listeners: override the events you need; the others do nothing.

    Attributes:
        main_process_only: fire only on the main process when several train together
            (``accelerate launch``), so a progress bar or an image shows once. Validation
            runs on the main process only, so ``on_validation`` never fires elsewhere.
    """

    main_process_only: bool = True

    def on_train_start(self, start: TrainStart) -> None:
        """Models loaded (and resumed), before the first step."""

    def on_step_end(self, step: int, row: dict) -> None:
        """After optimizer step ``step`` (1-based); ``row`` is its log.jsonl row (loss, lr, s/step, memory)."""

    def on_validation(self, step: int, images: list, grid_path: Path, record: dict) -> None:
        """After the validation images of ``step`` were saved as ``grid_path``.

        ``images`` are PIL images, prompts x seeds, row-major. Keys added to ``record`` go into
        that step's log.jsonl row and :attr:`TrainResult.validation`.
        """

    def on_checkpoint(self, step: int, folder: Path) -> None:
        """After ``folder`` (``checkpoints/checkpoint-<step>``) was written."""

    def on_train_end(self, result: TrainResult) -> None:
        """The LoRA files, config.json and model card are written."""

    def on_train_failed(self, step: int, error: BaseException) -> None:
        """The run stops at ``step`` with ``error`` (raised after the listeners heard it): close what is open."""


def _takes_prompts(hook) -> bool:
    try:
        params = inspect.signature(hook).parameters
    except (TypeError, ValueError):  # a builtin or an odd callable: the plain call
        return False
    return "prompts" in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


class ValidationHooks(TrainingListener):
    """``train(validation_hook=...)`` as a listener: each ``hook(step, images, run_dir)`` in turn.

    A hook with a ``prompts`` keyword also gets each image's prompt (several people: which
    person it shows). A dict a hook returns is added to the validation record (so to that
    step's log row); a hook that raises is reported as a warning and as ``hook_error`` in the record.

    Args:
        hooks: one hook or several.
        run_dir: the run folder passed to every hook.
    """

    def __init__(self, hooks: ValidationHook | Sequence[ValidationHook], run_dir: Path):
        self.hooks = list(hooks) if isinstance(hooks, (list, tuple)) else [hooks]
        self.run_dir = Path(run_dir)
        self.prompts: list[str] = []

    def on_train_start(self, start: TrainStart) -> None:
        self.prompts = [p for p in start.validation_prompts for _ in start.config.validation_seeds]

    def on_validation(self, step: int, images: list, grid_path: Path, record: dict) -> None:
        prompts = self.prompts if len(self.prompts) == len(images) else None
        for hook in self.hooks:
            try:
                values = (hook(step, images, self.run_dir, prompts=prompts) if _takes_prompts(hook)
                          else hook(step, images, self.run_dir))
            except Exception as exc:  # a failing score must not end an hour of training
                warnings.warn(f"validation hook failed at step {step}: {type(exc).__name__}: {exc}")
                values = {"hook_error": f"{type(exc).__name__}: {exc}"}
            if isinstance(values, dict):
                record.update(values)


class TrainingEvents:
    """Fires each event at every listener, in order; a failing listener becomes a warning.

    Args:
        listeners: objects with some of the ``on_*`` methods of :class:`TrainingListener`.
        is_main_process: on other processes, listeners with ``main_process_only`` (the
            default) are skipped.
    """

    def __init__(self, listeners: Iterable[Any] = (), *, is_main_process: bool = True):
        self.listeners = [listener for listener in listeners
                          if is_main_process or not getattr(listener, "main_process_only", True)]

    def _fire(self, event: str, step: int, *args: Any) -> None:
        for listener in self.listeners:
            method = getattr(listener, event, None)
            if method is None:
                continue
            try:
                method(*args)
            except Exception as exc:  # a print or a plot must not end an hour of training
                warnings.warn(f"training listener {type(listener).__name__}.{event} failed at step {step}: "
                              f"{type(exc).__name__}: {exc}")

    def on_train_start(self, start: TrainStart) -> None:
        """Tell every listener that training starts (see :meth:`TrainingListener.on_train_start`)."""
        self._fire("on_train_start", start.start_step, start)

    def on_step_end(self, step: int, row: dict) -> None:
        """Tell every listener that step ``step`` is done."""
        self._fire("on_step_end", step, step, row)

    def on_validation(self, step: int, images: list, grid_path: Path, record: dict) -> None:
        """Hand the validation images of ``step`` to every listener, in order (each may add to ``record``)."""
        self._fire("on_validation", step, step, images, grid_path, record)

    def on_checkpoint(self, step: int, folder: Path) -> None:
        """Tell every listener that ``folder`` was written."""
        self._fire("on_checkpoint", step, step, folder)

    def on_train_end(self, result: TrainResult) -> None:
        """Hand the finished run's result to every listener."""
        self._fire("on_train_end", result.steps, result)

    def on_train_failed(self, step: int, error: BaseException) -> None:
        """Tell every listener that the run stops at ``step`` with ``error``."""
        self._fire("on_train_failed", step, step, error)
