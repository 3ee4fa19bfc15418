"""Ready listeners for :func:`lora_helpers.train.train`: the console progress bar and notebook grids.

``train`` adds a :class:`ProgressBar` unless you pass your own; a notebook adds
:class:`ShowValidation` to see each validation grid as soon as it is made::

    train(dataset_dir, run_dir, config=config, listeners=[ShowValidation()])
"""

from __future__ import annotations

from pathlib import Path

from tqdm.auto import tqdm

from lora_helpers.train.config import TrainResult
from lora_helpers.train.events import TrainingListener, TrainStart

__all__ = ["ProgressBar", "ShowValidation"]


class ProgressBar(TrainingListener):
    """What training prints: the memory plan, where a resumed run continues, and a tqdm bar
    with the loss, seconds per step and memory of each step. When several processes train
    together it shows on the main process only, with their mean loss.

    Args:
        enabled: show the bar; None: as the config's ``progress`` says. The plan and the
            resume point are printed either way.
    """

    def __init__(self, enabled: bool | None = None):
        self.enabled = enabled
        self.bar = None

    def on_train_start(self, start: TrainStart) -> None:
        print(start.plan)
        if start.resumed_from is not None:
            print(f"resumed from {start.resumed_from.name} (step {start.start_step} of {start.config.max_train_steps})")
        enabled = start.config.progress if self.enabled is None else self.enabled
        self.bar = tqdm(total=start.config.max_train_steps, initial=start.start_step, desc="training", unit="step",
                        disable=not enabled)

    def on_step_end(self, step: int, row: dict) -> None:
        if self.bar is None:
            return
        mem = row.get("gpu_peak_gb", row.get("host_peak_gb"))
        self.bar.set_postfix(loss="nan" if row["loss"] is None else f"{row['loss']:.4f}",
                             s_step=f"{row['s_per_step']:.2f}", mem=f"{mem:.2f}GB")
        self.bar.update(1)

    def on_train_end(self, result: TrainResult) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def on_train_failed(self, step: int, error: BaseException) -> None:
        # closed, so the error message starts on a line of its own
        self.on_train_end(None)


class ShowValidation(TrainingListener):
    """For notebooks: show each validation grid below the cell as soon as it is made.

    The line above the grid names the step and any values listed before it added to the
    record (e.g. the identity score of ``identity_validation_hook``).
    """

    def on_validation(self, step: int, images: list, grid_path: Path, record: dict) -> None:
        # IPython comes with Jupyter and costs a noticeable import: only a notebook needs it
        from IPython.display import Image, display

        values = [f"{key} {value:.3f}" if isinstance(value, float) else f"{key} {value}"
                  for key, value in record.items() if key not in ("step", "samples")]
        print(f"step {step}:" + (" " + ", ".join(values) if values else ""))
        display(Image(filename=str(grid_path)))
