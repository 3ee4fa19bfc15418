"""Two (or more) separately trained LoRAs in one pipeline, each at its own weight: two people in one picture.

Each LoRA is loaded as its own diffusers adapter and they are mixed with
``pipe.set_adapters([a, b], adapter_weights=[wa, wb])``: the UNet computes with the base
weights plus ``wa`` times the first LoRA's change plus ``wb`` times the second's. A
:class:`LoraSet` goes wherever one LoRA goes (``generate_images(..., lora_info=lora_set)``,
the grids), and :func:`lora_helpers.generate.lora.activate_lora` switches between a set, one
LoRA and the base model exactly.

Prompts name the people by placeholder: ``{<name>}`` is a run's trigger, ``<name>`` the slug
of its run folder ("runs/Ada Lovelace" -> ``{ada-lovelace}``) or of a person of a run of several.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Sequence

from lora_helpers.generate.lora import LoraInfo, activate_lora, find_lora_file, load_lora
from lora_helpers.generate.settings import check_number

__all__ = ["LoraSet", "load_loras", "run_slug"]


def run_slug(name: str) -> str:
    """The placeholder name of a run folder: lowercase letters, digits, '-' and '_' ("Ada Lovelace" -> "ada-lovelace")."""
    return re.sub(r"[^a-z0-9_]+", "-", name.lower()).strip("-") or "lora"


@dataclass
class LoraSet:
    """Several LoRAs active together, each at its weight (used like one :class:`LoraInfo`).

    Attributes:
        loras: the LoRAs, as loaded by :func:`load_loras`.
        weights: one strength each.
        scale: multiplies every weight (a generation request's ``lora_scale`` replaces it).
        subjects: placeholder name -> trigger phrase of every person the set knows.
    """

    loras: list[LoraInfo]
    weights: list[float]
    scale: float = 1.0
    subjects: dict[str, str] = field(default_factory=dict)
    fused: bool = False  # never: fuse_lora takes one LoRA
    embeddings = None  # new tokens (pivotal tuning) are refused in a set
    trigger = None  # several people: {subject} names nobody

    def adapters(self, scale: float) -> tuple[list[str], list[float]]:
        """The adapter names and weights that make the pipeline compute with this set at ``scale``."""
        return [lora.adapter_name for lora in self.loras], [w * scale for w in self.weights]

    @property
    def path(self) -> str:
        """The LoRA files, joined by " + " (what a generated image's metadata records)."""
        return " + ".join(str(lora.path) for lora in self.loras)

    @property
    def sha256(self) -> str:
        """The key of the set in image caches: every file's digest with its weight."""
        text = "+".join(f"{lora.sha256}*{w!r}" for lora, w in zip(self.loras, self.weights))
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def name(self) -> str:
        """Short label: each LoRA's name with its weight ("ada x0.8 + grace x0.8")."""
        return " + ".join(f"{lora.name} x{w:g}" for lora, w in zip(self.loras, self.weights))

    def __str__(self) -> str:
        people = ", ".join(f"{{{k}}}: {v!r}" for k, v in self.subjects.items())
        return f"{len(self.loras)} LoRAs: {self.name}; people {people}; scale {self.scale:g}"


def load_loras(pipe, sources: Sequence[str | os.PathLike], *, weights: Sequence[float] | None = None,
               names: Sequence[str] | None = None, scale: float = 1.0) -> LoraSet:
    """Load several LoRAs into ``pipe`` as separate adapters and make them active together.

    Args:
        pipe: from :func:`lora_helpers.generate.pipeline.load_pipeline`.
        sources: run folders or LoRA files (see :func:`lora_helpers.generate.lora.load_lora`).
        weights: one strength each (default 1.0 each); about 0.7-0.9 each keeps two faces from
            overcooking, as both LoRAs change the same layers.
        names: the placeholder (and adapter) name of each; default: the slug of each run folder
            (of the file's stem outside a run).
        scale: multiplies every weight.

    Returns:
        A :class:`LoraSet`, active in ``pipe``. A one-person run's trigger fills ``{<name>}``; a run
        of several people adds each of its people's slugs.

    Raises:
        ValueError: fewer than two sources, weights or names that do not match the sources in number,
            a weight that is not finite, two LoRAs or people with the same name, or a LoRA with new
            tokens (pivotal tuning: their tokens would overwrite each other).
        LoraNotFoundError, LoraFileError: a source that is missing or damaged (naming it).
    """
    sources = list(sources)
    if len(sources) < 2:
        raise ValueError("load_loras combines two or more LoRAs; for one, use load_lora")
    weights = [1.0] * len(sources) if weights is None else list(weights)
    if len(weights) != len(sources):
        raise ValueError(f"{len(weights)} weights for {len(sources)} LoRAs: give one weight per LoRA, "
                         "e.g. weights=[0.8, 0.8]")
    weights = [check_number(w, "LoRA weight", "0.8") for w in weights]
    scale = check_number(scale, "scale", "1.0")
    if names is None:
        names = []
        for source in sources:
            path, run_dir = find_lora_file(source)
            names.append(run_slug(run_dir.name if run_dir is not None else path.stem))
    names = [run_slug(str(n)) for n in names]
    if len(names) != len(sources) or len(set(names)) != len(names):
        raise ValueError(f"each LoRA needs its own name, got {names}; pass names=['ada', 'grace']")
    loras = [load_lora(pipe, source, adapter_name=name) for source, name in zip(sources, names)]
    subjects: dict[str, str] = {}
    for lora, name in zip(loras, names):
        if lora.embeddings is not None:
            raise ValueError(f"{lora.path}: this LoRA calls its person with new tokens (pivotal tuning), which "
                             "cannot be combined with another LoRA here; use LoRAs trained with a rare word (TOK)")
        people = lora.subjects or ({name: lora.trigger} if lora.trigger else {})
        for slug, trigger in people.items():
            if slug in subjects:
                raise ValueError(f"two LoRAs both name a person {{{slug}}}; pass names=[...] to tell them apart")
            subjects[slug] = trigger
    shared = [t for t in dict.fromkeys(subjects.values()) if list(subjects.values()).count(t) > 1]
    if shared:
        warnings.warn(f"several people are called {shared[0]!r}: a prompt cannot tell them apart, and both LoRAs "
                      "answer to it; train them with different identifiers (TOK1, TOK2)", stacklevel=2)
    lora_set = LoraSet(loras=loras, weights=weights, scale=scale, subjects=subjects)
    activate_lora(pipe, lora_set, lora_set.scale)
    return lora_set
