"""The training loop behind :func:`lora_helpers.train.train`, in one screen.

The loop owns the order of things and fires events; what a step does lives in
:mod:`lora_helpers.train.step`, set-up, checkpoints, validation and the finished run in
:mod:`lora_helpers.train.session`, and printing, progress bars and inline images in the
listeners (:mod:`lora_helpers.train.events`, :mod:`lora_helpers.train.listeners`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lora_helpers.train.config import TrainConfig, TrainResult
from lora_helpers.train.events import TrainingEvents
from lora_helpers.train.finish import finish_run
from lora_helpers.train.memory import MemoryPlan
from lora_helpers.train.session import TrainingSession

__all__ = ["run_training"]


def _every(n: int | None, step: int) -> bool:
    return bool(n) and step % n == 0


def run_training(dataset_dir: Path, run_dir: Path, *, cfg: TrainConfig, accelerator, plan: MemoryPlan, trigger: str,
                 class_noun: str | None, start_from: Path | None, listeners: Sequence[Any] = (),
                 accept_changes: bool = False) -> TrainResult:
    """Set up, train, and write the run folder (see :func:`lora_helpers.train.stage.train`).

    Args:
        dataset_dir, run_dir: the dataset and the run folder.
        cfg: the resolved config.
        accelerator: an ``accelerate.Accelerator`` made for ``cfg``.
        plan: the memory plan checked against the budget.
        trigger, class_noun: the person's trigger phrase and class.
        start_from: a checkpoint folder to resume from, or None.
        accept_changes: resume even though settings or data differ from the checkpoint's (recorded).
        listeners: receive the events of :class:`lora_helpers.train.events.TrainingListener`.

    Returns:
        A :class:`lora_helpers.train.config.TrainResult`.
    """
    session = TrainingSession(dataset_dir, run_dir, cfg=cfg, accelerator=accelerator, plan=plan, trigger=trigger,
                              class_noun=class_noun)
    events = TrainingEvents(listeners, is_main_process=accelerator.is_main_process)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        # Encode images and captions once and free the encoders *before* the UNet loads:
        # that is what makes SDXL fit in 8 GB. Then the models, and the checkpoint to resume from.
        session.setup(start_from, accept_changes=accept_changes)
        cfg = session.cfg  # the number of steps and the warm-up are known now
        events.on_train_start(session.start_info())
        while session.step < cfg.max_train_steps:
            row = session.train_step()
            # A NaN/inf step is skipped; many in a row will not heal (too high a learning
            # rate, an fp16 VAE): stop with advice instead of burning the GPU hour.
            if session.diverged():
                session.flush_log()
                raise session.diverged_error()
            events.on_step_end(session.step, row)
            final = session.step == cfg.max_train_steps
            # A Colab runtime can vanish at any moment: checkpoint often, and always at the end.
            if final or _every(cfg.checkpointing_steps, session.step):
                events.on_checkpoint(session.step, session.checkpoint(row["loss"]))
            if cfg.validation_prompts and (final or _every(cfg.validation_steps, session.step)):
                if session.main:  # one process renders; the others wait at the next checkpoint
                    images, grid_path, record = session.validate()
                    events.on_validation(session.step, images, grid_path, record)  # listeners may add scores
                    row.update(record)
                    session.validation.append(record)
                session.flush_log()
            elif session.step % 25 == 0:
                session.flush_log()  # a disconnect loses at most 25 rows of the log
        result = finish_run(session)  # LoRA files (diffusers, kohya), config.json, loss plot, model card, Hub
    except BaseException as exc:
        session.flush_log(failing=True)  # what was trained so far stays readable (and resumable)
        error = session.explain_failure(exc)  # out of memory: what to change; interrupted: where to resume
        events.on_train_failed(session.step, error or exc)
        if error is None:
            raise
        raise error from exc
    events.on_train_end(result)
    return result
