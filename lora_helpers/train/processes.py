"""Training on several processes (``accelerate launch``, ``torchrun``): one voice, one writer.

Every process trains on its own batches (the step averages their losses,
:mod:`lora_helpers.train.step`); the main process alone prints, shows progress and writes the
run folder. This module holds what that takes around the loop:

* :func:`quiet_other_processes`: the other processes print nothing, not even the warnings and
  loading bars of the libraries they import;
* :func:`hold_run_lock`: the main process takes the run lock, and every process learns whether
  it got it, so a refused run stops everywhere (one process alone raising would leave the
  others waiting at the next barrier) and no process reads the folder before the lock is held;
* :func:`gather_rng_states`: each process's random state, for the main process to write into
  the checkpoint, so a checkpoint folder is complete when it appears;
* :func:`make_accelerator` and :func:`release_accelerator`.

With one process each of these does what a single-process run did before.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from pathlib import Path
from typing import Iterator

from lora_helpers.core.run_lock import RunFolderLockedError, lock_run_folder
from lora_helpers.core.runtime import free_memory, is_main_process

__all__ = ["quiet_other_processes", "hold_run_lock", "gather_rng_states", "make_accelerator", "release_accelerator"]


@contextlib.contextmanager
def quiet_other_processes() -> Iterator[None]:
    """While the block runs, processes other than the main one print nothing and show no progress bars.

    Every process imports the same libraries, loads the same models, meets the same warnings and
    goes through the same steps; the main process shows them once. On the others, standard
    output goes nowhere, Python warnings and log records below errors are dropped, and
    transformers' and diffusers' loading bars are off (all restored afterwards). Errors and
    tracebacks (standard error) still come from every process. On the main process (and in a
    run of one process) nothing changes.
    """
    if is_main_process():
        yield
        return
    # transformers and diffusers draw their own tqdm bars (to stderr) when they load weights
    libraries = []
    for name in ("transformers", "diffusers"):
        with contextlib.suppress(ImportError):
            libraries.append(importlib.import_module(f"{name}.utils.logging"))
    bars = [library.is_progress_bar_enabled() for library in libraries]
    for library in libraries:
        library.disable_progress_bar()
    logging.disable(logging.WARNING)
    try:
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)
        for library, enabled in zip(libraries, bars):
            if enabled:
                library.enable_progress_bar()


def _from_main_process(accelerator, value):
    """``value`` as the main process has it, on every process."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list  # loaded with accelerate by now

    return broadcast_object_list([value], from_process=0)[0]


@contextlib.contextmanager
def hold_run_lock(run_dir: Path, accelerator) -> Iterator[None]:
    """Hold the run folder's lock (:func:`lora_helpers.core.run_lock.lock_run_folder`) on the main
    process while the block runs on every process.

    The processes meet after the main one tried: none reads the folder (a checkpoint to resume
    from) before the lock is held, and when it is refused all of them raise the same error.

    Args:
        run_dir: the run folder.
        accelerator: the run's ``accelerate.Accelerator``.

    Raises:
        RunFolderLockedError: another training holds the folder (on every process).
    """
    with contextlib.ExitStack() as stack:
        refused = None
        if accelerator.is_main_process:
            try:
                stack.enter_context(lock_run_folder(run_dir))
            except RunFolderLockedError as exc:
                refused = str(exc)
        refused = _from_main_process(accelerator, refused)
        if refused is not None:
            raise RunFolderLockedError(refused)
        yield


def gather_rng_states(accelerator, state: dict) -> list[dict]:
    """Every process's random state, in process order (a collective call: every process makes it).

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
        state: this process's state (:func:`lora_helpers.train.checkpoints.rng_state`).

    Returns:
        One state per process.
    """
    if accelerator.num_processes == 1:
        return [state]
    from accelerate.utils import gather_object  # loaded with accelerate by now

    return list(gather_object([state]))


def make_accelerator(mixed_precision: str, cpu: bool):
    """The run's ``accelerate.Accelerator``; one made before with other settings is replaced (one process).

    Args:
        mixed_precision: "fp16", "bf16" or "no".
        cpu: train on the CPU.

    Returns:
        The accelerator.
    """
    # accelerate is imported only when a run starts: it adds about half a second to every
    # `import lora_helpers.train` (the CLI imports each stage to list its flags)
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    try:
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)
    except ValueError:
        # A notebook that trained before with other settings: reset, unless launched on several processes.
        if PartialState().num_processes > 1:
            raise
        AcceleratorState._reset_state(reset_partial_state=True)
        return Accelerator(mixed_precision=mixed_precision, cpu=cpu)


_ACCELERATE_HOLDS = ("_models", "_optimizers", "_schedulers", "_dataloaders")


def release_accelerator(accelerator) -> None:
    """Drop accelerate's references to the models and optimizer, then collect garbage once.

    ``accelerator.free_memory()`` collects before it lets go of them, so the models survive that
    collection and a second one is needed: each takes about half a second on the heap a training
    process has, at the end of every run.

    Args:
        accelerator: the run's ``accelerate.Accelerator``.
    """
    if all(isinstance(getattr(accelerator, name, None), list) for name in _ACCELERATE_HOLDS):
        for name in _ACCELERATE_HOLDS:
            getattr(accelerator, name).clear()
    else:  # another accelerate version: its own way, at the cost of the extra collection
        accelerator.free_memory()
    free_memory()
