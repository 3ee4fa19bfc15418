"""Training checkpoints that survive a disconnect: written whole or not at all.

A checkpoint folder ``checkpoints/checkpoint-<step>/`` holds

* ``pytorch_lora_weights.safetensors``: the LoRA in diffusers format (loads with
  ``pipe.load_lora_weights``, so later stages can compare checkpoints);
* ``optimizer.pt``, ``training_state.pt``: optimizer, LR scheduler, GradScaler and
  counters, everything needed to continue exactly;
* ``rng_state_<process>.pt``: Python, NumPy and torch (CPU and CUDA) random states;
* ``training_state.json``: the step, loss and time, for people.

The folder is built under a temporary name and renamed, so a run killed mid-save
leaves the previous checkpoints intact. Every checkpoint keeps its LoRA weights (a few
tens of MB, so later stages can compare the whole run); only the newest ``keep`` keep the
optimizer and training state needed to resume (hundreds of MB each at full size).
"""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_helpers.core.fileio import atomic_dir, atomic_path, write_json
from lora_helpers.core.lora_files import LoraFileError, read_safetensors
from lora_helpers.core.run_folder import CHECKPOINTS_DIR, LORA_WEIGHT_NAME, checkpoint_dir, list_checkpoints

__all__ = [
    "CheckpointError",
    "CheckpointNotFoundError",
    "RunWriteError",
    "check_resume_value",
    "checkpoint_problem",
    "find_checkpoint",
    "write_failure",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "read_training_state",
    "load_training_state",
    "prune_checkpoints",
]

# What resuming needs beyond the weights; pruned from older checkpoints.
_TRAINING_STATE = ("training_state.pt", "optimizer.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (damaged, pruned, or not there); the message names the good ones."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The checkpoint asked for does not exist (or no longer holds the state to resume from)."""


class RunWriteError(OSError):
    """Writing a checkpoint or a file of the run failed (a full disk, a lost mount); earlier checkpoints are intact."""


def check_resume_value(which: str | int | os.PathLike | None, run_dir: str | os.PathLike | None = None
                       ) -> str | Path | None:
    """Check the form of a ``resume`` value before anything is loaded.

    Args:
        which: None, "latest", a step number (int or digits), or a checkpoint folder.
        run_dir: the run folder, whose checkpoints the message names.

    Returns:
        None, "latest", the step as digits, or the folder as a Path.

    Raises:
        CheckpointError: a negative number, or text that is neither "latest", a number nor an existing path.
    """
    if which is None or str(which) == "latest":
        return which
    have = ""
    if run_dir is not None:
        have = "; checkpoints to resume from in {}: {}".format(
            run_dir, ", ".join(p.name for p in list_checkpoints(run_dir)) or "none")
    if isinstance(which, bool) or (isinstance(which, int) and which < 0):
        raise CheckpointError(f"resume must be 'latest', a step number or a checkpoint folder, not {which!r}{have}")
    text = str(which).strip()
    if text.isdigit():
        return text
    if not Path(text).exists():
        raise CheckpointNotFoundError(f"resume must be 'latest', a step number or a checkpoint folder; {text!r} is "
                                      f"none of these (no such folder){have}")
    return Path(text)


def _read_torch(path: Path) -> Any:
    # mmap: the archive and every record are checked (a truncated or garbled file fails here) without
    # reading the tensors, so resuming does not read a full-size optimizer.pt twice
    return torch.load(path, map_location="cpu", weights_only=False, mmap=True)


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What makes a checkpoint unusable for resuming, or None when every file of it reads.

    Reads the LoRA file and the torch files whole: a checkpoint half-copied to Drive or damaged
    on disk must be found now, not after the models have loaded.

    Args:
        folder: a ``checkpoint-<step>`` folder.

    Returns:
        A short reason ("optimizer.pt is missing", "training_state.pt cannot be read (...)"), or None.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return "not a folder"
    for name in (LORA_WEIGHT_NAME, *_TRAINING_STATE):
        if not (folder / name).is_file():
            return f"{name} is missing"
    try:
        read_safetensors(folder / LORA_WEIGHT_NAME)
    except LoraFileError as exc:
        return f"{LORA_WEIGHT_NAME} cannot be read ({exc.reason.split(';')[0]})"
    names = [*_TRAINING_STATE, *(p.name for p in sorted(folder.glob("rng_state_*.pt")))]
    for name in names:
        try:
            data = _read_torch(folder / name)
        except Exception as exc:  # noqa: BLE001 - pickle, zip and torch errors of a damaged file
            first = str(exc).splitlines()[0][:120] if str(exc) else "damaged"
            return f"{name} cannot be read ({type(exc).__name__}: {first})"
        if name == "training_state.pt" and not (isinstance(data, dict) and isinstance(data.get("step"), int)):
            return "training_state.pt does not hold a training state (no step)"
    return None


def _good_ones(run_dir: Path, problems: dict[Path, str]) -> str:
    good = [p.name for p in list_checkpoints(run_dir) if p not in problems and checkpoint_problem(p) is None]
    return ", ".join(good) if good else "none"


def find_checkpoint(run_dir: str | os.PathLike, which: str | int | os.PathLike, *, say=print) -> Path | None:
    """Resolve ``which`` ("latest", a step number, or a folder) to a checkpoint folder that can be resumed from.

    "latest" skips damaged checkpoints (saying so) and takes the newest good one; a checkpoint
    named by step or folder must be good itself.

    Args:
        run_dir: the run folder.
        which: "latest", a step number, or a checkpoint folder.
        say: prints that a damaged checkpoint was skipped.

    Returns:
        The folder, or None when ``which`` is "latest" and the run has no checkpoint yet.

    Raises:
        CheckpointNotFoundError: no such checkpoint (or its state was pruned), naming those that exist.
        CheckpointError: the checkpoint is damaged (or, for "latest", every one is), naming the good ones.
    """
    run_dir = Path(run_dir)
    which = check_resume_value(which, run_dir)
    if which == "latest":
        found = list_checkpoints(run_dir)
        problems: dict[Path, str] = {}
        for folder in reversed(found):
            problem = checkpoint_problem(folder)
            if problem is None:
                if problems:
                    say(f"warning: resuming from {folder.name}, the newest good checkpoint (skipped: "
                        + "; ".join(f"{p.name}: {why}" for p, why in problems.items()) + ")")
                return folder
            problems[folder] = problem
        if problems:
            raise CheckpointError(f"no checkpoint in {run_dir / CHECKPOINTS_DIR} can be resumed from: "
                                  + "; ".join(f"{p.name}: {why}" for p, why in problems.items())
                                  + ". Move them out of the way to start again, or choose a new run folder")
        return None
    path = checkpoint_dir(run_dir, int(which)) if isinstance(which, str) else which
    names = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
    have = f"checkpoints to resume from in {run_dir}: {names}"
    if not path.exists():
        raise CheckpointNotFoundError(f"{path}: no such checkpoint; {have}")
    if (path / CHECKPOINTS_DIR).is_dir():
        raise CheckpointNotFoundError(f"{path}: a run folder, not a checkpoint; to continue it, give it as the run "
                                      "folder with resume='latest' (--resume latest)")
    if not path.is_dir() or not any((path / n).exists() for n in (LORA_WEIGHT_NAME, *_TRAINING_STATE)):
        raise CheckpointNotFoundError(f"{path}: not a checkpoint folder; {have}")
    if not any((path / n).exists() for n in _TRAINING_STATE) and (path / LORA_WEIGHT_NAME).is_file():
        raise CheckpointNotFoundError(
            f"{path}: its training state was pruned (only the newest checkpoints keep it; its LoRA weights are "
            f"kept); {have}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"{path} is damaged: {problem}; good checkpoints to resume from in {run_dir}: "
                              f"{_good_ones(run_dir, {path: problem})}")
    return path


def rng_state() -> dict[str, Any]:
    """The random states of Python, NumPy and torch (CPU and every CUDA device)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore states returned by :func:`rng_state`."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_save(obj: Any, path: Path) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


# What torch.save and safetensors say when the disk fills up under them: torch raises a RuntimeError
# ("[enforce fail at inline_container.cc] ... file write failed"), safetensors an error naming an IoError.
_WRITE_FAILURE_TEXT = ("inline_container", "file write failed", "PytorchStreamWriter", "No space left", "IoError",
                       "Disk quota exceeded")


def write_failure(exc: BaseException, folder: str | os.PathLike) -> str | None:
    """Why writing into ``folder`` failed, in words, when ``exc`` is a failed write (else None).

    Args:
        exc: what the writer raised.
        folder: where it wrote (its disk's free space is looked at).

    Returns:
        "the disk is full (12 kB free)", "an I/O error (...)", or None for other errors.
    """
    if isinstance(exc, RunWriteError):
        return None  # already explained
    text = str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "the disk is full"
    elif isinstance(exc, OSError) and exc.errno in (errno.EIO, errno.EROFS, errno.ENOTCONN):
        reason = f"the disk stopped taking writes ({exc.strerror or text})"
    elif not isinstance(exc, OSError) and any(t in text for t in _WRITE_FAILURE_TEXT):
        reason = "writing failed (a full disk?)"
    else:
        return None
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(Path(folder)).free
        reason += f"; {free / 1e6:,.1f} MB free there"
    return reason


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, write_lora, optimizer_state: dict,
                    training_state: dict, summary: dict, is_main_process: bool = True,
                    process_index: int = 0, rng_states: list[dict] | None = None) -> Path:
    """Write ``checkpoints/checkpoint-<step>/`` atomically.

    Args:
        run_dir: the run folder.
        step: optimizer steps done.
        write_lora: callable taking a folder and writing ``pytorch_lora_weights.safetensors`` into it.
        optimizer_state: ``optimizer.state_dict()``.
        training_state: scheduler and scaler states, counters (anything torch.save takes).
        summary: small JSON-able facts for people (step, loss, time).
        is_main_process: only the main process writes the shared files.
        process_index: names this process's RNG file.
        rng_states: the random states of all processes, in process order: the main process writes
            them all (one ``rng_state_<i>.pt`` each), the others nothing; None: each its own.

    Returns:
        The checkpoint folder.

    Raises:
        RunWriteError: the disk filled up (or stopped taking writes); nothing of this checkpoint is left
            and the earlier ones are intact.
    """
    final = checkpoint_dir(run_dir, step)
    try:
        if is_main_process:
            with atomic_dir(final) as tmp:
                write_lora(tmp)
                _torch_save(optimizer_state, tmp / "optimizer.pt")
                states = enumerate(rng_states) if rng_states is not None else [(process_index, rng_state())]
                for index, state in states:
                    _torch_save(state, tmp / f"rng_state_{index}.pt")
                write_json(tmp / "training_state.json", summary)
                # written last: its presence marks a complete checkpoint
                _torch_save(training_state, tmp / "training_state.pt")
        elif rng_states is None:
            # Other processes add their RNG state once the main process has renamed the folder.
            _torch_save(rng_state(), final / f"rng_state_{process_index}.pt")
    except Exception as exc:
        reason = write_failure(exc, final.parent)
        if reason is None:
            raise
        # atomic_dir removed the half-written folder: what was there before is untouched
        kept = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none yet"
        raise RunWriteError(f"could not write {final}: {reason}. Earlier checkpoints are intact ({kept}); free "
                            "some space and resume with --resume latest (resume='latest')") from exc
    return final


def read_training_state(folder: str | os.PathLike) -> dict:
    """A checkpoint's ``training_state.pt``: step, schedules, counters, config, dataset fingerprint, resumes."""
    return _read_torch(Path(folder) / "training_state.pt")


def load_training_state(folder: str | os.PathLike, *, process_index: int = 0) -> tuple[dict, dict, dict | None]:
    """Read a checkpoint's optimizer state, training state and this process's RNG state.

    Our own files hold NumPy RNG tuples, so they are read with ``weights_only=False``;
    never point this at checkpoints from an untrusted source.

    Returns:
        ``(optimizer_state, training_state, rng_state_or_None)``.
    """
    folder = Path(folder)
    optimizer_state = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False)
    training_state = torch.load(folder / "training_state.pt", map_location="cpu", weights_only=False)
    rng_file = folder / f"rng_state_{process_index}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.is_file() else None
    return optimizer_state, training_state, rng


def prune_checkpoints(run_dir: str | os.PathLike, keep: int | None) -> list[Path]:
    """Drop the training state of all but the newest ``keep`` checkpoints (None or <= 0 keeps all).

    The LoRA weights and ``training_state.json`` of every checkpoint stay, so generation and
    evaluation can compare the whole run; half-written temporary folders are deleted.

    Returns:
        The checkpoint folders whose training state was removed.
    """
    root = Path(run_dir) / CHECKPOINTS_DIR
    if root.is_dir():  # temporary folders of a save that was killed half-way
        for stale in root.glob(".checkpoint-*"):
            shutil.rmtree(stale, ignore_errors=True)
    if not keep or keep <= 0:
        return []
    found = list_checkpoints(run_dir)
    old = found[: max(0, len(found) - keep)]
    for folder in old:
        # training_state.pt first: it marks a resumable checkpoint, so a prune cut short
        # never leaves a folder that looks resumable but is not.
        for name in _TRAINING_STATE:
            (folder / name).unlink(missing_ok=True)
        for rng in folder.glob("rng_state_*.pt"):
            rng.unlink(missing_ok=True)
    return old
