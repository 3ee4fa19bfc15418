"""Stage 3: train an SDXL LoRA on a captioned dataset, in 8 GB of GPU memory (notebook 03).

    from lora_helpers.train import TrainConfig, ShowValidation, plan_memory, train

    config = TrainConfig.from_preset("t4-8gb", max_train_steps=1000)
    print(plan_memory(config))
    result = train("dataset", "run", config=config, resume="latest", listeners=[ShowValidation()])

Modules: ``config`` (settings, presets, result, errors), ``resolve`` (a config made concrete
for a machine), ``stage`` (``train``, the memory plan, the CLI), ``loop`` (the loop and its
events), ``session`` and ``step`` (what the loop runs), ``finish`` (the files of a finished
run), ``events`` and ``listeners`` (progress bar, notebook grids), ``data``, ``latents``,
``models``, ``memory``, ``validation``, ``checkpoints`` (saving, finding good ones), ``resume`` (what a
resume may change), ``outputs``.
"""

from lora_helpers.train.checkpoints import CheckpointError, RunWriteError
from lora_helpers.train.data import read_subjects, read_training_images
from lora_helpers.train.config import (PRESETS, TrainConfig, TrainingDivergedError, TrainingOutOfMemoryError,
                                       TrainResult, auto_steps)
from lora_helpers.train.events import TrainingListener, TrainStart
from lora_helpers.train.listeners import ProgressBar, ShowValidation
from lora_helpers.train.memory import MemoryBudgetError, MemoryPlan
from lora_helpers.train.resume import ResumeSettingsError
from lora_helpers.train.stage import plan_memory, train

__all__ = [
    "PRESETS",
    "TrainConfig",
    "TrainResult",
    "TrainingDivergedError",
    "TrainingOutOfMemoryError",
    "MemoryBudgetError",
    "CheckpointError",
    "ResumeSettingsError",
    "RunWriteError",
    "MemoryPlan",
    "auto_steps",
    "plan_memory",
    "train",
    "TrainingListener",
    "TrainStart",
    "ProgressBar",
    "ShowValidation",
    "read_training_images",
    "read_subjects",
]
