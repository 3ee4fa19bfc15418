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

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lora_helpers.core.fileio import atomic_dir, atomic_path, write_json
from lora_helpers.core.run_folder import CHECKPOINTS_DIR, LORA_WEIGHT_NAME, checkpoint_dir, list_checkpoints

__all__ = [
    "find_checkpoint",
    "rng_state",
    "set_rng_state",
    "save_checkpoint",
    "load_training_state",
    "prune_checkpoints",
]

# What resuming needs beyond the weights; pruned from older checkpoints.
_TRAINING_STATE = ("training_state.pt", "optimizer.pt")


def find_checkpoint(run_dir: str | os.PathLike, which: str | os.PathLike) -> Path | None:
    """Resolve ``which`` ("latest", a step number, or a folder) to a checkpoint folder.

    Returns:
        The folder, or None when ``which`` is "latest" and the run has no checkpoint yet.

    Raises:
        FileNotFoundError: naming the checkpoints that exist.
    """
    if str(which) == "latest":
        found = list_checkpoints(run_dir)
        return found[-1] if found else None
    path = checkpoint_dir(run_dir, int(which)) if str(which).isdigit() else Path(which)
    if not (path / "training_state.pt").is_file():
        have = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
        why = ("its training state was pruned (only the newest checkpoints keep it; its LoRA weights are kept)"
               if (path / LORA_WEIGHT_NAME).is_file() else "not a complete checkpoint")
        raise FileNotFoundError(f"{path}: {why}; checkpoints to resume from in {run_dir}: {have}")
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


def save_checkpoint(run_dir: str | os.PathLike, step: int, *, write_lora, optimizer_state: dict,
                    training_state: dict, summary: dict, is_main_process: bool = True,
                    process_index: int = 0) -> Path:
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

    Returns:
        The checkpoint folder.
    """
    final = checkpoint_dir(run_dir, step)
    if is_main_process:
        with atomic_dir(final) as tmp:
            write_lora(tmp)
            _torch_save(optimizer_state, tmp / "optimizer.pt")
            _torch_save(rng_state(), tmp / f"rng_state_{process_index}.pt")
            write_json(tmp / "training_state.json", summary)
            # written last: its presence marks a complete checkpoint
            _torch_save(training_state, tmp / "training_state.pt")
    else:
        # Other processes add their RNG state once the main process has renamed the folder.
        _torch_save(rng_state(), final / f"rng_state_{process_index}.pt")
    return final


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
