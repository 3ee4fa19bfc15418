"""What the prepare stage found: one :class:`PhotoRecord` per input file, the run's
:class:`PrepareResult`, and the error raised when no photo can be used.

A record collects findings as ``(level, text)`` issues while the photo is processed and
the set is judged; its ``verdict`` and ``reasons`` are derived from them at the end
(:func:`lora_helpers.prepare.judge.finalise`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lora_helpers.prepare.config import PrepareConfig

__all__ = ["VERDICTS", "ACCEPTED", "PhotoRecord", "PrepareResult", "NoPhotosAcceptedError"]

VERDICTS = ("pass", "warn", "reject", "skip")
ACCEPTED = ("pass", "warn")


@dataclass
class PhotoRecord:
    """What preparation found and did for one input file (one row of ``report.csv``).

    ``measures`` holds the raw numbers (sharpness, brightness, ...), ``scores`` their
    0..1 scores; ``crop`` describes the transform (bucket, box, rotation, padding).
    """

    file: str
    path: Path
    verdict: str = "reject"
    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    mode: str | None = None
    original_size: tuple[int, int] | None = None
    faces: int | None = None
    face_box: tuple[float, float, float, float] | None = None
    measures: dict = field(default_factory=dict)
    scores: dict = field(default_factory=dict)
    face_clarity_score: float | None = None
    # Share of the crop's detail that is real (not padding, not enlarged): align.resize_quality.
    resize_quality: float | None = None
    # Kept out of training so evaluation can score likeness on a face the LoRA never saw.
    held_out: bool = False
    # Whose photo it is in a dataset of several people (a slug such as "ada"); None: the one person.
    subject: str | None = None
    crop: dict = field(default_factory=dict)
    duplicate_of: str | None = None
    image_file: str | None = None
    mask_file: str | None = None
    override: str | None = None
    stem: str | None = None
    thumbnail: object = field(default=None, repr=False)
    crop_thumbnail: object = field(default=None, repr=False)
    # (level, text) found by the checks; verdict and reasons are derived from them.
    issues: list[tuple[str, str]] = field(default_factory=list, repr=False)
    embedding: np.ndarray | None = field(default=None, repr=False)
    phash: int | None = field(default=None, repr=False)
    rendered: tuple[bytes, bytes] | None = field(default=None, repr=False)
    metadata: dict = field(default_factory=dict, repr=False)

    @property
    def accepted(self) -> bool:
        return self.verdict in ACCEPTED

    def add(self, level: str, text: str) -> None:
        """Record a finding: level is "warn", "reject" or "skip"."""
        self.issues.append((level, text))


@dataclass
class PrepareResult:
    """All records of a run, in input order, and where the outputs are."""

    out_dir: Path
    records: list[PhotoRecord]
    config: PrepareConfig
    # name -> (what the photo's processing depended on, the record before set-level checks):
    # lets a re-run after an override redo only the photos that changed.
    processed: dict = field(default_factory=dict, repr=False)
    reused: int = 0
    # What the person should know about the dataset folder (a crop renamed, a caption kept aside).
    messages: list[str] = field(default_factory=list)
    # Which photos are held out of training, or why none is (lora_helpers.prepare.holdout).
    held_out_message: str = ""

    @property
    def accepted(self) -> list[PhotoRecord]:
        return [r for r in self.records if r.accepted]

    @property
    def subjects(self) -> list[str]:
        """The people of a dataset of several, in order of their first photo; [] for one person."""
        return list(dict.fromkeys(r.subject for r in self.records if r.accepted and r.subject))

    @property
    def rejected(self) -> list[PhotoRecord]:
        return [r for r in self.records if r.verdict == "reject"]

    @property
    def skipped(self) -> list[PhotoRecord]:
        return [r for r in self.records if r.verdict == "skip"]

    @property
    def held_out(self) -> list[PhotoRecord]:
        """Accepted photos kept out of training for the held-out likeness score."""
        return [r for r in self.records if r.accepted and r.held_out]

    def record(self, file: str) -> PhotoRecord:
        """The record for an input file name."""
        for r in self.records:
            if r.file == file or r.path.name == file:
                return r
        raise KeyError(f"{file} is not among the prepared photos")

    def summary(self) -> str:
        """One line per photo (verdict, file, held out, reasons), then which photos are held out or why none is."""
        lines = [f"{len(self.accepted)} of {len(self.records)} files accepted -> {self.out_dir}"
                 + (f" ({len(self.records) - self.reused} photos redone, {self.reused} unchanged)" if self.reused else "")]
        for r in self.records:
            why = "; ".join(r.reasons)
            lines.append(f"  {r.verdict:6s} {r.file}" + (f" [{r.subject}]" if r.subject else "")
                         + (" [held out]" if r.accepted and r.held_out else "")
                         + (f"  ({why})" if why else ""))
        if self.held_out_message:
            lines.append(self.held_out_message)
        lines += [f"note: {m}" for m in self.messages]
        return "\n".join(lines)


class NoPhotosAcceptedError(RuntimeError):
    """No photo passed; the message lists why each was rejected (report.csv has more).

    Args:
        result: the run's records.
        unchanged: the dataset folder already held a dataset and was left exactly as it was.
    """

    def __init__(self, result: PrepareResult, *, unchanged: bool = False):
        self.result, self.unchanged = result, unchanged
        kept = f"; the dataset in {result.out_dir} was left as it was" if unchanged else ""
        if not result.records:
            super().__init__(f"the photo folder is empty: add 10-15 photos of one person (JPEG, PNG, WebP){kept}")
            return
        lines = [f"none of the {len(result.records)} files in the photo folder can be used for training{kept}:"]
        for r in result.records:
            lines.append(f"  {r.file}: {r.verdict}: {'; '.join(r.reasons) or 'no reason recorded'}")
        where = "" if unchanged else f"see {result.out_dir / 'report.csv'} and contact_sheet.png; "
        lines.append(f"{where}add photos with one clear face each")
        super().__init__("\n".join(lines))
