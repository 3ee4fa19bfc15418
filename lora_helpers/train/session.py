"""One training run's state and the work around its steps: set-up, resuming, checkpoints
and validation images (the files of a finished run: :mod:`lora_helpers.train.finish`).

:func:`lora_helpers.train.loop.run_training` drives it; one optimizer step is
:class:`lora_helpers.train.step.TrainStep`. Nothing here prints progress: that is the
listeners' job (:mod:`lora_helpers.train.events`).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from pathlib import Path

import torch

from lora_helpers.core.embeddings import EmbeddingFileError, embedding_file_name, read_embeddings, save_embeddings
from lora_helpers.core.fileio import write_jsonl
from lora_helpers.core.lora_files import load_lora_into_models, save_lora
from lora_helpers.core.run_folder import LOG_FILE, LORA_WEIGHT_NAME, read_log
from lora_helpers.train import checkpoints as ckpt
from lora_helpers.train import outputs as runs
from lora_helpers.train import validation as samples
from lora_helpers.train.config import TrainConfig, TrainingDivergedError, TrainingOutOfMemoryError, auto_steps
from lora_helpers.train.data import (common_class_noun, loss_weights, read_subjects, read_training_images,
                                     subject_prompts)
from lora_helpers.train.events import TrainStart
from lora_helpers.train.latents import TrainCache, build_cache
from lora_helpers.train.memory import GB, MemoryPlan
from lora_helpers.train.models import TrainingModels, build_models, encode_live, weight_dtype
from lora_helpers.train.priors import class_image_sets, class_prompt_of, prior_prompts
from lora_helpers.train.pivotal import encoders_off_gpu, live_prompt_kwargs, pivotal_identifiers, save_person_embeddings
from lora_helpers.train.processes import gather_rng_states
from lora_helpers.train.resume import apply_learning_rates, check_resume, dataset_fingerprint
from lora_helpers.train.step import TrainStep

__all__ = ["TrainingSession"]


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class TrainingSession:
    """State of one training run (config, cache, models, counters, log rows) and its work.

    Args:
        dataset_dir, run_dir: the dataset and the run folder.
        cfg: the resolved config (``max_train_steps`` may still be None: set from the images).
        accelerator: the run's ``accelerate.Accelerator``.
        plan: the memory plan (recorded in config.json and the model card).
        trigger, class_noun: the person's trigger phrase and class ("person"); several people: :attr:`subjects`.
    """

    def __init__(self, dataset_dir: Path, run_dir: Path, *, cfg: TrainConfig, accelerator, plan: MemoryPlan,
                 trigger: str, class_noun: str | None):
        self.dataset_dir, self.run_dir, self.cfg = dataset_dir, run_dir, cfg
        self.accelerator, self.plan, self.trigger, self.class_noun = accelerator, plan, trigger, class_noun
        self.device = accelerator.device
        self.dtype = weight_dtype(cfg.mixed_precision)
        self.main = accelerator.is_main_process
        self.rows: list[dict] = []
        self.step = 0
        self.samples: list[Path] = []
        self.validation: list[dict] = []
        self.resumed_from: Path | None = None
        self.resumes: list[dict] = []  # this run's line of resumes, each with the settings it changed
        self.dataset: list[dict] = []
        self.subjects: dict[str, dict] = {}  # several people: slug -> {"trigger", "class_noun", "images"}
        # False until set-up has read the log of a resumed run: a failure before that must not
        # overwrite log.jsonl with an empty list
        self._log_ready = False
        self.setup_peak_gb: float | None = None
        self.models: TrainingModels | None = None
        self.stepper: TrainStep | None = None
        self._vae = None

    # ------------------------------------------------------------------ setup

    def setup(self, start_from: Path | None, *, accept_changes: bool = False) -> None:
        """Read the data, check a resume against its checkpoint, encode, write config.json ("training"),
        load the models, and resume from ``start_from``.

        Args:
            start_from: a checkpoint folder (already checked readable), or None.
            accept_changes: resume even though settings or data differ from the checkpoint's.

        Raises:
            ResumeSettingsError: the checkpoint was trained with other settings or data (before anything is encoded).
        """
        self.read_data()
        if start_from is not None:
            state = ckpt.read_training_state(start_from)
            record = check_resume(start_from, state, self.cfg, self.dataset, run_dir=self.run_dir,
                                  accept_changes=accept_changes, processes=self.accelerator.num_processes)
            self.resumes = [*state.get("resumes", []), record]
        self.prepare_data()
        cfg = self.cfg
        if self.main:
            runs.write_run_config(self.run_dir, config=dataclasses.asdict(cfg), trigger=self.trigger,
                                  class_noun=self.class_noun, images=self.images, dataset_dir=self.dataset_dir,
                                  status="training", subjects=self.subjects,
                                  extra={"memory": {"estimate_gb": round(self.plan.peak_gb, 3), "plan": self.plan.to_dict()},
                                         **self._resume_facts()})
        self.models = build_models(cfg, self.accelerator, class_noun=self.class_noun or "person", n_tokens=self.pivotal_count)
        weights = loss_weights(self.images, by_resize_quality=cfg.weight_by_resize_quality)
        self.stepper = TrainStep(cfg, self.accelerator, self.models, self.cache, sample_weights=weights,  # balanced:
                                 subjects=[im.subject for im in self.images] if self.subjects else None,
                                 prior_prompts=self.prior_prompts if cfg.with_prior_preservation else None)
        if start_from is not None:
            self.resume(start_from)
        self._log_ready = True
        if self.device.type == "cuda":  # encoding and loading are done: measure the training itself from here
            self.setup_peak_gb = torch.cuda.max_memory_allocated(self.device) / GB
            torch.cuda.reset_peak_memory_stats(self.device)

    def read_data(self) -> None:
        """Read the images and their fingerprint, and fill in the steps, warm-up and class prompt."""
        cfg = self.cfg
        self.images = read_training_images(self.dataset_dir, instance_prompt=cfg.instance_prompt,
                                           use_captions=cfg.use_captions, min_resize_quality=cfg.min_resize_quality)
        self.subjects = read_subjects(self.dataset_dir, self.images, trigger=cfg.trigger,
                                      pivotal_tokens=cfg.pivotal_tokens)
        if self.subjects:  # config.json keeps a top-level trigger for one person only
            self.trigger = None
            self.class_noun = common_class_noun(self.subjects)  # None: several classes, a prior each
        self.pivotal_count = cfg.pivotal_tokens
        if cfg.pivotal_tokens:  # the identifier becomes new tokens in every caption and trigger (each person's own)
            self.images, self.trigger, self.subjects, self.pivotal_count = pivotal_identifiers(
                self.images, self.trigger, self.subjects, cfg.pivotal_tokens)
        self.dataset = dataset_fingerprint(runs.dataset_hashes(self.images))
        steps = cfg.max_train_steps or auto_steps(len(self.images), cfg)
        warmup = cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else round(0.05 * steps)
        class_prompt = cfg.class_prompt or (class_prompt_of(self.class_noun) if cfg.with_prior_preservation
                                            and (self.class_noun or not self.subjects) else None)
        self.prior_prompts = prior_prompts(self.images, self.subjects, class_prompt)
        self.cfg = dataclasses.replace(cfg, max_train_steps=steps, lr_warmup_steps=warmup, class_prompt=class_prompt)
        self.validation_prompts = subject_prompts(self.cfg.validation_prompts, self.trigger, self.subjects)

    @property
    def trigger_text(self) -> str:
        """The trigger phrase, or every person's joined by ", " (for file metadata and logs)."""
        return self.trigger or ", ".join(s["trigger"] for s in self.subjects.values())

    def prepare_data(self) -> None:
        """Make the class images (prior preservation) and encode (or reuse) the cache."""
        cfg = self.cfg
        class_images, class_prompts = self._class_images() if cfg.with_prior_preservation else ([], [])
        vae_dtype = self.dtype if (cfg.vae and self.dtype == torch.float16) else torch.float32
        with self.accelerator.main_process_first():  # one process encodes, the others reuse its cache
            self.cache: TrainCache = build_cache(
                self.run_dir / "cache", model=cfg.model, images=self.images, resolution=cfg.resolution,
                device=self.device, vae=cfg.vae, vae_dtype=vae_dtype, text_dtype=self.dtype,
                extra_prompts=self.validation_prompts + [cfg.validation_negative_prompt or ""],
                class_images=class_images, class_prompt=cfg.class_prompt, class_prompts=class_prompts,
                use_masks=cfg.use_masks,
                background_weight=cfg.background_weight, encode_text=not (cfg.train_text_encoder or cfg.pivotal_tokens),
                progress=cfg.progress and self.main)

    def _class_images(self) -> tuple[list[Path], list[str]]:
        cfg = self.cfg
        generate = functools.partial(samples.generate_class_images, cfg.model, resolution=cfg.resolution,
                                     steps=cfg.class_inference_steps, seed=cfg.seed, vae=cfg.vae, device=self.device,
                                     dtype=self.dtype, progress=cfg.progress)
        folder = Path(cfg.class_data_dir) if cfg.class_data_dir else self.run_dir / "class_images"
        return class_image_sets(folder, self.prior_prompts, count=cfg.num_class_images, generate=generate,
                                accelerator=self.accelerator)

    def resume(self, folder: Path) -> None:
        """Load the LoRA, optimizer, scheduler, scaler, counters, RNG and log rows of a checkpoint."""
        models = self.models
        unet, te1, te2 = self._unwrapped(lora_only=True)
        load_lora_into_models(folder / LORA_WEIGHT_NAME, unet=unet, text_encoder=te1, text_encoder_2=te2)
        if models.pivotal is not None:
            path = folder / embedding_file_name(self.cfg.output_name)
            if not path.is_file():
                raise EmbeddingFileError(path, "missing: this checkpoint has no embeddings of the new tokens; "
                                               "resume from another checkpoint or start again")
            models.pivotal.load(read_embeddings(path))
        opt_state, state, rng = ckpt.load_training_state(folder, process_index=self.accelerator.process_index)
        models.optimizer.load_state_dict(opt_state)
        models.lr_scheduler.load_state_dict(state["scheduler"])
        changed = self.resumes[-1]["changed"] if self.resumes else {}
        if "learning_rate" in changed or "text_encoder_lr" in changed:  # accepted: the new rate must be the one used
            apply_learning_rates(models.optimizer, models.lr_scheduler, self.cfg)
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.stepper.load_state_dict(state)
        if rng is not None:
            ckpt.set_rng_state(rng)
        self.rows = [r for r in read_log(self.run_dir) if int(r.get("step", 0)) <= self.step]
        self.resumed_from = folder

    def _resume_facts(self) -> dict:
        """``{"resumes": [...]}`` for config.json when this run continues a checkpoint, else {}."""
        return {"resumes": self.resumes} if self.resumes else {}

    def start_info(self) -> TrainStart:
        """What listeners learn in ``on_train_start``."""
        return TrainStart(run_dir=self.run_dir, config=self.cfg, plan=self.plan, start_step=self.step,
                          resumed_from=self.resumed_from, n_images=len(self.images),
                          validation_prompts=tuple(self.validation_prompts))

    # ------------------------------------------------------------------ steps and failures

    def train_step(self) -> dict:
        """One optimizer step; returns its log row (also kept in :attr:`rows`)."""
        row = self.stepper(self.step)
        self.step += 1
        self.rows.append(row)
        return row

    def diverged(self) -> bool:
        """The loss was NaN/inf for ``max_nonfinite_in_a_row`` steps in a row."""
        return self.stepper.nonfinite_in_a_row >= self.cfg.max_nonfinite_in_a_row

    def diverged_error(self) -> TrainingDivergedError:
        """The error that ends a diverged run, with what to change."""
        cfg, last = self.cfg, ckpt.list_checkpoints(self.run_dir)
        return TrainingDivergedError(
            f"the loss was NaN/inf for {self.stepper.nonfinite_in_a_row} steps in a row (step {self.step}, "
            f"{self.stepper.nonfinite_total} in all). Lower the learning rate (now {cfg.learning_rate:g}; try "
            f"{cfg.learning_rate / 2:g}), keep max_grad_norm, and encode with the fp32 VAE or the fp16-fix "
            "VAE (madebyollin/sdxl-vae-fp16-fix)"
            + (f"; resume from {last[-1].name} with resume='latest'" if last else ""))

    def explain_failure(self, exc: BaseException) -> BaseException | None:
        """The error to raise instead of ``exc`` (out of memory: what to change), or None to re-raise ``exc``.

        An interruption (a Colab disconnect, a stop button) prints where to resume from.
        """
        cfg, last = self.cfg, ckpt.list_checkpoints(self.run_dir)
        if isinstance(exc, KeyboardInterrupt) and self.main:
            print(f"interrupted at step {self.step}; " + (f"resume from {last[-1].name} with resume='latest'"
                                                           if last else "no checkpoint yet"))
        if isinstance(exc, Exception) and (reason := ckpt.write_failure(exc, self.run_dir)):
            # a full disk while writing the log or the final files: say so, and what survived
            kept = last[-1].name if last else "none yet"
            return ckpt.RunWriteError(f"could not write into {self.run_dir} at step {self.step}: {reason}. The "
                                      f"newest checkpoint is intact ({kept}); free some space and resume with "
                                      "--resume latest (resume='latest')")
        if isinstance(exc, Exception) and _is_oom(exc):
            return TrainingOutOfMemoryError(
                f"out of memory at step {self.step + 1} (planned peak {self.plan.peak_gb:.2f} GB"
                + (f", budget {cfg.memory_budget_gb:g} GB" if cfg.memory_budget_gb else "") + "). "
                "Lower the resolution (768), keep batch 1 with gradient accumulation, lower lora_rank, turn on "
                "gradient_checkpointing, or use unet_8bit=True"
                + (f"; then resume from {last[-1].name} (resume='latest')" if last else ""))
        return None

    # ------------------------------------------------------------------ saving and validation

    def _unwrapped(self, *, lora_only: bool = False):
        """The UNet and text encoders without accelerate's wrappers (``lora_only``: encoders only if they have a LoRA)."""
        unwrap = self.accelerator.unwrap_model
        te1, te2 = (unwrap(t) if t is not None and (self.cfg.train_text_encoder or not lora_only) else None
                    for t in self.models.text_encoders)
        return unwrap(self.models.unet), te1, te2

    def save_lora(self, folder: Path, *, final: bool = False) -> Path:
        """Write the LoRA (diffusers format) into ``folder`` and the new tokens' embeddings beside it (pivotal
        tuning); ``final``: with several people, also one embedding file each (``embeddings/<name>.safetensors``)."""
        unet, te1, te2 = self._unwrapped(lora_only=True)
        path = save_lora(folder, unet=unet, text_encoder=te1, text_encoder_2=te2)
        if self.models.pivotal is not None:
            save_embeddings(Path(folder) / embedding_file_name(self.cfg.output_name), self.models.pivotal.export(),
                            trigger=self.trigger_text)
            save_person_embeddings(Path(folder), self.models.pivotal.export(), self.subjects if final else {})
        return path

    def checkpoint(self, loss: float | None) -> Path:
        """Write ``checkpoints/checkpoint-<step>`` (the main process), prune old ones, flush the log.

        Returns:
            The checkpoint folder.
        """
        acc, models = self.accelerator, self.models
        scaler = acc.scaler
        state = {"step": self.step, "scheduler": models.lr_scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 **self.stepper.state_dict(), "config": dataclasses.asdict(self.cfg), "dataset": self.dataset,
                 "resumes": self.resumes, "processes": acc.num_processes}
        summary = {"step": self.step, "loss": loss, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "trigger": self.trigger_text}
        rng_states = gather_rng_states(acc, ckpt.rng_state())  # the main process writes every process's
        acc.wait_for_everyone()
        folder = ckpt.save_checkpoint(self.run_dir, self.step, write_lora=self.save_lora,
                                      optimizer_state=models.optimizer.state_dict() if self.main else {},
                                      training_state=state, summary=summary, is_main_process=self.main,
                                      rng_states=rng_states)
        acc.wait_for_everyone()
        if self.main:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.checkpoints_total_limit)
        self.flush_log()
        return folder

    def flush_log(self, *, failing: bool = False) -> None:
        """Rewrite ``log.jsonl`` with every row so far (main process).

        Args:
            failing: the run is ending with an error: a log that cannot be written (the disk is
                full) must not hide that error; the file on disk stays as last written.
        """
        if self.main and self._log_ready:
            try:
                write_jsonl(self.run_dir / LOG_FILE, self.rows)
            except OSError:
                if not failing:
                    raise

    def validate(self) -> tuple[list, Path, dict]:
        """Images for the validation prompts and seeds, saved as a grid.

        Returns:
            ``(images, grid_path, record)``: PIL images (prompts x seeds, row-major), the grid
            file, and ``{"step", "samples"}`` for the log (listeners may add to it).
        """
        cfg = self.cfg
        if self._vae is None:
            self._vae = samples.load_validation_vae(cfg.model, cfg.vae, dtype=self.dtype, device=self.device,
                                                    resolution=cfg.resolution)
        unet, te1, te2 = self._unwrapped(lora_only=True)
        jobs = [(self._prompt_kwargs(p), seed) for p in self.validation_prompts for seed in cfg.validation_seeds]
        with encoders_off_gpu([] if cfg.train_text_encoder else self.models.text_encoders, self.device):
            images = samples.render_validation(
                jobs, unet=unet, vae=self._vae, model=cfg.model, device=self.device, text_encoders=(te1, te2),
                tokenizers=self.models.tokenizers, steps=cfg.validation_inference_steps,
                guidance=cfg.validation_guidance_scale, resolution=cfg.resolution)
        params = {"step": self.step, "trigger": self.trigger_text, "steps": cfg.validation_inference_steps,
                  "guidance": cfg.validation_guidance_scale, "base_model": cfg.model}
        grid_path = samples.save_validation(self.run_dir, self.step, images, self.validation_prompts,
                                            cfg.validation_seeds, params)
        self.samples.append(grid_path)
        return images, grid_path, {"step": self.step, "samples": grid_path.relative_to(self.run_dir).as_posix()}

    def _prompt_kwargs(self, prompt: str) -> dict:
        cfg = self.cfg
        if cfg.train_text_encoder:  # the pipeline encodes with the encoders' LoRA
            return {"prompt": prompt, "negative_prompt": cfg.validation_negative_prompt}
        if self.models.text_encoders[0] is not None:  # new tokens still training: encode with them now
            return live_prompt_kwargs(self.models.text_encoders, self.models.tokenizers, prompt,
                                      cfg.validation_negative_prompt, encode=encode_live, device=self.device,
                                      dtype=self.dtype)
        pe, pooled = self.cache.embeds([self.cache.prompt_index(prompt)])
        kwargs = {"prompt_embeds": pe.to(self.device, self.dtype), "pooled_prompt_embeds": pooled.to(self.device, self.dtype)}
        if cfg.validation_negative_prompt:
            ne, npooled = self.cache.embeds([self.cache.prompt_index(cfg.validation_negative_prompt)])
            kwargs.update(negative_prompt_embeds=ne.to(self.device, self.dtype),
                          negative_pooled_prompt_embeds=npooled.to(self.device, self.dtype))
        return kwargs
