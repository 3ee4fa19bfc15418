"""Resuming honestly: a checkpoint continues the run it came from, unless a change is accepted.

Every checkpoint records the settings it was trained with and the SHA-256 of each image, mask
and caption. Resuming with another learning rate, batch, resolution, base model or dataset
would mix two runs under one ``config.json``, so it is refused with each change named; with
``accept_changes`` the new settings are applied (the learning rate too, which the optimizer
state would otherwise bring back) and the change is recorded in ``config.json`` and the model
card. A change of the LoRA's shape (rank, target layers, text encoders) cannot be applied to
the checkpoint's weights and is always refused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from lora_helpers.core.run_folder import read_run_config
from lora_helpers.train.config import TrainConfig

__all__ = ["ResumeSettingsError", "GUARDED", "FIXED", "dataset_fingerprint", "resume_changes", "check_resume",
           "apply_learning_rates"]

# TrainConfig field -> its command-line flag (None: no flag). A change is refused unless accepted.
GUARDED: dict[str, str | None] = {
    "model": "--model", "resolution": "--resolution", "learning_rate": "--lr", "text_encoder_lr": None,
    "train_batch_size": "--batch-size", "gradient_accumulation_steps": "--grad-accum", "lora_alpha": "--alpha",
    "seed": "--seed", "pivotal_lr": "--pivotal-lr", "pivotal_freeze_fraction": "--pivotal-freeze",
    "weight_by_resize_quality": "--weight-by-resize-quality",
}
# The shape of the LoRA: the checkpoint's tensors cannot take another one.
FIXED: dict[str, str | None] = {"lora_rank": "--rank", "target_modules": "--target-modules",
                                "train_text_encoder": "--train-text-encoder", "pivotal_tokens": "--pivotal"}
ACCEPT_FLAG = "--accept-changes (train(..., accept_changes=True))"
# Not a setting but how the run was launched: each process draws its own batches, so another
# count changes the data order and the effective batch.
PROCESSES_HINT = "processes (torchrun --nproc_per_node, accelerate launch --num_processes)"


class ResumeSettingsError(ValueError):
    """Resuming would continue a checkpoint with other settings or data; the message names each change."""


def dataset_fingerprint(rows: Sequence[dict]) -> list[dict[str, Any]]:
    """The part of :func:`lora_helpers.train.outputs.dataset_hashes` rows that says whether the data changed."""
    keys = ("file_name", "sha256", "mask_sha256", "caption_sha256", "subject")  # subject: several people
    return [{k: row.get(k) for k in keys} for row in rows]


def _names(items: list[str], limit: int = 3) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _dataset_change(old: Sequence[dict], new: Sequence[dict]) -> str | None:
    """The difference between two fingerprints in words, or None when they are equal."""
    before, after = {r["file_name"]: r for r in old}, {r["file_name"]: r for r in new}
    parts = []
    images = [n for n in after if n in before and (before[n].get("sha256"), before[n].get("mask_sha256"))
              != (after[n].get("sha256"), after[n].get("mask_sha256"))]
    captions = [n for n in after if n in before and before[n].get("caption_sha256") != after[n].get("caption_sha256")]
    people = [n for n in after if n in before and before[n].get("subject") != after[n].get("subject")]
    added, removed = [n for n in after if n not in before], [n for n in before if n not in after]
    for items, what in ((images, "image or mask changed"), (captions, "caption changed"), (people, "person changed"),
                        (added, "image added"), (removed, "image gone")):
        if items:
            parts.append(f"{len(items)} {what} ({_names(items)})")
    return "; ".join(parts) or None


def resume_changes(saved_config: dict, saved_dataset: Sequence[dict] | None, cfg: TrainConfig,
                   dataset: Sequence[dict], *, saved_processes: int | None = None,
                   processes: int = 1) -> dict[str, tuple[Any, Any]]:
    """What differs between a checkpoint's run and this one.

    Args:
        saved_config: the checkpoint's config (``dataclasses.asdict`` of the resolved TrainConfig).
        saved_dataset: its dataset fingerprint, or None when unknown.
        cfg: this run's resolved config.
        dataset: this run's dataset fingerprint.
        saved_processes: how many processes trained the checkpoint (None: unknown).
        processes: how many train now.

    Returns:
        ``{field: (old, new)}``, with "dataset" mapped to ``(None, description)`` when the data changed.
    """
    changes: dict[str, tuple[Any, Any]] = {}
    for key in (*FIXED, *GUARDED):
        if (key == "text_encoder_lr" and not cfg.train_text_encoder) or (key.startswith("pivotal_")
                                                                          and key != "pivotal_tokens"
                                                                          and not cfg.pivotal_tokens):
            continue  # not used
        old, new = saved_config.get(key, 0 if key == "pivotal_tokens" else None), getattr(cfg, key)
        if isinstance(old, (list, tuple)) and isinstance(new, (list, tuple)):
            old, new = tuple(old), tuple(new)
        if (key in saved_config or key == "pivotal_tokens") and old != new:
            changes[key] = (old, new)
    if saved_dataset is not None and (what := _dataset_change(saved_dataset, dataset)):
        changes["dataset"] = (None, what)
    if saved_processes is not None and saved_processes != processes:
        changes["processes"] = (saved_processes, processes)
    return changes


def _describe(changes: dict[str, tuple[Any, Any]]) -> str:
    parts = []
    for key, (old, new) in changes.items():
        if key == "dataset":
            parts.append(f"dataset: {new}")
            continue
        if key == "processes":
            parts.append(f"{PROCESSES_HINT} {old} -> {new}")
            continue
        flag = {**GUARDED, **FIXED}.get(key)
        parts.append(f"{key}{f' ({flag})' if flag else ''} {old!r} -> {new!r}")
    return ", ".join(parts)


def _saved_processes(checkpoint: Path, state: dict) -> int | None:
    """How many processes trained a checkpoint: recorded, or (older checkpoints) one RNG file each."""
    if "processes" in state:
        return int(state["processes"])
    return len(list(Path(checkpoint).glob("rng_state_*.pt"))) or None


def check_resume(checkpoint: Path, state: dict, cfg: TrainConfig, dataset: Sequence[dict], *, run_dir: Path,
                 accept_changes: bool, processes: int = 1) -> dict[str, Any]:
    """Refuse a resume that would silently continue with other settings or data; describe the resume.

    Args:
        checkpoint: the checkpoint folder.
        state: its training state (config, step, dataset fingerprint, earlier resumes).
        cfg: this run's resolved config (steps filled in).
        dataset: this run's dataset fingerprint (:func:`dataset_fingerprint`).
        run_dir: the run folder; its ``config.json`` knows the dataset of checkpoints older than this check.
        accept_changes: continue with the changed settings (not with a changed LoRA shape).
        processes: how many processes train now (the checkpoint's count must match unless accepted).

    Returns:
        The record for ``config.json``: ``{"from", "step", "changed": {field: [old, new]}}``.

    Raises:
        ResumeSettingsError: naming each changed setting (old -> new) and what to do.
    """
    saved_dataset = state.get("dataset")
    if saved_dataset is None:  # a checkpoint written before checkpoints kept their dataset
        saved_dataset = (read_run_config(run_dir).get("dataset") or {}).get("images")
    changes = resume_changes(state.get("config") or {}, saved_dataset, cfg, dataset,
                             saved_processes=_saved_processes(checkpoint, state), processes=processes)
    fixed = {k: v for k, v in changes.items() if k in FIXED}
    if fixed:
        raise ResumeSettingsError(
            f"{checkpoint.name} cannot continue with {_describe(fixed)}: its LoRA weights have the old shape. "
            "Resume with the checkpoint's value, or start a new run folder")
    if changes and not accept_changes:
        raise ResumeSettingsError(
            f"{checkpoint.name} was trained with other settings: {_describe(changes)}. Resume with the "
            f"checkpoint's settings, or pass {ACCEPT_FLAG} to continue with the new ones (recorded in config.json)")
    where = checkpoint.resolve()
    where = where.relative_to(run_dir.resolve()).as_posix() if where.is_relative_to(run_dir.resolve()) else str(where)
    return {"from": where, "step": int(state["step"]),
            "changed": {k: [old, new] for k, (old, new) in changes.items()}}


def apply_learning_rates(optimizer, lr_scheduler, cfg: TrainConfig) -> None:
    """Make the optimizer use ``cfg``'s learning rates after a checkpoint's state was loaded into it.

    Loading an optimizer and LR scheduler state brings back the checkpoint's base learning rates;
    an accepted change of ``learning_rate`` must take effect, not only be written into config.json.

    Args:
        optimizer: the run's optimizer (the UNet group first, then the text encoders', then the
            pivotal tokens' group, named "pivotal").
        lr_scheduler: its ``LambdaLR`` schedule (diffusers' ``get_scheduler``).
        cfg: the config with the learning rates to use from now on.
    """
    groups = optimizer.param_groups
    bases = [cfg.learning_rate] + [cfg.pivotal_lr if g.get("name") == "pivotal" else cfg.text_encoder_lr
                                   for g in groups[1:]]
    lr_scheduler.base_lrs = list(bases)
    lambdas = getattr(lr_scheduler, "lr_lambdas", None) or [lambda _: 1.0] * len(groups)
    for group, base, factor in zip(groups, bases, lambdas):
        group["initial_lr"] = base
        group["lr"] = base * factor(lr_scheduler.last_epoch)
    lr_scheduler._last_lr = [group["lr"] for group in groups]
