"""The files of a finished run: the LoRA in both formats, ``config.json`` ("finished"), the
loss plot, the model card, and the Hub upload when asked for.

:func:`finish_run` is the last thing :func:`lora_helpers.train.loop.run_training` does with
a :class:`~lora_helpers.train.session.TrainingSession`; only the main process writes.
"""

from __future__ import annotations

import dataclasses
import statistics

import torch

from lora_helpers.core.embeddings import embedding_file_name
from lora_helpers.core.lora_convert import save_kohya
from lora_helpers.core.run_folder import CONFIG_FILE, LOG_FILE, LORA_WEIGHT_NAME, kohya_file_name
from lora_helpers.train import outputs as runs
from lora_helpers.train.config import TrainResult
from lora_helpers.train.memory import GB

__all__ = ["finish_run", "pivotal_files"]


def pivotal_files(session) -> dict:
    """The model card's arguments about the new tokens ({} without pivotal tuning)."""
    pivotal = session.models.pivotal
    return {} if pivotal is None else {"embedding_path": session.run_dir / embedding_file_name(session.cfg.output_name),
                                       "tokens": pivotal.tokens}


def finish_run(session) -> TrainResult:
    """Write the LoRA files, config.json ("finished"), the loss plot and the model card; push to the Hub.

    Args:
        session: the :class:`~lora_helpers.train.session.TrainingSession` whose steps are done.

    Returns:
        The :class:`TrainResult` (on every process; only the main one writes).
    """
    cfg, run_dir, plan, trigger, acc = session.cfg, session.run_dir, session.plan, session.trigger_text, session.accelerator
    acc.wait_for_everyone()
    measured = torch.cuda.max_memory_allocated(session.device) / GB if session.device.type == "cuda" else None
    losses = [r["loss"] for r in session.rows if r.get("loss") is not None]
    final_loss = statistics.fmean(losses[-10:]) if losses else None
    times = [r["s_per_step"] for r in session.rows if r.get("s_per_step")]
    s_per_step = statistics.median(times) if times else None
    if not session.samples:  # resumed at the last step: the grids of the earlier session
        session.samples = sorted((run_dir / "samples").glob("step-*.png"))
    lora_path = run_dir / LORA_WEIGHT_NAME
    kohya_path = run_dir / kohya_file_name(cfg.output_name)
    hub_url = None
    nonfinite, scaler_skips = session.stepper.nonfinite_total, session.stepper.scaler_skips
    if session.main:
        session.save_lora(run_dir, final=True)
        save_kohya(lora_path, kohya_path, output_name=cfg.output_name, trigger=trigger, resolution=cfg.resolution,
                   layers_per_block=session._unwrapped()[0].config.layers_per_block)
        runs.plot_training(session.rows, run_dir / runs.CURVES_FILE)
        setup_peak = session.setup_peak_gb
        extra = {"steps": session.step, "final_loss": final_loss, "nonfinite_steps": nonfinite,
                 "scaler_skipped_steps": scaler_skips, "seconds_per_step": s_per_step,
                 "memory": {"estimate_gb": round(plan.peak_gb, 3), "measured_peak_gb":
                            None if measured is None else round(measured, 3), "budget_gb": cfg.memory_budget_gb,
                            "setup_peak_gb": None if setup_peak is None else round(setup_peak, 3),
                            "plan": plan.to_dict()},
                 "samples": [p.relative_to(run_dir).as_posix() for p in session.samples], **session._resume_facts()}
        if session.models.pivotal is not None:
            extra["pivotal"] = {"tokens": session.models.pivotal.tokens, "freeze_step": session.models.pivotal.freeze_step,
                                "file": embedding_file_name(cfg.output_name)}
        runs.write_run_config(run_dir, config=dataclasses.asdict(cfg), trigger=session.trigger,
                              class_noun=session.class_noun, images=session.images, dataset_dir=session.dataset_dir,
                              status="finished", extra=extra, subjects=session.subjects)
        sample = session.samples[-1] if session.samples else None
        runs.write_model_card(run_dir, config=dataclasses.asdict(cfg), trigger=trigger, n_images=len(session.images),
                              steps=session.step, kohya_path=kohya_path, sample_grid=sample, estimated_gb=plan.peak_gb,
                              measured_gb=measured, seconds_per_step=s_per_step, resumes=session.resumes,
                              subjects=session.subjects, **pivotal_files(session))
        if cfg.hub_repo_id:
            hub_url = runs.push_to_hub(run_dir, cfg.hub_repo_id, private=cfg.hub_private)
    acc.wait_for_everyone()
    return TrainResult(run_dir=run_dir, lora_path=lora_path, kohya_path=kohya_path,
                       config_path=run_dir / CONFIG_FILE, log_path=run_dir / LOG_FILE, steps=session.step,
                       final_loss=final_loss, nonfinite_steps=nonfinite, seconds_per_step=s_per_step,
                       estimated_peak_gb=plan.peak_gb, measured_peak_gb=measured, samples=list(session.samples),
                       validation=list(session.validation), hub_url=hub_url,
                       embedding_path=pivotal_files(session).get("embedding_path"))
