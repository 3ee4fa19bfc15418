"""LoRA files in a pipeline: find, check, load, switch, scale, fuse and remove them.

People bring LoRAs from our own ``run/`` folders, from diffusers scripts and from
kohya/A1111 trainers, and sometimes a file that cannot work: a pickled ``.bin``, a
half-copied download, a LoRA for Stable Diffusion 1.5. diffusers loads a mismatched
LoRA with a warning at best (the names do not match, nothing is applied and the
pictures look like the base model) or a shape error deep inside PEFT at worst, so we
check every LoRA tensor against the modules of *this* pipeline first and say which
file is wrong and what to do.

Generation calls :func:`activate_lora` before every batch, so what a pipeline computes
never depends on which LoRA, scale or fuse state an earlier call left behind. It takes one
:class:`LoraInfo` or a set of several with their weights (:mod:`lora_helpers.generate.combine`).
"""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lora_helpers.core.embeddings import (PivotalEmbeddings, find_embedding_file, load_embeddings, read_embeddings,
                                          unload_embeddings)
from lora_helpers.core.fileio import sha256_file
from lora_helpers.core.lora_check import check_lora_file
from lora_helpers.core.lora_files import LoraFileError, LoraNotFoundError, quiet_diffusers
from lora_helpers.core.run_folder import (CONFIG_FILE, LORA_WEIGHT_NAME, SUBJECTS_KEY, find_checkpoints,
                                          read_run_config)
from lora_helpers.generate.settings import check_number

__all__ = [
    "LoraInfo",
    "find_lora_file",
    "lora_digest",
    "load_lora",
    "unload_lora",
    "fuse_lora",
    "unfuse_lora",
    "activate_lora",
    "run_subjects",
]


# --------------------------------------------------------------------------- finding LoRA files


def _run_dir_of(lora_file: Path) -> Path | None:
    """The run folder a LoRA file belongs to (its own folder, or the run above ``checkpoints/``)."""
    folder = lora_file.parent
    if (folder / CONFIG_FILE).is_file():
        return folder
    if folder.parent.name == "checkpoints" and (folder.parent.parent / CONFIG_FILE).is_file():
        return folder.parent.parent
    return None


def find_lora_file(source: str | os.PathLike) -> tuple[Path, Path | None]:
    """Resolve a run folder or a LoRA file to ``(lora_file, run_dir_or_None)``.

    A run folder gives its final ``pytorch_lora_weights.safetensors`` (or its only other
    ``.safetensors`` file, e.g. the kohya copy). A file or checkpoint folder inside a run
    finds its run folder, so the trigger phrase in ``config.json`` comes along.

    Args:
        source: a run folder, a checkpoint folder, or a LoRA file.

    Returns:
        ``(lora_file, run_dir)``; ``run_dir`` is None for a file outside a run folder.

    Raises:
        LoraNotFoundError: the path does not exist, or the folder holds no LoRA.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise LoraNotFoundError(path, "no such file or folder; check the path (in Colab: is Google Drive mounted?)")
    if not path.is_dir():
        return path, _run_dir_of(path)
    others = sorted(path.glob("*.safetensors"))
    if (path / LORA_WEIGHT_NAME).is_file():
        found = path / LORA_WEIGHT_NAME
    elif len(others) == 1:
        found = others[0]
    else:
        checkpoints = find_checkpoints(path)
        if checkpoints:
            step, latest = checkpoints[-1]
            raise LoraNotFoundError(path, f"no final {LORA_WEIGHT_NAME} (training did not finish?); "
                                          f"use the latest checkpoint instead: {latest} (step {step})")
        if others:
            raise LoraNotFoundError(path, f"several .safetensors files and no {LORA_WEIGHT_NAME}: "
                                          f"pass one file ({', '.join(p.name for p in others)})")
        raise LoraNotFoundError(path, f"no LoRA here (expected {LORA_WEIGHT_NAME}); run training first or pass a LoRA file")
    return found, _run_dir_of(found) or path


# --------------------------------------------------------------------------- loading and switching



@dataclass
class LoraInfo:
    """A LoRA loaded into a pipeline, with what generation and the cache need to know.

    Attributes:
        path: the LoRA file.
        sha256: hash of the file (part of every cache key).
        adapter_name: the name it is loaded under in the pipeline.
        scale: the strength used when a generation request does not give one.
        format: "diffusers", "kohya" or "other" (the file's layout).
        trigger: the phrase that stands for the person (``{subject}`` in prompts), from the run's config.
        subjects: slug -> trigger of each person of a run of several (``{ada}`` in prompts); {} for one.
        run_dir: the run folder, when the file came from one.
        run_config: the run's ``config.json`` ({} without one).
        rank: LoRA rank (largest, when layers differ).
        targets: component -> number of layers the LoRA changes.
        fused: True while the LoRA is fused into the weights (see :func:`fuse_lora`).
        embeddings: the new tokens' embeddings saved beside the LoRA (pivotal tuning), or None;
            they are put into the text encoders whenever this LoRA is active.
        embedding_path: their file.
    """

    path: Path
    sha256: str
    adapter_name: str
    scale: float = 1.0
    format: str = "diffusers"
    trigger: str | None = None
    run_dir: Path | None = None
    run_config: dict[str, Any] = field(default_factory=dict)
    rank: int | None = None
    targets: dict[str, int] = field(default_factory=dict)
    fused: bool = False
    embeddings: PivotalEmbeddings | None = None
    embedding_path: Path | None = None
    subjects: dict[str, str] = field(default_factory=dict)

    def adapters(self, scale: float) -> tuple[list[str], list[float]]:
        """The adapter names and weights that make the pipeline compute with this LoRA at ``scale``."""
        return [self.adapter_name], [scale]

    @property
    def name(self) -> str:
        """Short name for labels: the run folder's name for a run's final LoRA, else the file stem."""
        if self.run_dir is not None and self.path.name == LORA_WEIGHT_NAME:
            parent = self.path.parent
            return self.run_dir.name if parent == self.run_dir else f"{self.run_dir.name}/{parent.name}"
        return self.path.stem

    def __str__(self) -> str:
        where = f" from run {self.run_dir}" if self.run_dir else ""
        tokens = f", new tokens {self.embedding_path.name}" if self.embedding_path else ""
        who = (f"people {', '.join(f'{{{k}}}: {v!r}' for k, v in self.subjects.items())}" if self.subjects
               else f"trigger {self.trigger!r}")
        return (f"LoRA {self.path.name}{where}: {self.format} format, rank {self.rank}, layers {self.targets}, "
                f"{who}, scale {self.scale}{tokens}{', fused' if self.fused else ''}")


def lora_digest(path: str | os.PathLike) -> str:
    """The key of a LoRA file in image caches: its SHA-256, combined with that of the new tokens'
    embedding file beside it (pivotal tuning), since the images depend on both."""
    path = Path(path)
    digest = sha256_file(path)
    embedding_path = find_embedding_file(path.parent)
    if embedding_path is not None:
        digest = hashlib.sha256(f"{digest}:{sha256_file(embedding_path)}".encode()).hexdigest()
    return digest


def _adapter_names(pipe) -> set[str]:
    return {a for names in pipe.get_list_adapters().values() for a in names}


def load_lora(
    pipe,
    source: str | os.PathLike,
    *,
    adapter_name: str = "subject",
    scale: float = 1.0,
    trigger: str | None = None,
) -> LoraInfo:
    """Check a LoRA and load it into ``pipe`` as the active adapter.

    Args:
        pipe: from :func:`lora_helpers.generate.pipeline.load_pipeline`.
        source: a run folder (its final LoRA and ``config.json``), a diffusers-format
            ``.safetensors`` file, or a kohya/A1111 ``.safetensors`` file.
        adapter_name: name in the pipeline; loading again under the same name replaces it
            (re-running a notebook cell is safe).
        scale: LoRA strength (0 = base model, 1 = as trained).
        trigger: phrase for ``{subject}``; default: the run config's ``trigger`` (a run of several people
            has none: its ``subjects`` fill ``{<slug>}``).

    Returns:
        A :class:`LoraInfo`.

    Raises:
        LoraNotFoundError, LoraFileError: see :func:`check_lora_file` (damaged, NaN/inf values,
            another base model); the pipeline is unchanged.
        ValueError: a scale that is not a finite number.
    """
    scale = check_number(scale, "scale", "1.0")
    path, run_dir = find_lora_file(source)
    checked = check_lora_file(path, pipe)
    run_config = read_run_config(run_dir) if run_dir else {}
    # pivotal tuning: the new tokens' embeddings sit beside the LoRA (run or checkpoint folder)
    embedding_path = find_embedding_file(path.parent)
    embeddings = read_embeddings(embedding_path) if embedding_path else None
    recorded_base = run_config.get("base_model")
    if recorded_base and str(recorded_base) != str(pipe.name_or_path):
        warnings.warn(f"{path.name} was trained on {recorded_base!r} but the pipeline is {pipe.name_or_path!r}; "
                      "faces may not come through if these are different models")
    if adapter_name in _adapter_names(pipe):
        unload_lora(pipe, adapter_name)
    with quiet_diffusers():
        pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    subjects = run_subjects(run_config)
    if not trigger and not subjects:
        trigger = run_config.get("trigger") or checked["metadata"].get("trigger")
    info = LoraInfo(
        path=path, sha256=lora_digest(path), adapter_name=adapter_name, scale=float(scale), format=checked["format"],
        trigger=trigger, run_dir=run_dir,
        run_config=run_config, rank=checked["rank"], targets=checked["targets"], embeddings=embeddings,
        embedding_path=embedding_path, subjects=subjects,
    )
    activate_lora(pipe, info, info.scale)
    return info


def run_subjects(run_config: dict) -> dict[str, str]:
    """slug -> trigger of a run of several people (config.json "subjects"), {} for one person."""
    subjects = run_config.get(SUBJECTS_KEY) or {}
    return {str(slug): str(s["trigger"]) for slug, s in subjects.items() if isinstance(s, dict) and s.get("trigger")}


def unload_lora(pipe, lora: LoraInfo | str | None = None) -> None:
    """Remove a LoRA from ``pipe``, unfusing first.

    Args:
        pipe: the pipeline.
        lora: a :class:`LoraInfo`, a set of them (:class:`lora_helpers.generate.combine.LoraSet`: each is
            removed) or an adapter name; None removes every LoRA.
    """
    if getattr(pipe, "fused_loras", None):
        pipe.unfuse_lora()
    pipe._lora_helpers_fused = None
    if lora is None:
        _activate_embeddings(pipe, None)
        if _adapter_names(pipe):
            with quiet_diffusers():
                pipe.unload_lora_weights()
        return
    for member in getattr(lora, "loras", ()):
        unload_lora(pipe, member)
    if hasattr(lora, "loras"):
        return
    name = lora.adapter_name if isinstance(lora, LoraInfo) else lora
    if name in _adapter_names(pipe):
        with quiet_diffusers():
            pipe.delete_adapters(name)
    if isinstance(lora, LoraInfo):
        lora.fused = False


def activate_lora(pipe, lora: LoraInfo | Any | None, scale: float | None = None) -> None:
    """Make ``pipe`` compute with exactly this LoRA (or set of LoRAs) at this scale, or with no LoRA.

    Generation calls this before every batch, so switching between base model, LoRA
    strengths and checkpoints never depends on what ran before. A LoRA marked ``fused``
    is re-fused at the requested scale (unfuse, set, fuse), otherwise scales are set on
    the unfused adapter, which is exact: scale 0 gives the base model's pixels.

    Args:
        pipe: the pipeline.
        lora: the LoRA to use, a :class:`lora_helpers.generate.combine.LoraSet` (each LoRA at its weight
            times ``scale``; the others loaded in the pipeline are off), or None for the base model.
        scale: strength; None: ``lora.scale``.

    Raises:
        ValueError: a scale that is not a finite number (NaN gives black pictures).
        LoraFileError: the LoRA is no longer loaded in ``pipe``.
    """
    if lora is not None:
        scale = check_number(lora.scale if scale is None else scale, "LoRA scale", "1.0")
        names, weights = lora.adapters(scale)
        for name in names:
            if name not in _adapter_names(pipe):
                raise LoraFileError(lora.path, f"adapter {name!r} is no longer loaded in this pipeline; "
                                               "call load_lora (or load_loras) again")
    _activate_embeddings(pipe, lora.embeddings if lora is not None else None)
    want = (lora.adapter_name, scale) if lora is not None and lora.fused else None
    have = getattr(pipe, "_lora_helpers_fused", None) if getattr(pipe, "fused_loras", None) else None
    if getattr(pipe, "fused_loras", None) and have != want:
        pipe.unfuse_lora()
        pipe._lora_helpers_fused = have = None
    if lora is None:
        if _adapter_names(pipe):
            pipe.disable_lora()
        return
    if want is not None and have == want:
        return  # already fused at this scale; set_adapters would unmerge the layers again
    pipe.enable_lora()
    pipe.set_adapters(names, adapter_weights=weights)
    if want is not None:
        with quiet_diffusers():
            # set_adapters' weight is applied when fusing, so lora_scale stays 1.0
            pipe.fuse_lora(adapter_names=[lora.adapter_name], lora_scale=1.0)
        pipe._lora_helpers_fused = want


def _activate_embeddings(pipe, embeddings: PivotalEmbeddings | None) -> None:
    """Give the text encoders exactly these new tokens, or none (the base model, a LoRA without them)."""
    loaded = getattr(pipe, "_lora_helpers_tokens", None)
    if loaded and (embeddings is None or list(embeddings.tokens) != loaded):
        unload_embeddings(pipe, loaded)
        pipe._lora_helpers_tokens = None
    if embeddings is not None:
        load_embeddings(pipe, embeddings)  # rows overwritten in place when the tokens are there
        pipe._lora_helpers_tokens = list(embeddings.tokens)


def fuse_lora(pipe, lora: LoraInfo, scale: float | None = None) -> None:
    """Fuse ``lora`` into the weights for speed (no extra LoRA matmuls per step).

    Generation at another scale, at the base model or with another LoRA unfuses first,
    so results stay right; each re-fuse costs a pass over the weights. Unfusing
    subtracts the LoRA again, which is exact only up to rounding (fp16: about 1e-3).

    Args:
        pipe: the pipeline ``lora`` is loaded in.
        lora: from :func:`load_lora`; marked ``fused``.
        scale: strength to fuse at; None keeps ``lora.scale``.

    Raises:
        ValueError: a set of several LoRAs (fusing mixes them for good; generate with them unfused).
    """
    if not isinstance(lora, LoraInfo):
        raise ValueError("fuse_lora fuses one LoRA; a set of several is used unfused (generate with it as it is)")
    if scale is not None:
        lora.scale = check_number(scale, "scale", "1.0")
    lora.fused = True
    activate_lora(pipe, lora, lora.scale)


def unfuse_lora(pipe, lora: LoraInfo) -> None:
    """Undo :func:`fuse_lora`; the LoRA stays loaded as a separate adapter.

    Args:
        pipe: the pipeline ``lora`` is loaded in.
        lora: the fused LoRA.
    """
    lora.fused = False
    if getattr(pipe, "fused_loras", None):
        pipe.unfuse_lora()
        pipe._lora_helpers_fused = None
    activate_lora(pipe, lora, lora.scale)
