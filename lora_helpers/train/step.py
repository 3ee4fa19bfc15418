"""One optimizer step: batches, noise, the diffusion loss, the backward pass and the update.

Determinism matters for resuming: the batch order, noise and timesteps of a step are
functions of (seed, step) alone, so a resumed run repeats an uninterrupted one exactly.
A non-finite loss skips the step on every process together (or DDP would wait forever);
the counters of skipped steps travel in checkpoints (:meth:`TrainStep.state_dict`).
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import numpy as np
import torch

from lora_helpers.train.config import TrainConfig
from lora_helpers.train.data import batch_plan
from lora_helpers.train.latents import TrainCache
from lora_helpers.train.memory import GB
from lora_helpers.train.models import TrainingModels, encode_live, weight_dtype
from lora_helpers.train.pivotal import freeze_and_cache

__all__ = ["TrainStep"]


def _diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                    snr_weights: torch.Tensor | None, scales: torch.Tensor | None = None) -> torch.Tensor:
    """Mean squared error per image, weighted by the face mask, min-SNR and a per-image scale, averaged."""
    err = (pred.float() - target.float()) ** 2
    if weights is not None:
        # a weighted mean per image keeps the loss scale independent of the face's size
        per_image = (err * weights).sum(dim=(1, 2, 3)) / (weights.sum(dim=(1, 2, 3)) * err.shape[1]).clamp_min(1e-8)
    else:
        per_image = err.mean(dim=(1, 2, 3))
    if snr_weights is not None:
        per_image = per_image * snr_weights
    if scales is not None:
        per_image = per_image * scales
    return per_image.mean()


def _host_peak_gb() -> float:
    try:
        import resource  # POSIX only

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux reports KiB
    except (ImportError, AttributeError):  # pragma: no cover - non-POSIX
        return float("nan")


class _Resident:
    """The encoded training set on the training device, in the dtypes a step feeds the UNet.

    Moved and cast once at the start instead of every step: on a GPU each ``.to(device)`` of a
    CPU tensor is a copy the host waits for. A few MB (latents, masks, one embedding per prompt).
    """

    def __init__(self, cache: TrainCache, device: torch.device, dtype: torch.dtype):
        def move(tensors, to_dtype=None):
            return [None if t is None else t.to(device, to_dtype or t.dtype) for t in tensors]

        self.latents, self.weights = move(cache.latents), move(cache.weights)
        self.time_ids, self.class_latents = move(cache.time_ids, dtype), move(cache.class_latents)
        self.class_time_ids = move(cache.class_time_ids, dtype)
        self.prompt_embeds = None if cache.prompt_embeds is None else cache.prompt_embeds.to(device, dtype)
        self.pooled_embeds = None if cache.pooled_embeds is None else cache.pooled_embeds.to(device, dtype)


class TrainStep:
    """Runs optimizer steps over ``gradient_accumulation_steps`` micro-batches each.

    Args:
        cfg: the resolved config.
        accelerator: the run's ``accelerate.Accelerator``.
        models: from :func:`lora_helpers.train.models.build_models`.
        cache: the encoded training set.
        sample_weights: a loss scale per cached image (its resize quality), or None for 1.
        subjects: the person of each cached image (several people: batches balanced across them), or None.
        prior_prompts: the class prompt of each cached image (prior preservation), or None.

    Attributes:
        nonfinite_total, nonfinite_in_a_row: steps skipped for a NaN/inf loss.
        scaler_skips: steps the fp16 GradScaler skipped (overflowing gradients).
        epoch: the epoch of the last batch drawn.
    """

    def __init__(self, cfg: TrainConfig, accelerator, models: TrainingModels, cache: TrainCache,
                 sample_weights: list[float] | None = None, subjects: list[str | None] | None = None,
                 prior_prompts: list[str] | None = None):
        self.cfg, self.accelerator, self.models, self.cache = cfg, accelerator, models, cache
        self.sample_weights, self.subjects, self.prior_prompts = sample_weights, subjects, prior_prompts
        self.device, self.dtype = accelerator.device, weight_dtype(cfg.mixed_precision)
        self.nonfinite_total = self.nonfinite_in_a_row = self.scaler_skips = 0
        self.epoch = 0
        self._epochs: dict[int, list[list[int]]] = {}
        self._resident = _Resident(cache, self.device, self.dtype)
        self._snr: torch.Tensor | None = None  # min-SNR weight of every timestep, computed once

    def state_dict(self) -> dict:
        """The counters a checkpoint keeps."""
        return {"nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                "scaler_skips": self.scaler_skips}

    def load_state_dict(self, state: dict) -> None:
        """Restore the counters from a checkpoint's training state."""
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.scaler_skips = int(state.get("scaler_skips", 0))

    # ------------------------------------------------------------------ what a step sees

    def _batch_indices(self, micro: int) -> list[int]:
        acc = self.accelerator
        index = micro * acc.num_processes + acc.process_index
        if not self._epochs:
            self._epochs[0] = batch_plan(self.cache.sizes, self.cfg.train_batch_size, seed=self.cfg.seed, epoch=0,
                                         subjects=self.subjects)
        per_epoch = len(self._epochs[0])
        epoch, pos = divmod(index, per_epoch)
        if epoch not in self._epochs:
            self._epochs = {0: self._epochs[0], epoch: batch_plan(self.cache.sizes, self.cfg.train_batch_size,
                                                                  seed=self.cfg.seed, epoch=epoch,
                                                                  subjects=self.subjects)}
        self.epoch = epoch
        return self._epochs[epoch][pos]

    def _class_indices(self, micro: int, idx: list[int]) -> list[int]:
        """A class image for each instance image: from its own class's images when people of several
        classes train together, each class drawn in its own seeded order."""
        n, ids = len(idx), self.cache.class_prompt_ids
        pools: dict[int | None, list[int]] = {None: list(range(len(self.cache.class_latents)))}
        if self.prior_prompts is not None and len(set(ids)) > 1:
            pools = {c: [i for i, p in enumerate(ids) if p == c] for c in dict.fromkeys(ids)}
        out = []
        for j, image in enumerate(idx):
            key = None if None in pools else self.cache.prompt_index(self.prior_prompts[image])
            pool = pools[key]
            k = (micro * self.accelerator.num_processes + self.accelerator.process_index) * n + j
            cycle, pos = divmod(k, len(pool))
            seed = [self.cfg.seed, 7, cycle] if key is None else [self.cfg.seed, 7, key, cycle]
            out.append(pool[int(np.random.default_rng(seed).permutation(len(pool))[pos])])
        return out

    def _noise(self, shape: tuple, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps from one generator per sample, keyed by (seed, key): reproducible anywhere."""
        noises, steps = [], []
        n_train = self.models.noise_scheduler.config.num_train_timesteps
        for key in keys:
            g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + key) % (2**63))
            noise = torch.randn(shape, generator=g)
            if self.cfg.noise_offset:
                noise = noise + self.cfg.noise_offset * torch.randn((shape[0], 1, 1), generator=g)
            noises.append(noise)
            steps.append(torch.randint(0, n_train, (1,), generator=g))
        return torch.stack(noises).to(self.device), torch.cat(steps).to(self.device)

    def _instance_batch(self, micro: int):
        idx = self._batch_indices(micro)
        c, r = self.cache, self._resident
        latents = torch.stack([r.latents[i] for i in idx])
        time_ids = torch.stack([r.time_ids[i] for i in idx])
        weights = None
        if any(r.weights[i] is not None for i in idx):
            weights = torch.stack([r.weights[i] if r.weights[i] is not None else torch.ones_like(latents[0, :1])
                                   for i in idx])
        # fixed_noise: the same noise and timestep for an image at every step (over-fitting check)
        keys = list(idx) if self.cfg.fixed_noise else [(micro * self.accelerator.num_processes
                                                        + self.accelerator.process_index) * 1024 + j
                                                       for j in range(len(idx))]
        scales = (None if self.sample_weights is None
                  else torch.tensor([self.sample_weights[i] for i in idx], device=self.device))
        return latents, time_ids, [c.prompt_ids[i] for i in idx], weights, keys, scales

    # ------------------------------------------------------------------ the loss

    def _embeds(self, prompt_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.models.text_encoders[0] is None:
            ids = list(prompt_ids)
            return self._resident.prompt_embeds[ids], self._resident.pooled_embeds[ids]
        prompts = [self.cache.prompts[i] for i in prompt_ids]
        return encode_live(self.models.text_encoders, self.models.tokenizers, prompts, self.device)

    def _loss(self, latents: torch.Tensor, time_ids: torch.Tensor, prompt_ids: list[int],
              weights: torch.Tensor | None, keys: list[int], scales: torch.Tensor | None = None) -> torch.Tensor:
        scheduler = self.models.noise_scheduler
        latents = latents.to(self.device)
        noise, timesteps = self._noise(tuple(latents.shape[1:]), keys)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        prediction_type = scheduler.config.prediction_type
        target = noise if prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, timesteps)
        embeds, pooled = self._embeds(prompt_ids)
        with self.accelerator.autocast():
            pred = self.models.unet(noisy.to(self.dtype), timesteps, encoder_hidden_states=embeds.to(self.dtype),
                                    added_cond_kwargs={"text_embeds": pooled.to(self.dtype),
                                                       "time_ids": time_ids.to(self.device, self.dtype)}).sample
        snr_weights = None
        if self.cfg.snr_gamma:
            snr = self._snr_of(timesteps)
            snr_weights = torch.clamp(snr, max=self.cfg.snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        return _diffusion_loss(pred, target, weights, snr_weights, scales)

    def _snr_of(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of each timestep, looked up in a table made once (the same values as
        diffusers' ``compute_snr``, which recomputes and copies the whole schedule every call)."""
        if self._snr is None:
            from diffusers.training_utils import compute_snr  # diffusers costs seconds to import (loaded by now)

            scheduler = self.models.noise_scheduler
            every = torch.arange(scheduler.config.num_train_timesteps, device=timesteps.device)
            self._snr = compute_snr(scheduler, every)
        return self._snr[timesteps]

    def _agree_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.accelerator.num_processes > 1:  # every process must skip together, or DDP waits forever
            finite = self.accelerator.gather(finite).min().reshape(1)
        return bool(finite.item() > 0)

    def _mean_over_processes(self, parts: dict[str, float]) -> tuple[dict[str, float], list[float]]:
        """The loss parts averaged over processes, and each process's total loss (for the log)."""
        names = sorted(parts)
        local = torch.tensor([parts[n] for n in names], dtype=torch.float64, device=self.device)
        every = self.accelerator.gather(local[None]).reshape(self.accelerator.num_processes, len(names)).cpu()
        weights = torch.tensor([self.cfg.prior_loss_weight if n == "prior_loss" else 1.0 for n in names],
                               dtype=torch.float64)
        return {n: float(every[:, i].mean()) for i, n in enumerate(names)}, [float(x) for x in every @ weights]

    def freeze_pivotal(self) -> None:
        """Stop training the new tokens; encode the captions once with them and free the text encoders."""
        models = self.models
        freeze_and_cache(models.pivotal, self.cache, models.text_encoders, models.tokenizers, encode=encode_live,
                         device=self.device, keep_encoders=self.cfg.train_text_encoder)
        if not self.cfg.train_text_encoder:
            models.text_encoders = (None, None)
        self._resident = _Resident(self.cache, self.device, self.dtype)  # the captions' new embeddings

    # ------------------------------------------------------------------ one step

    def __call__(self, step: int) -> dict:
        """Optimizer step ``step + 1`` (``step`` steps are done).

        Returns:
            Its log.jsonl row: step, epoch, lr, loss (None when skipped), grad_norm, skipped,
            s_per_step, counters, and GPU (or host) memory.
        """
        cfg, acc, models = self.cfg, self.accelerator, self.models
        accum = cfg.gradient_accumulation_steps
        pivotal = models.pivotal
        if pivotal is not None and not pivotal.frozen and step >= pivotal.freeze_step:
            self.freeze_pivotal()
        start = time.perf_counter()
        parts: dict[str, float] = {"instance_loss": 0.0}
        finite = True
        for k in range(accum):
            micro = step * accum + k
            latents, time_ids, prompt_ids, weights, keys, scales = self._instance_batch(micro)
            backwards = [("instance_loss", 1.0, lambda: self._loss(latents, time_ids, prompt_ids, weights, keys, scales))]
            if cfg.with_prior_preservation and self.cache.class_latents:
                ci = self._class_indices(micro, self._batch_indices(micro))
                c_lat = torch.stack([self._resident.class_latents[i] for i in ci])
                c_ids = torch.stack([self._resident.class_time_ids[i] for i in ci])
                c_prompt = [self.cache.class_prompt_ids[i] for i in ci]
                c_keys = [10**9 + key for key in keys]
                # its own forward/backward: the activation peak stays that of one batch
                backwards.append(("prior_loss", cfg.prior_loss_weight,
                                  lambda: self._loss(c_lat, c_ids, c_prompt, None, c_keys)))
            for j, (name, weight, compute) in enumerate(backwards):
                loss = compute()
                if not self._agree_finite(loss):
                    finite = False
                    break
                last = k == accum - 1 and j == len(backwards) - 1
                sync = contextlib.nullcontext() if last or acc.num_processes == 1 else acc.no_sync(models.unet)
                with sync:
                    acc.backward(loss * weight / accum)
                parts[name] = parts.get(name, 0.0) + float(loss.detach()) / accum
            if not finite:
                break
        row: dict[str, Any] = {"step": step + 1, "epoch": self.epoch, "lr": models.lr_scheduler.get_last_lr()[0]}
        if finite:
            if pivotal is not None and not pivotal.frozen and acc.num_processes > 1:
                for p in pivotal.params:  # not under DDP (see build_models): average by hand
                    p.grad = acc.reduce(p.grad if p.grad is not None else torch.zeros_like(p), reduction="mean")
            grad_norm = float(acc.clip_grad_norm_(models.params, cfg.max_grad_norm))
            models.optimizer.step()
            if acc.optimizer_step_was_skipped:  # fp16 overflow in the gradients: the scaler lowers its scale
                self.scaler_skips += 1
            self.nonfinite_in_a_row = 0
            if acc.num_processes > 1:  # each process saw its own batch: the step's loss is their mean
                parts, row["process_losses"] = self._mean_over_processes(parts)
            loss_value = parts["instance_loss"] + cfg.prior_loss_weight * parts.get("prior_loss", 0.0)
            row.update(loss=loss_value, grad_norm=grad_norm if math.isfinite(grad_norm) else None, skipped=False,
                       **({k: v for k, v in parts.items()} if "prior_loss" in parts else {}))
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            row.update(loss=None, grad_norm=None, skipped=True)
        models.optimizer.zero_grad(set_to_none=True)
        models.lr_scheduler.step()
        seconds = time.perf_counter() - start
        row.update(s_per_step=round(seconds, 4), nonfinite_total=self.nonfinite_total, scaler_skips=self.scaler_skips)
        if self.device.type == "cuda":
            row.update(gpu_mem_gb=round(torch.cuda.memory_allocated(self.device) / GB, 3),
                       gpu_peak_gb=round(torch.cuda.max_memory_allocated(self.device) / GB, 3))
        else:
            row["host_peak_gb"] = round(_host_peak_gb(), 3)
        return row
