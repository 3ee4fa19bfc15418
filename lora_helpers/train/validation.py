"""Pictures made during training: validation grids and prior-preservation class images.

Validation runs on the training UNet itself (LoRA in memory, no copy) with the prompt
embeddings cached before the text encoders were freed, so it costs no extra model in
GPU memory beyond the VAE. The pipeline only denoises; the VAE decodes in its own dtype
(fp32, or fp16 for the fp16-fix VAE), in 512-px tiles on a GPU, so validation never
brings back the fp16 VAE NaNs or an untiled 1024-px decode of several GB.

Showing the grids (a notebook, a console) is a listener's job: see
:class:`lora_helpers.train.listeners.ShowValidation`. diffusers is imported inside the
functions that build pipelines: it costs seconds to import.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from lora_helpers.core.fileio import save_image
from lora_helpers.core.grids import make_grid, save_png_with_metadata
from lora_helpers.core.runtime import free_memory
from lora_helpers.train.latents import load_component

__all__ = ["load_validation_vae", "render_validation", "save_validation", "validation_grid_path",
           "generate_class_images"]


def load_validation_vae(model: str, vae: str | None, *, dtype: torch.dtype, device: torch.device, resolution: int):
    """The VAE for validation images, kept in host memory between validations.

    Args:
        model: SDXL hub id or folder (its ``vae/`` is used when ``vae`` is None).
        vae: a separate VAE (the fp16-fix VAE), loaded in ``dtype``; the model's own VAE is fp32.
        dtype: the training's weight dtype.
        device: the training device (tiling only on CUDA).
        resolution: training size; above 512 px the decode is tiled.

    Returns:
        An ``AutoencoderKL`` in eval mode, on the CPU.
    """
    from diffusers import AutoencoderKL

    dtype = dtype if (vae and dtype == torch.float16) else torch.float32
    autoencoder = (load_component(AutoencoderKL, vae, dtype=dtype) if vae
                   else load_component(AutoencoderKL, model, subfolder="vae", dtype=dtype)).eval()
    if device.type == "cuda" and resolution > 512:
        autoencoder.enable_tiling()
        autoencoder.tile_sample_min_size, autoencoder.tile_latent_min_size = 512, 64
    return autoencoder


def render_validation(jobs: Sequence[tuple[dict, int]], *, unet, vae, model: str, device: torch.device,
                      text_encoders=(None, None), tokenizers=(None, None), steps: int, guidance: float,
                      resolution: int) -> list:
    """Denoise with the training UNet and decode: one PIL image per (prompt kwargs, seed) job.

    The random streams of the training are left untouched (resuming must not depend on
    whether validation ran), and the models are back in training mode afterwards.

    Args:
        jobs: (pipeline keyword arguments: prompt embeddings or a prompt, seed) per image.
        unet: the training UNet with its LoRA.
        vae: from :func:`load_validation_vae`; moved to ``device`` and back to the CPU.
        model: SDXL hub id or folder (its scheduler config).
        device: the training device.
        text_encoders, tokenizers: the trained text encoders (text-encoder LoRA), else None.
        steps, guidance: denoising steps and classifier-free guidance scale.
        resolution: image side in px.

    Returns:
        PIL images, one per job, in order.
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    vae.to(device)  # on the device: the pipeline takes its execution device from it
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=text_encoders[0], text_encoder_2=text_encoders[1], tokenizer=tokenizers[0],
        tokenizer_2=tokenizers[1], unet=unet, scheduler=EulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler"))
    pipe.set_progress_bar_config(disable=True)
    models = [m for m in (unet, *text_encoders) if m is not None]
    for m in models:
        m.eval()
    devices = [torch.cuda.current_device()] if device.type == "cuda" else []
    images = []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=devices):
            for kwargs, seeds in _calls(jobs, device):
                generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
                latents = pipe(**kwargs, num_inference_steps=steps, guidance_scale=guidance, height=resolution,
                               width=resolution, generator=generators if len(seeds) > 1 else generators[0],
                               output_type="latent").images
                for latent in latents.split(1):  # one decode at a time: the plan counts one image's decode
                    decoded = vae.decode(latent.to(device, vae.dtype) / vae.config.scaling_factor).sample
                    if not torch.isfinite(decoded).all():
                        warnings.warn("validation image has NaN/inf pixels: the VAE overflowed; decode in fp32 or use "
                                      "the fp16-fix VAE (madebyollin/sdxl-vae-fp16-fix)")
                    images += pipe.image_processor.postprocess(decoded.float(), output_type="pil")
    finally:
        for m in models:
            m.train()
        vae.to("cpu")
    return images


# images per pipeline call on a CPU: one denoising loop at a larger batch takes about 0.6 of the time of
# one call per image there (measured with the small model at 128 px; the same latents within 1e-4)
_CPU_IMAGES_PER_CALL = 4


def _calls(jobs: Sequence[tuple[dict, int]], device: torch.device) -> list[tuple[dict, list[int]]]:
    """The jobs as pipeline calls: ``(keyword arguments for the whole batch, seeds)``.

    On a GPU one image per call, as the memory plan counts (a 1024-px UNet is busy enough at the batch
    of 2 that guidance makes); on a CPU up to :data:`_CPU_IMAGES_PER_CALL` images, their prompt
    embeddings (or prompts) stacked.
    """
    size = _CPU_IMAGES_PER_CALL if device.type == "cpu" else 1
    calls = []
    for first in range(0, len(jobs), size):
        group = jobs[first:first + size]
        kwargs = {}
        for key, value in group[0][0].items():
            values = [job[0][key] for job in group]
            if isinstance(value, torch.Tensor):
                kwargs[key] = torch.cat(values)
            else:  # prompt strings (trained text encoders): a list, or None for no negative prompt
                kwargs[key] = values if len(group) > 1 and any(v is not None for v in values) else value
        calls.append((kwargs, [seed for _, seed in group]))
    return calls


def validation_grid_path(run_dir: str | Path, step: int) -> Path:
    """Where the validation grid of ``step`` is saved (``run_dir/samples/step-000200.png``)."""
    return Path(run_dir) / "samples" / f"step-{step:06d}.png"


def save_validation(run_dir: Path, step: int, images: list, prompts: Sequence[str], seeds: Sequence[int],
                    params: dict) -> Path:
    """Save ``samples/step-<step>/promptI-seedS.png`` and the grid ``samples/step-<step>.png``.

    Every PNG carries its prompt, seed and settings as text chunks.

    Args:
        run_dir: the run folder.
        step: the training step the images show.
        images: prompts x seeds, row-major (as :func:`render_validation` returns them).
        prompts, seeds: the grid's rows and columns.
        params: settings written into every PNG (step, trigger, steps, guidance, base model).

    Returns:
        The grid's path.
    """
    grid_path = validation_grid_path(run_dir, step)
    name, folder = grid_path.stem, grid_path.parent
    for i, prompt in enumerate(prompts):
        for j, seed in enumerate(seeds):
            save_png_with_metadata(folder / name / f"prompt{i}-seed{seed}.png", images[i * len(seeds) + j],
                                   {**params, "prompt": prompt, "seed": seed})
    grid = make_grid(images, rows=len(prompts), cols=len(seeds), row_labels=list(prompts),
                     col_labels=[f"seed {s}" for s in seeds], title=f"step {step}")
    return save_png_with_metadata(grid_path, grid, {**params, "prompts": list(prompts)})


def generate_class_images(model: str, folder: Path, *, prompt: str, start: int, count: int, resolution: int,
                          steps: int, seed: int, vae: str | None, device: torch.device, dtype: torch.dtype,
                          progress: bool = True) -> list[Path]:
    """Prior-preservation images of ``prompt`` from the base model, freed from memory afterwards.

    On a GPU the pipeline runs with model CPU offload: one model on the GPU at a time, so
    it fits the training budget. Images are numbered from ``start`` (a re-run tops up).

    Args:
        model: SDXL hub id or folder.
        folder: where ``class-0000.png``... go.
        prompt: the class prompt ("a photo of a person").
        start, count: the first number and how many images.
        resolution, steps: image side and denoising steps.
        seed: image ``i`` uses seed ``seed * 100003 + i``.
        vae: a separate VAE (the fp16-fix VAE), or None.
        device, dtype: where and in which dtype the pipeline runs.
        progress: show a progress bar.

    Returns:
        The files written.
    """
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    extra = {"vae": load_component(AutoencoderKL, vae, dtype=dtype)} if vae else {}
    pipe = load_component(StableDiffusionXLPipeline, model, dtype=dtype, **extra)
    if device.type == "cuda":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    written = []
    try:
        for i in tqdm(range(start, start + count), desc="class images", unit="image", disable=not progress):
            image = pipe(prompt, num_inference_steps=steps, height=resolution, width=resolution,
                         generator=torch.Generator("cpu").manual_seed(seed * 100_003 + i)).images[0]
            written.append(save_image(Path(folder) / f"class-{i:04d}.png", image))
    finally:
        del pipe
        free_memory()
    return written
