"""The training loop behind :func:`lora_helpers.train.stage.train`.

Kept apart from the configuration so each file stays readable: here are the models,
one optimizer step, checkpoints, validation images and the files of a finished run.
Determinism matters for resuming: the batch order, noise and timesteps of a step are
functions of (seed, step) alone, so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from lora_helpers.train import checkpoints as ckpt
from lora_helpers.train import outputs as runs
from lora_helpers.core.fileio import write_jsonl
from lora_helpers.train.config import TrainingDivergedError, TrainingOutOfMemoryError, TrainResult, auto_steps
from lora_helpers.train.data import batch_plan
from lora_helpers.train.latents import TrainCache
from lora_helpers.core.lora_files import LORA_WEIGHT_NAME
from lora_helpers.train.memory import GB

__all__ = ["run_training"]

_TEXT_ENCODER_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _weight_dtype(mixed_precision: str) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision, torch.float32)


def _diffusion_loss(pred: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None,
                    snr_weights: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error per image, weighted by the face mask and min-SNR, averaged over the batch."""
    err = (pred.float() - target.float()) ** 2
    if weights is not None:
        # a weighted mean per image keeps the loss scale independent of the face's size
        per_image = (err * weights).sum(dim=(1, 2, 3)) / (weights.sum(dim=(1, 2, 3)) * err.shape[1]).clamp_min(1e-8)
    else:
        per_image = err.mean(dim=(1, 2, 3))
    if snr_weights is not None:
        per_image = per_image * snr_weights
    return per_image.mean()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


class _Run:
    """State of one training run (models, optimizer, counters) and its steps."""

    def __init__(self, dataset_dir: Path, run_dir: Path, *, cfg, accelerator, plan, trigger: str,
                 class_noun: str | None, validation_hook: Callable | None):
        self.dataset_dir, self.run_dir, self.cfg = dataset_dir, run_dir, cfg
        self.accelerator, self.plan, self.trigger, self.class_noun = accelerator, plan, trigger, class_noun
        self.hook = validation_hook
        self.device = accelerator.device
        self.dtype = _weight_dtype(cfg.mixed_precision)
        self.main = accelerator.is_main_process
        self.rows: list[dict] = []
        self.step = 0
        self.nonfinite_total = self.nonfinite_in_a_row = self.scaler_skips = 0
        self.samples: list[Path] = []
        self.validation: list[dict] = []
        self.text_encoders: tuple = (None, None)
        self.tokenizers: tuple = (None, None)
        self._vae = None
        self._epochs: dict[int, list[list[int]]] = {}

    # ------------------------------------------------------------------ setup

    def prepare_data(self) -> None:
        from lora_helpers.train.data import read_training_images
        from lora_helpers.train.latents import build_cache

        cfg = self.cfg
        self.images = read_training_images(self.dataset_dir, instance_prompt=cfg.instance_prompt,
                                           use_captions=cfg.use_captions)
        steps = cfg.max_train_steps or auto_steps(len(self.images), cfg)
        warmup = cfg.lr_warmup_steps if cfg.lr_warmup_steps is not None else round(0.05 * steps)
        class_prompt = cfg.class_prompt or (f"a photo of a {self.class_noun or 'person'}"
                                            if cfg.with_prior_preservation else None)
        self.cfg = cfg = dataclasses.replace(cfg, max_train_steps=steps, lr_warmup_steps=warmup, class_prompt=class_prompt)
        self.validation_prompts = [p.replace("{subject}", self.trigger) for p in cfg.validation_prompts]
        class_images = self._class_images() if cfg.with_prior_preservation else []
        vae_dtype = self.dtype if (cfg.vae and self.dtype == torch.float16) else torch.float32
        with self.accelerator.main_process_first():  # one process encodes, the others reuse its cache
            self.cache: TrainCache = build_cache(
                self.run_dir / "cache", model=cfg.model, images=self.images, resolution=cfg.resolution,
                device=self.device, vae=cfg.vae, vae_dtype=vae_dtype, text_dtype=self.dtype,
                extra_prompts=self.validation_prompts + [cfg.validation_negative_prompt or ""],
                class_images=class_images, class_prompt=class_prompt, use_masks=cfg.use_masks,
                background_weight=cfg.background_weight, encode_text=not cfg.train_text_encoder,
                progress=cfg.progress and self.main)

    def _class_images(self) -> list[Path]:
        from lora_helpers.core.images import list_images

        cfg = self.cfg
        folder = Path(cfg.class_data_dir) if cfg.class_data_dir else self.run_dir / "class_images"
        have = list_images(folder) if folder.is_dir() else []
        if len(have) < cfg.num_class_images:
            with self.accelerator.main_process_first():
                if self.main:
                    from lora_helpers.train.validation import generate_class_images

                    generate_class_images(cfg.model, folder, prompt=cfg.class_prompt, start=len(have),
                                          count=cfg.num_class_images - len(have), resolution=cfg.resolution,
                                          steps=cfg.class_inference_steps, seed=cfg.seed, vae=cfg.vae,
                                          device=self.device, dtype=self.dtype, progress=cfg.progress)
            have = list_images(folder)
        return have[: cfg.num_class_images]

    def build_models(self) -> None:
        from diffusers import DDPMScheduler, UNet2DConditionModel
        from diffusers.models.attention_processor import AttnProcessor2_0
        from diffusers.optimization import get_scheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        from lora_helpers.train.latents import load_component

        cfg, device, dtype = self.cfg, self.device, self.dtype
        torch.manual_seed(cfg.seed)  # the LoRA's initial weights are a function of the seed
        if cfg.unet_8bit:
            unet = _load_unet_8bit(cfg.model, device)
        else:
            unet = load_component(UNet2DConditionModel, cfg.model, subfolder="unet", dtype=dtype).to(device)
        unet.requires_grad_(False)
        unet.set_attn_processor(AttnProcessor2_0())  # PyTorch SDPA: no attention matrix in memory
        unet.add_adapter(LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                    init_lora_weights="gaussian", target_modules=list(cfg.target_modules)))
        models = [unet]
        if cfg.train_text_encoder:
            models += self._load_text_encoders()
        # LoRA weights in fp32 under an fp16 UNet: fp16 gradients cannot be unscaled by the GradScaler
        cast_training_params(models, dtype=torch.float32)
        if cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
            for te in models[1:]:
                # transformers 5 renamed it; older versions only have the first name
                (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()
        groups = [{"params": [p for p in unet.parameters() if p.requires_grad], "lr": cfg.learning_rate}]
        for te in models[1:]:
            groups.append({"params": [p for p in te.parameters() if p.requires_grad], "lr": cfg.text_encoder_lr})
        self.params = [p for g in groups for p in g["params"]]
        optimizer = _make_optimizer(cfg, groups)
        self.lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                          num_training_steps=cfg.max_train_steps)
        self.noise_scheduler = DDPMScheduler.from_pretrained(cfg.model, subfolder="scheduler")
        prepared = self.accelerator.prepare(*models, optimizer)
        self.unet, self.optimizer = prepared[0], prepared[-1]
        if cfg.train_text_encoder:
            self.text_encoders = tuple(prepared[1:3])
        for m in prepared[:-1]:
            m.train()

    def _load_text_encoders(self) -> list:
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

        from lora_helpers.train.latents import load_component
        from lora_helpers.core.lora_files import add_text_encoder_lora

        cfg = self.cfg
        te1 = load_component(CLIPTextModel, cfg.model, subfolder="text_encoder", dtype=self.dtype).to(self.device)
        te2 = load_component(CLIPTextModelWithProjection, cfg.model, subfolder="text_encoder_2",
                             dtype=self.dtype).to(self.device)
        for te in (te1, te2):
            te.requires_grad_(False)
            add_text_encoder_lora(te, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, init_lora_weights="gaussian",
                                                 target_modules=_TEXT_ENCODER_TARGETS))
        self.tokenizers = (CLIPTokenizer.from_pretrained(cfg.model, subfolder="tokenizer"),
                           CLIPTokenizer.from_pretrained(cfg.model, subfolder="tokenizer_2"))
        return [te1, te2]

    def resume(self, folder: Path) -> None:
        from lora_helpers.train.checkpoints import load_training_state, set_rng_state
        from lora_helpers.core.lora_files import load_lora_into_models

        unwrap = self.accelerator.unwrap_model
        te1, te2 = (unwrap(t) if t is not None else None for t in self.text_encoders)
        load_lora_into_models(folder / LORA_WEIGHT_NAME, unet=unwrap(self.unet), text_encoder=te1, text_encoder_2=te2)
        opt_state, state, rng = load_training_state(folder, process_index=self.accelerator.process_index)
        saved = state.get("config", {})
        for key in ("lora_rank", "train_batch_size", "gradient_accumulation_steps", "seed", "resolution"):
            if key in saved and saved[key] != getattr(self.cfg, key):
                print(f"warning: resuming with {key}={getattr(self.cfg, key)!r}, the checkpoint used {saved[key]!r}; "
                      "the result will differ from an uninterrupted run")
        self.optimizer.load_state_dict(opt_state)
        self.lr_scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        self.step = int(state["step"])
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.nonfinite_in_a_row = int(state.get("nonfinite_in_a_row", 0))
        self.scaler_skips = int(state.get("scaler_skips", 0))
        if rng is not None:
            set_rng_state(rng)
        self.rows = [r for r in runs.read_log(self.run_dir) if int(r.get("step", 0)) <= self.step]
        if self.main:
            print(f"resumed from {folder.name} (step {self.step} of {self.cfg.max_train_steps})")

    # ------------------------------------------------------------------ one step

    def _batch_indices(self, micro: int) -> list[int]:
        acc = self.accelerator
        index = micro * acc.num_processes + acc.process_index
        if not self._epochs:
            self._epochs[0] = batch_plan(self.cache.sizes, self.cfg.train_batch_size, seed=self.cfg.seed, epoch=0)
        per_epoch = len(self._epochs[0])
        epoch, pos = divmod(index, per_epoch)
        if epoch not in self._epochs:
            self._epochs = {0: self._epochs[0], epoch: batch_plan(self.cache.sizes, self.cfg.train_batch_size,
                                                                  seed=self.cfg.seed, epoch=epoch)}
        self.epoch = epoch
        return self._epochs[epoch][pos]

    def _class_indices(self, micro: int, n: int) -> list[int]:
        total = len(self.cache.class_latents)
        out = []
        for j in range(n):
            k = (micro * self.accelerator.num_processes + self.accelerator.process_index) * n + j
            cycle, pos = divmod(k, total)
            out.append(int(np.random.default_rng([self.cfg.seed, 7, cycle]).permutation(total)[pos]))
        return out

    def _noise(self, shape: tuple, keys: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise and timesteps from one generator per sample, keyed by (seed, key): reproducible anywhere."""
        noises, steps = [], []
        n_train = self.noise_scheduler.config.num_train_timesteps
        for key in keys:
            g = torch.Generator().manual_seed((self.cfg.seed * 1_000_003 + key) % (2**63))
            noise = torch.randn(shape, generator=g)
            if self.cfg.noise_offset:
                noise = noise + self.cfg.noise_offset * torch.randn((shape[0], 1, 1), generator=g)
            noises.append(noise)
            steps.append(torch.randint(0, n_train, (1,), generator=g))
        return torch.stack(noises).to(self.device), torch.cat(steps).to(self.device)

    def _embeds(self, prompt_ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.cfg.train_text_encoder:
            pe, pooled = self.cache.embeds(prompt_ids)
            return pe.to(self.device), pooled.to(self.device)
        prompts = [self.cache.prompts[i] for i in prompt_ids]
        return _encode_live(self.text_encoders, self.tokenizers, prompts, self.device)

    def _loss(self, latents: torch.Tensor, time_ids: torch.Tensor, prompt_ids: list[int],
              weights: torch.Tensor | None, keys: list[int]) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        latents = latents.to(self.device)
        noise, timesteps = self._noise(tuple(latents.shape[1:]), keys)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction_type = self.noise_scheduler.config.prediction_type
        target = noise if prediction_type == "epsilon" else self.noise_scheduler.get_velocity(latents, noise, timesteps)
        embeds, pooled = self._embeds(prompt_ids)
        with self.accelerator.autocast():
            pred = self.unet(noisy.to(self.dtype), timesteps, encoder_hidden_states=embeds.to(self.dtype),
                             added_cond_kwargs={"text_embeds": pooled.to(self.dtype),
                                                "time_ids": time_ids.to(self.device, self.dtype)}).sample
        snr_weights = None
        if self.cfg.snr_gamma:
            snr = compute_snr(self.noise_scheduler, timesteps)
            snr_weights = torch.clamp(snr, max=self.cfg.snr_gamma) / (snr if prediction_type == "epsilon" else snr + 1)
        return _diffusion_loss(pred, target, weights, snr_weights)

    def _instance_batch(self, micro: int):
        idx = self._batch_indices(micro)
        c = self.cache
        latents = torch.stack([c.latents[i] for i in idx])
        time_ids = torch.stack([c.time_ids[i] for i in idx])
        weights = None
        if any(c.weights[i] is not None for i in idx):
            weights = torch.stack([c.weights[i] if c.weights[i] is not None else torch.ones_like(latents[0, :1])
                                   for i in idx]).to(self.device)
        # fixed_noise: the same noise and timestep for an image at every step (over-fitting check)
        keys = list(idx) if self.cfg.fixed_noise else [(micro * self.accelerator.num_processes
                                                        + self.accelerator.process_index) * 1024 + j
                                                       for j in range(len(idx))]
        return latents, time_ids, [c.prompt_ids[i] for i in idx], weights, keys

    def _agree_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).float().reshape(1)
        if self.accelerator.num_processes > 1:  # every process must skip together, or DDP waits forever
            finite = self.accelerator.gather(finite).min().reshape(1)
        return bool(finite.item() > 0)

    def train_step(self) -> dict:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches."""
        cfg, acc = self.cfg, self.accelerator
        accum = cfg.gradient_accumulation_steps
        start = time.perf_counter()
        parts: dict[str, float] = {"instance_loss": 0.0}
        finite = True
        for k in range(accum):
            micro = self.step * accum + k
            latents, time_ids, prompt_ids, weights, keys = self._instance_batch(micro)
            backwards = [("instance_loss", 1.0, lambda: self._loss(latents, time_ids, prompt_ids, weights, keys))]
            if cfg.with_prior_preservation and self.cache.class_latents:
                ci = self._class_indices(micro, len(prompt_ids))
                c_lat = torch.stack([self.cache.class_latents[i] for i in ci])
                c_ids = torch.stack([self.cache.class_time_ids[i] for i in ci])
                c_prompt = [self.cache.prompt_index(cfg.class_prompt)] * len(ci)
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
                sync = contextlib.nullcontext() if last or acc.num_processes == 1 else acc.no_sync(self.unet)
                with sync:
                    acc.backward(loss * weight / accum)
                parts[name] = parts.get(name, 0.0) + float(loss.detach()) / accum
            if not finite:
                break
        row: dict[str, Any] = {"step": self.step + 1, "epoch": getattr(self, "epoch", 0),
                               "lr": self.lr_scheduler.get_last_lr()[0]}
        if finite:
            grad_norm = float(acc.clip_grad_norm_(self.params, cfg.max_grad_norm))
            self.optimizer.step()
            if acc.optimizer_step_was_skipped:  # fp16 overflow in the gradients: the scaler lowers its scale
                self.scaler_skips += 1
            self.nonfinite_in_a_row = 0
            loss_value = parts["instance_loss"] + cfg.prior_loss_weight * parts.get("prior_loss", 0.0)
            row.update(loss=loss_value, grad_norm=grad_norm if math.isfinite(grad_norm) else None, skipped=False,
                       **({k: v for k, v in parts.items()} if "prior_loss" in parts else {}))
        else:
            self.nonfinite_total += 1
            self.nonfinite_in_a_row += 1
            row.update(loss=None, grad_norm=None, skipped=True)
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.step += 1
        seconds = time.perf_counter() - start
        row.update(s_per_step=round(seconds, 4), nonfinite_total=self.nonfinite_total, scaler_skips=self.scaler_skips)
        if self.device.type == "cuda":
            row.update(gpu_mem_gb=round(torch.cuda.memory_allocated(self.device) / GB, 3),
                       gpu_peak_gb=round(torch.cuda.max_memory_allocated(self.device) / GB, 3))
        else:
            row["host_peak_gb"] = round(_host_peak_gb(), 3)
        return row

    # ------------------------------------------------------------------ saving and validation

    def _unwrapped(self):
        unwrap = self.accelerator.unwrap_model
        te1, te2 = (unwrap(t) if t is not None else None for t in self.text_encoders)
        return unwrap(self.unet), te1, te2

    def save_lora(self, folder: Path) -> Path:
        from lora_helpers.core.lora_files import save_lora

        unet, te1, te2 = self._unwrapped()
        return save_lora(folder, unet=unet, text_encoder=te1, text_encoder_2=te2)

    def checkpoint(self, loss: float | None) -> None:
        scaler = self.accelerator.scaler
        state = {"step": self.step, "scheduler": self.lr_scheduler.state_dict(),
                 "scaler": scaler.state_dict() if scaler is not None else None,
                 "nonfinite_total": self.nonfinite_total, "nonfinite_in_a_row": self.nonfinite_in_a_row,
                 "scaler_skips": self.scaler_skips, "config": dataclasses.asdict(self.cfg)}
        summary = {"step": self.step, "loss": loss, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
                   "trigger": self.trigger}
        self.accelerator.wait_for_everyone()
        if self.main:
            ckpt.save_checkpoint(self.run_dir, self.step, write_lora=self.save_lora,
                                 optimizer_state=self.optimizer.state_dict(), training_state=state, summary=summary)
        self.accelerator.wait_for_everyone()
        if not self.main:
            ckpt.save_checkpoint(self.run_dir, self.step, write_lora=self.save_lora, optimizer_state={},
                                 training_state=state, summary=summary, is_main_process=False,
                                 process_index=self.accelerator.process_index)
        if self.main:
            ckpt.prune_checkpoints(self.run_dir, self.cfg.checkpoints_total_limit)
        self.flush_log()

    def flush_log(self) -> None:
        if self.main:
            write_jsonl(self.run_dir / runs.LOG_FILE, self.rows)

    def validate(self) -> dict:
        """Images for the validation prompts and seeds, saved as a grid; runs the hook."""
        from lora_helpers.train import validation as samples

        cfg = self.cfg
        if self._vae is None:
            self._vae = samples.load_validation_vae(cfg.model, cfg.vae, dtype=self.dtype, device=self.device,
                                                    resolution=cfg.resolution)
        unet, te1, te2 = self._unwrapped()
        jobs = [(self._prompt_kwargs(p), seed) for p in self.validation_prompts for seed in cfg.validation_seeds]
        images = samples.render_validation(
            jobs, unet=unet, vae=self._vae, model=cfg.model, device=self.device, text_encoders=(te1, te2),
            tokenizers=self.tokenizers, steps=cfg.validation_inference_steps, guidance=cfg.validation_guidance_scale,
            resolution=cfg.resolution)
        params = {"step": self.step, "trigger": self.trigger, "steps": cfg.validation_inference_steps,
                  "guidance": cfg.validation_guidance_scale, "base_model": cfg.model}
        grid_path = samples.save_validation(self.run_dir, self.step, images, self.validation_prompts,
                                            cfg.validation_seeds, params)
        self.samples.append(grid_path)
        record = {"step": self.step, "samples": grid_path.relative_to(self.run_dir).as_posix()}
        hooks = [] if self.hook is None else list(self.hook) if isinstance(self.hook, (list, tuple)) else [self.hook]
        for hook in hooks:
            try:
                values = hook(self.step, images, self.run_dir)
            except Exception as exc:  # a failing score must not end an hour of training
                warnings.warn(f"validation hook failed at step {self.step}: {type(exc).__name__}: {exc}")
                values = {"hook_error": f"{type(exc).__name__}: {exc}"}
            if isinstance(values, dict):
                record.update(values)
        self.validation.append(record)
        return record

    def _prompt_kwargs(self, prompt: str) -> dict:
        cfg = self.cfg
        if cfg.train_text_encoder:
            return {"prompt": prompt, "negative_prompt": cfg.validation_negative_prompt}
        pe, pooled = self.cache.embeds([self.cache.prompt_index(prompt)])
        kwargs = {"prompt_embeds": pe.to(self.device, self.dtype), "pooled_prompt_embeds": pooled.to(self.device, self.dtype)}
        if cfg.validation_negative_prompt:
            ne, npooled = self.cache.embeds([self.cache.prompt_index(cfg.validation_negative_prompt)])
            kwargs.update(negative_prompt_embeds=ne.to(self.device, self.dtype),
                          negative_pooled_prompt_embeds=npooled.to(self.device, self.dtype))
        return kwargs


def _host_peak_gb() -> float:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB  # Linux reports KiB
    except (ImportError, AttributeError):  # pragma: no cover - non-POSIX
        return float("nan")


def _make_optimizer(cfg, groups: list[dict]):
    kwargs = dict(betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as exc:
            raise ImportError("optimizer='adamw8bit' needs bitsandbytes (pip install bitsandbytes), "
                              "or use optimizer='adamw' (more memory)") from exc
        return bnb.optim.AdamW8bit(groups, lr=cfg.learning_rate, **kwargs)
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, **kwargs)


def _load_unet_8bit(model: str, device: torch.device):
    """The frozen UNet with its Linear layers stored in 8 bits (bitsandbytes, CUDA only)."""
    if device.type != "cuda":
        raise ValueError("unet_8bit needs a CUDA GPU (bitsandbytes 8-bit matmuls); on CPU train in fp32")
    from diffusers import BitsAndBytesConfig, UNet2DConditionModel

    from lora_helpers.train.latents import load_component

    return load_component(UNet2DConditionModel, model, subfolder="unet", dtype=torch.float16,
                          quantization_config=BitsAndBytesConfig(load_in_8bit=True), device_map={"": device.index or 0})


def _encode_live(text_encoders, tokenizers, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL prompt encoding with gradients (text-encoder LoRA): penultimate hidden states, pooled from encoder 2."""
    hidden = []
    for te, tok in zip(text_encoders, tokenizers):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = te(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return torch.cat(hidden, dim=-1), out.text_embeds  # the second encoder's projection is the pooled embedding


def run_training(dataset_dir: Path, run_dir: Path, *, cfg, accelerator, plan, trigger: str, class_noun: str | None,
                 start_from: Path | None, validation_hook: Callable | None):
    """Set up, train, and write the run folder (see :func:`lora_helpers.train.stage.train`)."""
    from tqdm.auto import tqdm

    from lora_helpers.core.lora_files import save_kohya

    run = _Run(dataset_dir, run_dir, cfg=cfg, accelerator=accelerator, plan=plan, trigger=trigger,
               class_noun=class_noun, validation_hook=validation_hook)
    run_dir.mkdir(parents=True, exist_ok=True)
    if run.main:
        print(plan)
    try:
        run.prepare_data()
        cfg = run.cfg
        if run.main:
            runs.write_run_config(run_dir, config=dataclasses.asdict(cfg), trigger=trigger, class_noun=class_noun,
                                  images=run.images, dataset_dir=dataset_dir, status="training",
                                  extra={"memory": {"estimate_gb": round(plan.peak_gb, 3), "plan": plan.to_dict()}})
        run.build_models()
        if start_from is not None:
            run.resume(start_from)
        setup_peak = None
        if run.device.type == "cuda":  # encoding and loading are done: measure the training itself from here
            setup_peak = torch.cuda.max_memory_allocated(run.device) / GB
            torch.cuda.reset_peak_memory_stats(run.device)
        bar = tqdm(total=cfg.max_train_steps, initial=run.step, desc="training", unit="step",
                   disable=not (cfg.progress and run.main))
        every_val = cfg.validation_steps or 0
        while run.step < cfg.max_train_steps:
            row = run.train_step()
            run.rows.append(row)
            if run.nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                run.flush_log()
                last = ckpt.list_checkpoints(run_dir)
                raise TrainingDivergedError(
                    f"the loss was NaN/inf for {run.nonfinite_in_a_row} steps in a row (step {run.step}, "
                    f"{run.nonfinite_total} in all). Lower the learning rate (now {cfg.learning_rate:g}; try "
                    f"{cfg.learning_rate / 2:g}), keep max_grad_norm, and encode with the fp32 VAE or the fp16-fix "
                    "VAE (madebyollin/sdxl-vae-fp16-fix)"
                    + (f"; resume from {last[-1].name} with resume='latest'" if last else ""))
            mem = row.get("gpu_peak_gb", row.get("host_peak_gb"))
            bar.set_postfix(loss="nan" if row["loss"] is None else f"{row['loss']:.4f}",
                            s_step=f"{row['s_per_step']:.2f}", mem=f"{mem:.2f}GB")
            bar.update(1)
            final = run.step == cfg.max_train_steps
            if final or (cfg.checkpointing_steps and run.step % cfg.checkpointing_steps == 0):
                run.checkpoint(row["loss"])
            if cfg.validation_prompts and (final or (every_val and run.step % every_val == 0)):
                if run.main:
                    row.update(run.validate())
                run.flush_log()
            elif run.step % 25 == 0:
                run.flush_log()
        bar.close()
    except BaseException as exc:
        run.flush_log()
        last = ckpt.list_checkpoints(run_dir)
        if isinstance(exc, KeyboardInterrupt) and run.main:
            print(f"interrupted at step {run.step}; " + (f"resume from {last[-1].name} with resume='latest'"
                                                          if last else "no checkpoint yet"))
        if isinstance(exc, Exception) and _is_oom(exc):
            raise TrainingOutOfMemoryError(
                f"out of memory at step {run.step + 1} (planned peak {plan.peak_gb:.2f} GB"
                + (f", budget {cfg.memory_budget_gb:g} GB" if cfg.memory_budget_gb else "") + "). "
                "Lower the resolution (768), keep batch 1 with gradient accumulation, lower lora_rank, turn on "
                "gradient_checkpointing, or use unet_8bit=True"
                + (f"; then resume from {last[-1].name} (resume='latest')" if last else "")) from exc
        raise
    accelerator.wait_for_everyone()
    measured = torch.cuda.max_memory_allocated(run.device) / GB if run.device.type == "cuda" else None
    losses = [r["loss"] for r in run.rows if r.get("loss") is not None]
    final_loss = statistics.fmean(losses[-10:]) if losses else None
    times = [r["s_per_step"] for r in run.rows if r.get("s_per_step")]
    s_per_step = statistics.median(times) if times else None
    if not run.samples:  # resumed at the last step: the grids of the earlier session
        run.samples = sorted((run_dir / "samples").glob("step-*.png"))
    lora_path = run_dir / LORA_WEIGHT_NAME
    kohya_path = run_dir / f"{cfg.output_name}_kohya.safetensors"
    hub_url = None
    if run.main:
        run.save_lora(run_dir)
        save_kohya(lora_path, kohya_path, output_name=cfg.output_name, trigger=trigger, resolution=cfg.resolution,
                   layers_per_block=run._unwrapped()[0].config.layers_per_block)
        runs.plot_training(run.rows, run_dir / runs.CURVES_FILE)
        extra = {"steps": run.step, "final_loss": final_loss, "nonfinite_steps": run.nonfinite_total,
                 "scaler_skipped_steps": run.scaler_skips, "seconds_per_step": s_per_step,
                 "memory": {"estimate_gb": round(plan.peak_gb, 3), "measured_peak_gb":
                            None if measured is None else round(measured, 3), "budget_gb": cfg.memory_budget_gb,
                            "setup_peak_gb": None if setup_peak is None else round(setup_peak, 3),
                            "plan": plan.to_dict()},
                 "samples": [p.relative_to(run_dir).as_posix() for p in run.samples]}
        runs.write_run_config(run_dir, config=dataclasses.asdict(cfg), trigger=trigger, class_noun=class_noun,
                              images=run.images, dataset_dir=dataset_dir, status="finished", extra=extra)
        sample = run.samples[-1] if run.samples else None
        runs.write_model_card(run_dir, config=dataclasses.asdict(cfg), trigger=trigger, n_images=len(run.images),
                              steps=run.step, kohya_path=kohya_path, sample_grid=sample, estimated_gb=plan.peak_gb,
                              measured_gb=measured, seconds_per_step=s_per_step)
        if cfg.hub_repo_id:
            hub_url = runs.push_to_hub(run_dir, cfg.hub_repo_id, private=cfg.hub_private)
    accelerator.wait_for_everyone()
    return TrainResult(run_dir=run_dir, lora_path=lora_path, kohya_path=kohya_path,
                       config_path=run_dir / runs.CONFIG_FILE, log_path=run_dir / runs.LOG_FILE, steps=run.step,
                       final_loss=final_loss, nonfinite_steps=run.nonfinite_total, seconds_per_step=s_per_step,
                       estimated_peak_gb=plan.peak_gb, measured_peak_gb=measured, samples=list(run.samples),
                       validation=list(run.validation), hub_url=hub_url)
