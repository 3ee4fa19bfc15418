"""What evaluation produced: per-image rows, the summary, the choice, and the files written.

:func:`write_evaluation` writes ``scores.csv``, ``summary.csv``, ``identity_vs_prompt.png``
and ``evaluation.json`` for a run or a folder of images, all or nothing: each goes to a
temporary name first and all are renamed only once every one was written, so a failure
never leaves new scores beside an old summary. :func:`format_summary` prints the summary
as a short table.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from lora_helpers.core.fileio import atomic_path, write_json
from lora_helpers.evaluate.choice import Choice, best_checkpoint
from lora_helpers.evaluate.config import EvaluateConfig
from lora_helpers.evaluate.identity import ReferenceSet
from lora_helpers.evaluate.plots import plot_identity_vs_leakage, plot_identity_vs_prompt
from lora_helpers.evaluate.scores_csv import write_scores_csv
from lora_helpers.evaluate.subjects import SubjectReferences, subject_summary
from lora_helpers.evaluate.summary import is_base, memorised_rows, rounded, summarize, unreadable_rows

__all__ = ["EvaluationResult", "write_evaluation", "format_summary", "held_out_line", "references_line",
           "format_references"]


@dataclass
class EvaluationResult:
    """What :func:`lora_helpers.evaluate.run.evaluate_run` or the CLI produced."""

    rows: list[dict]
    summary: list[dict]
    choice: Choice | None
    references: ReferenceSet | SubjectReferences
    out_dir: Path
    files: dict[str, Path]
    run_dir: Path | None = None
    subjects: list[dict] | None = None
    """Several people: :func:`lora_helpers.evaluate.subjects.subject_summary` (None for one person)."""

    @property
    def unreadable(self) -> list[dict]:
        """Images that could not be read (``{"image", "error"}``), left out of every average."""
        return unreadable_rows(self.rows)

    @property
    def lower_bound(self) -> float | None:
        """Identity mean of the base model without the LoRA (None when not generated)."""
        base = [s for s in self.summary if is_base(s)]
        return base[0]["identity_mean"] if base else None


def _held_out_report(refs: ReferenceSet) -> dict:
    return {"photos": refs.held_out.names if refs.held_out else [], "upper_bound": rounded(refs.held_out_upper_bound),
            "not_available": refs.held_out_note or None}


def write_evaluation(rows: list[dict], refs: ReferenceSet | SubjectReferences, config: EvaluateConfig, out_dir: Path,
                     *, extra: dict) -> EvaluationResult:
    """Summarise scored rows, choose a checkpoint, and write the outputs into ``out_dir``.

    Args:
        rows: per-image rows from :func:`lora_helpers.evaluate.scoring.score_rows` or
            :func:`lora_helpers.evaluate.scoring.evaluate_images`.
        refs: the reference set the rows were scored against (bounds and threshold), or each
            person's (then ``subjects.csv``, per person, and ``identity_vs_leakage.png`` are written too).
        config: the settings (choice weights and floors; recorded in ``evaluation.json``).
        out_dir: folder for ``scores.csv``, ``summary.csv``, ``identity_vs_prompt.png``
            (when rows have scales) and ``evaluation.json``; written all or nothing.
        extra: more fields for ``evaluation.json`` (the run folder, subject, ...).

    Returns:
        An :class:`EvaluationResult`; ``choice`` is None without a LoRA candidate.

    Raises:
        IsADirectoryError: a folder stands where an output goes (nothing is written).
    """
    summary = summarize(rows)
    choice = None
    if any(not is_base(s) and s.get("scale") is not None for s in summary):
        choice = best_checkpoint(summary, identity_weight=config.identity_weight,
                                 min_prompt_adherence=config.min_prompt_adherence,
                                 min_adherence_vs_base=config.min_adherence_vs_base, upper_bound=refs.upper_bound)
    names = {"scores": "scores.csv", "summary": "summary.csv", "report": "evaluation.json"}
    if any(s.get("scale") is not None for s in summary):
        names["plot"] = "identity_vs_prompt.png"
    people = subject_summary(rows) if isinstance(refs, SubjectReferences) else None
    if people is not None:
        names["subjects"] = "subjects.csv"
        if any(s["subject"] and "+" not in s["subject"] for s in people):
            names["leakage_plot"] = "identity_vs_leakage.png"
    files = {key: Path(out_dir) / name for key, name in names.items()}
    stale = _earlier_outputs(Path(out_dir) / names["report"]) - set(names.values())
    for path in files.values():  # a rename onto a folder would fail after the others were renamed
        if path.is_dir():
            raise IsADirectoryError(errno.EISDIR, "a folder stands where this output goes; move it away", str(path))
    base = [s for s in summary if is_base(s)]
    copies = memorised_rows(rows)
    report = {
        **extra,
        "upper_bound_leave_one_out": rounded(refs.upper_bound),
        "lower_bound_base_model": rounded(base[0]["identity_mean"]) if base else None,
        "threshold": refs.threshold, "face_backend": refs.backend,
        "references": refs.names, "references_without_face": refs.without_face,
        "unreadable_images": unreadable_rows(rows),
        "held_out": ({s: _held_out_report(r) for s, r in refs.subjects.items()} if people is not None
                     else _held_out_report(refs)),
        "memorised": {"threshold": refs.copies.threshold if refs.copies else None, "count": len(copies),
                      "images": copies},
        "choice": asdict(choice) if choice else None, "summary": summary,
        "config": asdict(config), "files": sorted(names.values()),
    }
    if people is not None:
        report["people"] = {s: {"trigger": refs.triggers.get(s), "references": r.names,
                                "upper_bound_leave_one_out": rounded(r.upper_bound)} for s, r in refs.subjects.items()}
        report["subject_summary"] = [{k: rounded(v) for k, v in s.items()} for s in people]
    # Every output goes to a temporary file; leaving the ExitStack without an error renames them
    # all, an error anywhere removes them all and leaves the previous outputs as they were.
    with contextlib.ExitStack() as stack:
        tmp = {key: stack.enter_context(atomic_path(path)) for key, path in files.items()}
        write_scores_csv(tmp["scores"], rows)
        write_scores_csv(tmp["summary"], [{k: rounded(v) for k, v in s.items()} for s in summary])
        if "plot" in tmp:
            plot_identity_vs_prompt(summary, tmp["plot"], upper_bound=refs.upper_bound, threshold=refs.threshold,
                                    choice=choice)
        if "subjects" in tmp:
            write_scores_csv(tmp["subjects"], [{k: rounded(v) for k, v in s.items()} for s in people])
        if "leakage_plot" in tmp:
            plot_identity_vs_leakage(people, tmp["leakage_plot"], threshold=refs.threshold,
                                     upper_bounds={s: r.upper_bound for s, r in refs.subjects.items()})
        write_json(tmp["report"], report)
    # A plot or per-person table of an earlier evaluation that this one does not make would be
    # taken for this one's: remove what the earlier evaluation.json lists as its own.
    for name in stale:
        (Path(out_dir) / name).unlink(missing_ok=True)
    run_dir = extra.get("run_dir")
    return EvaluationResult(rows=rows, summary=summary, choice=choice, references=refs, out_dir=out_dir, files=files,
                            run_dir=Path(run_dir) if run_dir else None, subjects=people)


_OPTIONAL_OUTPUTS = {"identity_vs_prompt.png", "subjects.csv", "identity_vs_leakage.png"}


def _earlier_outputs(report: Path) -> set[str]:
    """The optional outputs an earlier ``evaluation.json`` in this folder says it wrote."""
    try:
        listed = json.loads(report.read_text(encoding="utf-8")).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {name for name in listed if isinstance(name, str)} & _OPTIONAL_OUTPUTS


def held_out_line(refs: ReferenceSet | SubjectReferences) -> str:
    """One line on the photos held out of training: which, and what real photos score against
    them; or why there is no held-out score (one line per person for several people).

    Args:
        refs: from :func:`lora_helpers.evaluate.identity.reference_embeddings` or
            :func:`lora_helpers.evaluate.subjects.subject_references`.
    """
    if isinstance(refs, SubjectReferences):
        return "\n".join(f"{slug}: {held_out_line(r)}" for slug, r in refs.subjects.items())
    if refs.held_out is not None:
        return (f"held-out photos: {len(refs.held_out.names)} ({', '.join(refs.held_out.names)}); the training "
                f"photos score {refs.held_out_upper_bound:.3f} against them (upper bound of held-out identity)")
    return f"held-out identity not available: {refs.held_out_note or 'no photo was held out'}"


def references_line(refs: ReferenceSet | SubjectReferences) -> str:
    """How many reference photos have a face, their leave-one-out bound and the threshold (a line per person
    for several people).

    Args:
        refs: from :func:`lora_helpers.evaluate.identity.reference_embeddings` or
            :func:`lora_helpers.evaluate.subjects.subject_references`.
    """
    if isinstance(refs, SubjectReferences):
        return "\n".join(f"{slug} ({refs.triggers.get(slug, '?')}): {references_line(r)}"
                         for slug, r in refs.subjects.items())
    return (f"references: {len(refs.names)} with a face"
            + (f", leave-one-out similarity {refs.upper_bound:.3f} (upper bound)" if refs.leave_one_out else "")
            + f"; same-person threshold {refs.threshold:.2f}")


def format_references(refs: ReferenceSet | SubjectReferences) -> str:
    """Each reference photo's similarity to the mean of the others, the bound, the threshold and the
    held-out photos; per person for several people.

    Args:
        refs: from :func:`lora_helpers.evaluate.identity.reference_embeddings`,
            :func:`lora_helpers.evaluate.subjects.subject_references` or
            :func:`lora_helpers.evaluate.run.references_for_run`.

    Returns:
        The lines (a photo far below the others is worth a look: another person, a heavy filter).
    """
    if isinstance(refs, SubjectReferences):
        return "\n\n".join(f"{slug} ({refs.triggers.get(slug, '?')}):\n{format_references(r)}"
                            for slug, r in refs.subjects.items())
    lines = [f"{sim:.3f}  {name}" for name, sim in zip(refs.names, refs.leave_one_out)]
    lines += [references_line(refs), f"no face found in: {', '.join(refs.without_face) or 'none'}", held_out_line(refs)]
    return "\n".join(lines)


def _people_lines(people: list[dict]) -> list[str]:
    """The per-person table: identity against the person prompted, leakage toward the others, who appeared."""
    f = lambda v, w=8: f"{v:>{w}.3f}" if isinstance(v, float) and not math.isnan(v) else f"{'-':>{w}}"
    lines = ["per person (leakage: the face's highest similarity to another person; appeared: every person "
             "prompted was found; others: a person not prompted was found)",
             f"{'checkpoint':<18} {'scale':>5} {'subject':<20} {'images':>6} {'identity':>8} {'held-out':>8} "
             f"{'pass':>5} {'leakage':>8} {'appeared':>8} {'others':>6}"]
    for s in people:
        scale = "-" if s["scale"] is None else f"{s['scale']:g}"
        lines.append(f"{str(s['checkpoint'] or '-'):<18} {scale:>5} {s['subject']:<20} {s['images']:>6} "
                     f"{f(s['identity_mean'])} {f(s['identity_heldout_mean'])} {s['identity_pass_rate']:>5.0%} "
                     f"{f(s['leakage_mean'])} {s['appeared_rate']:>8.0%} {s['others_appeared_rate']:>6.0%}")
    return lines


def format_summary(result: EvaluationResult) -> str:
    """A short text table of the summary, the bounds and the choice.

    Args:
        result: from :func:`lora_helpers.evaluate.run.evaluate_run` or :func:`write_evaluation`.

    Returns:
        The table, one line per checkpoint and scale.
    """
    refs = result.references
    lines = [references_line(refs), held_out_line(refs)]
    lines.append(f"{'checkpoint':<18} {'scale':>5} {'images':>6} {'faces':>6} {'identity':>8} {'held-out':>8} "
                 f"{'pass':>5} {'copies':>6} {'CLIP-T':>7} {'CLIP-I':>7} {'div':>6}")
    for s in result.summary:
        f = lambda v, w=7: f"{v:>{w}.3f}" if isinstance(v, float) and not math.isnan(v) else f"{'-':>{w}}"
        scale = "-" if s["scale"] is None else f"{s['scale']:g}"
        lines.append(f"{str(s['checkpoint'] or '-'):<18} {scale:>5} {s['images']:>6} {s['faces_found']:>6.0%} "
                     f"{f(s['identity_mean'], 8)} {f(s['identity_heldout_mean'], 8)} {s['identity_pass_rate']:>5.0%} "
                     f"{s['memorised']:>6} {f(s['clip_t_mean'])} {f(s['clip_i_mean'])} {f(s['diversity_mean'], 6)}")
    bad = result.unreadable
    if bad:
        lines.append(f"{len(bad)} unreadable image(s) left out of every average: "
                     + "; ".join(str(b["error"]) for b in bad[:5]) + ("; ..." if len(bad) > 5 else ""))
    copies = memorised_rows(result.rows)
    if copies:
        first = copies[0]
        lines.append(f"{len(copies)} image(s) are near-copies of a training photo (fingerprint correlation >= "
                     f"{refs.copies.threshold:.2f}), e.g. {first['image']} of {first['nearest_training_photo']} "
                     f"({first['copy_similarity']:.3f}): memorised, look at them before trusting identity")
    elif refs.copies is not None:
        lines.append("no image is a near-copy of a training photo")
    if result.subjects:
        lines += _people_lines(result.subjects)
    if result.lower_bound is not None:
        lines.append(f"base model without the LoRA (lower bound): identity {result.lower_bound:.3f}")
    if result.choice:
        lines.append(str(result.choice))
    return "\n".join(lines)
