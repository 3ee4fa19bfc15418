"""Comparing training runs side by side on the same prompts and seeds.

Two ways of training one person (for example the plain "TOK person" against pivotal
tokens) are evaluated with the same settings and references; each run is compared at
its own recommended checkpoint and LoRA scale (or at one you name), prompt by prompt and
overall: identity against the training photos and against the held-out ones, prompt
adherence (CLIP-T) and the number of near-copies of a training photo.
``comparison.csv`` and ``comparison.png`` are written all or nothing.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from lora_helpers.core.fileio import atomic_path
from lora_helpers.evaluate.config import EvaluateConfig
from lora_helpers.evaluate.identity import ReferenceSet, reference_embeddings
from lora_helpers.evaluate.plots import plot_comparison
from lora_helpers.evaluate.report import EvaluationResult
from lora_helpers.evaluate.run import evaluate_run
from lora_helpers.evaluate.scores_csv import write_scores_csv
from lora_helpers.evaluate.summary import is_base, rounded, summarize

__all__ = ["Comparison", "compare_runs", "format_comparison"]

ALL_PROMPTS = "all"
"""``prompt_id`` of the rows over every prompt of a run."""

_KEEP = ("images", "faces_found", "identity_mean", "identity_heldout_mean", "identity_pass_rate", "memorised",
         "clip_t_mean", "clip_i_mean", "diversity_mean")


@dataclass
class Comparison:
    """What :func:`compare_runs` produced.

    Attributes:
        rows: one per prompt and run, then one per run over all prompts (``prompt_id`` "all").
        labels: the runs' names in the table, in order.
        results: each run's :class:`EvaluationResult`.
        files: ``{"table": comparison.csv, "plot": comparison.png}``.
    """

    rows: list[dict]
    labels: list[str]
    results: list[EvaluationResult]
    files: dict[str, Path]


def _labels(results: list[EvaluationResult], labels: Sequence[str] | None) -> list[str]:
    if labels is not None:
        if len(labels) != len(results) or len(set(labels)) != len(labels):
            raise ValueError(f"labels must name each of the {len(results)} runs once; got {list(labels)}")
        return [str(x) for x in labels]
    folders = [r.run_dir or r.out_dir.parent for r in results]
    names = [f.name for f in folders]
    if len(set(names)) < len(names):  # two "run" folders in different workspaces
        names = [f"{f.parent.name}/{f.name}" for f in folders]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def _setting(result: EvaluationResult, label: str, checkpoint: str | None, scale: float | None) -> tuple[str, float]:
    """(checkpoint, scale) a run is compared at: the one named, else the run's choice, else its last."""
    lora = [s for s in result.summary if not is_base(s) and s.get("scale") is not None]
    if not lora:
        raise ValueError(f"run {label} has no LoRA images to compare (only the base model); evaluate it at a scale above 0")
    if checkpoint is None:
        checkpoint = result.choice.checkpoint if result.choice else str(lora[-1]["checkpoint"])
        if scale is None and result.choice:
            scale = result.choice.scale
    found = [s for s in lora if str(checkpoint) in (str(s["checkpoint"]), str(s.get("step")))
             and (scale is None or math.isclose(s["scale"], scale))]
    if not found:
        have = ", ".join(sorted({f"{s['checkpoint']} at scale {s['scale']:g}" for s in lora}))
        raise ValueError(f"run {label} was not evaluated at checkpoint {checkpoint}"
                         + (f", scale {scale:g}" if scale is not None else "") + f"; it has {have}")
    best = max(found, key=lambda s: s["scale"])  # without a scale named: the highest evaluated
    return str(best["checkpoint"]), float(best["scale"])


def _table(results: list[EvaluationResult], labels: list[str], settings: list[tuple[str, float]]) -> list[dict]:
    chosen = [[r for r in res.rows if str(r.get("checkpoint")) == ckpt and r.get("scale") is not None
               and math.isclose(r["scale"], scale)] for res, (ckpt, scale) in zip(results, settings)]
    keys = [{(r.get("prompt_id"), r.get("seed")) for r in rows} for rows in chosen]
    for label, k in zip(labels[1:], keys[1:]):
        if k != keys[0]:
            raise ValueError(f"runs {labels[0]} and {label} were evaluated on different prompts or seeds "
                             f"({len(keys[0] ^ k)} images differ); evaluate both with the same settings")
    prompt_ids = list(dict.fromkeys(r.get("prompt_id") for r in chosen[0]))
    out = []
    for pid in prompt_ids + [ALL_PROMPTS]:
        for label, rows, (ckpt, scale) in zip(labels, chosen, settings):
            group = rows if pid == ALL_PROMPTS else [r for r in rows if r.get("prompt_id") == pid]
            (s,) = summarize(group) or [{}]  # every image unreadable: an empty row
            first = group[0] if group else {}
            out.append({"prompt_id": pid, "category": first.get("category") if pid != ALL_PROMPTS else None,
                        "prompt": first.get("prompt") if pid != ALL_PROMPTS else None, "run": label,
                        "checkpoint": ckpt, "scale": scale,
                        "seeds": " ".join(str(x) for x in sorted({r.get("seed") for r in group if r.get("seed") is not None})),
                        **{k: rounded(s.get(k)) for k in _KEEP}})
    return out


def compare_runs(
    runs: Sequence[str | Path | EvaluationResult],
    *,
    references: ReferenceSet | str | Path | Sequence,
    config: EvaluateConfig | None = None,
    prompts: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    checkpoint: str | None = None,
    scale: float | None = None,
    out_dir: str | Path | None = None,
    progress: bool = True,
) -> Comparison:
    """Evaluate runs with the same prompts, seeds and references, and compare them side by side.

    Each run folder is evaluated as :func:`lora_helpers.evaluate.run.evaluate_run` does (into
    its own ``evaluation/``; images already there are reused); a run already evaluated can
    be passed as its :class:`EvaluationResult`.

    Args:
        runs: run folders or results, at least two.
        references: the person's photos, the same for every run (dataset/, a folder, or a ReferenceSet).
        config: evaluation settings for every run.
        prompts: your own prompt templates for every run (``{subject}`` becomes each run's own
            trigger); None: the standard set.
        labels: names of the runs in the table (default: their folder names).
        checkpoint: compare every run at this checkpoint name or step (default: each run's choice).
        scale: and this LoRA scale (default: the choice's, or the highest evaluated).
        out_dir: where ``comparison.csv`` and ``comparison.png`` go (default: the first run's
            ``evaluation/``).
        progress: show progress bars.

    Returns:
        A :class:`Comparison`.

    Raises:
        ValueError: fewer than two runs, a run without LoRA images or without the chosen
            checkpoint and scale, or runs evaluated on different prompts or seeds.
        FileNotFoundError: a folder that is not a training run.
    """
    if len(runs) < 2:
        raise ValueError(f"compare_runs needs at least two runs, got {len(runs)}")
    config = config or EvaluateConfig()
    refs = None
    results = []
    for run in runs:
        if isinstance(run, EvaluationResult):
            results.append(run)
            continue
        if refs is None:  # embedded once, shared by every run
            refs = reference_embeddings(references, backend=config.face_backend, threshold=config.threshold,
                                        copy_threshold=config.copy_threshold, progress=progress)
        results.append(evaluate_run(run, references=refs, config=config, prompts=prompts, progress=progress))
    names = _labels(results, labels)
    settings = [_setting(r, label, checkpoint, scale) for r, label in zip(results, names)]
    rows = _table(results, names, settings)
    out_dir = Path(out_dir) if out_dir is not None else results[0].out_dir
    files = {"table": out_dir / "comparison.csv", "plot": out_dir / "comparison.png"}
    with contextlib.ExitStack() as stack:  # both files or neither, as write_evaluation does
        tmp = {key: stack.enter_context(atomic_path(path)) for key, path in files.items()}
        write_scores_csv(tmp["table"], rows)
        plot_comparison(rows, names, tmp["plot"], all_prompts=ALL_PROMPTS)
    return Comparison(rows=rows, labels=names, results=results, files=files)


def format_comparison(comparison: Comparison) -> str:
    """A short text table: each run over all prompts, then prompt by prompt.

    Args:
        comparison: from :func:`compare_runs`.

    Returns:
        The table.
    """
    f = lambda v, w=8: f"{v:>{w}.3f}" if isinstance(v, float) else f"{'-':>{w}}"
    width = max(len(x) for x in comparison.labels + ["run"])
    lines = [f"{'prompt':<14} {'run':<{width}} {'at':<22} {'identity':>8} {'held-out':>8} {'CLIP-T':>8} {'copies':>6}"]
    for r in sorted(comparison.rows, key=lambda r: r["prompt_id"] != ALL_PROMPTS):
        at = f"{r['checkpoint']} x{r['scale']:g}"
        lines.append(f"{str(r['prompt_id']):<14} {r['run']:<{width}} {at:<22} {f(r['identity_mean'])} "
                     f"{f(r['identity_heldout_mean'])} {f(r['clip_t_mean'])} {r['memorised'] or 0:>6}")
    return "\n".join(lines)
