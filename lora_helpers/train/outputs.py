"""The files of a training run that people read: config.json, log, curves, model card, Hub upload.

``config.json`` holds everything needed to reproduce the run (the full training config,
package versions, SHA-256 of every training image and caption) plus what the later
stages read: ``trigger``, ``base_model``, ``resolution``, ``lora_rank``; a run of several people has
``subjects`` (slug -> trigger, class noun, images) instead of ``trigger``.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
import time
from pathlib import Path
from typing import Any, Sequence

from lora_helpers.core import run_folder
from lora_helpers.core.fileio import atomic_path, sha256_file, write_text
from lora_helpers.core.runtime import say

__all__ = [
    "CURVES_FILE",
    "package_versions",
    "dataset_hashes",
    "write_run_config",
    "plot_training",
    "write_model_card",
    "check_hub_access",
    "push_to_hub",
]

CURVES_FILE = "training_curves.png"
_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "bitsandbytes", "safetensors")


def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages that shape a training run."""
    import importlib.metadata

    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def dataset_hashes(images: Sequence) -> list[dict[str, Any]]:
    """SHA-256 of each training image, mask and caption (``TrainImage`` objects)."""
    rows = []
    for im in images:
        rows.append({
            "file_name": im.file_name,
            "sha256": sha256_file(im.path),
            "mask_sha256": sha256_file(im.mask_path) if im.mask_path else None,
            "caption": im.caption,
            "caption_sha256": hashlib.sha256(im.caption.encode("utf-8")).hexdigest(),
            "original_size": im.original_size,
            "crop_top_left": im.crop_top_left,
            **({"subject": im.subject} if getattr(im, "subject", None) is not None else {}),
        })
    return rows


def write_run_config(run_dir: str | os.PathLike, *, config: dict, trigger: str | None, class_noun: str | None,
                     images: Sequence, dataset_dir: str | os.PathLike, status: str,
                     extra: dict | None = None, subjects: dict[str, dict] | None = None) -> Path:
    """Write the run's ``config.json``: what later stages read first, then everything to reproduce the run.

    Args:
        run_dir: the run folder.
        config: the resolved training config (``dataclasses.asdict``).
        trigger: the phrase that calls the person (None with several people).
        class_noun: "person", "man", ... when the caption stage recorded it.
        images: the ``TrainImage`` list trained on.
        dataset_dir: where they came from.
        status: "training" while running, "finished" at the end.
        extra: more facts (steps done, memory, timings).
        subjects: several people: slug -> {"trigger", "class_noun", "images"} (written under "subjects",
            and no top-level "trigger": no one phrase calls them all).

    Returns:
        The path.
    """
    who = {run_folder.SUBJECTS_KEY: subjects} if subjects else {"trigger": trigger}
    data = {
        **who,
        "class_noun": class_noun,
        "base_model": config.get("model"),
        "vae": config.get("vae"),
        "resolution": config.get("resolution"),
        "lora_rank": config.get("lora_rank"),
        "lora_alpha": config.get("lora_alpha"),
        "target_modules": list(config.get("target_modules") or []),
        "train_text_encoder": config.get("train_text_encoder"),
        "preset": config.get("preset"),
        "status": status,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
        **(extra or {}),
        "config": config,
        "versions": package_versions(),
        "dataset": {"dir": str(dataset_dir), "n_images": len(images), "images": dataset_hashes(images)},
    }
    return run_folder.write_run_config(run_dir, data)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def plot_training(rows: Sequence[dict], path: str | os.PathLike | None = None, *, window: int = 10):
    """Loss (with a moving average) and gradient norm against the step.

    Drawn with matplotlib's object API (no pyplot, no global backend change), so it is
    cheap at the end of every run and safe in any process.

    Args:
        rows: ``log.jsonl`` rows (see :func:`read_log`).
        path: PNG to write atomically; None only returns the figure.
        window: moving-average width.

    Returns:
        The ``matplotlib.figure.Figure``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    steps = [r["step"] for r in rows if _finite(r.get("loss"))]
    loss = [r["loss"] for r in rows if _finite(r.get("loss"))]
    gsteps = [r["step"] for r in rows if _finite(r.get("grad_norm"))]
    gnorm = [r["grad_norm"] for r in rows if _finite(r.get("grad_norm"))]
    skipped = [r["step"] for r in rows if r.get("skipped")]
    fig = Figure(figsize=(10, 3.5))
    FigureCanvasAgg(fig)
    # fixed margins: a constrained layout solves them again at every save, doubling the time at the end of a run
    fig.subplots_adjust(left=0.07, right=0.985, bottom=0.14, top=0.9, wspace=0.22)
    ax1, ax2 = fig.subplots(1, 2)
    ax1.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= window:
        avg = [sum(loss[i - window + 1:i + 1]) / window for i in range(window - 1, len(loss))]
        ax1.plot(steps[window - 1:], avg, lw=2, label=f"mean of {window}")
    for s in skipped:
        ax1.axvline(s, color="red", lw=0.8, alpha=0.6)
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss")
    ax1.set_title("training loss" + (f" ({len(skipped)} non-finite steps in red)" if skipped else ""))
    ax1.legend(loc="upper right")
    ax2.plot(gsteps, gnorm, lw=0.8, color="tab:green")
    ax2.set_xlabel("step")
    ax2.set_ylabel("gradient norm (before clipping)")
    ax2.set_title("gradient norm")
    if path is not None:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=90)
    return fig


_CARD = """---
base_model: {base_model}
library_name: diffusers
license: openrail++
tags:
- text-to-image
- stable-diffusion-xl
- lora
- diffusers
- dreambooth
instance_prompt: {trigger}
---

# {title}

{who}

{samples}

## Use with diffusers

```python
import torch
from diffusers import StableDiffusionXLPipeline

pipe = StableDiffusionXLPipeline.from_pretrained("{base_model}", dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{run_name}")  # this folder, or the Hub repo it was pushed to
{embeddings_code}image = pipe("a photo of {trigger} in a garden", num_inference_steps=30).images[0]
```

## Use with ComfyUI, AUTOMATIC1111 / Forge or kohya sd-scripts

`{kohya_name}` holds the same LoRA under the original SDXL layer names these tools read.

- **ComfyUI**: put the file in `ComfyUI/models/loras/`, add a **Load LoRA** node between
  the checkpoint loader and the sampler, choose `{kohya_name}` in it, and write
  `a photo of {comfy_trigger}` in the prompt.
- **AUTOMATIC1111 / Forge**: put the file in `models/Lora/` and write
  `<lora:{kohya_stem}:1> a photo of {a1111_trigger}` in the prompt.
- **kohya sd-scripts**: merge it into the base model with
  `python networks/sdxl_merge_lora.py --sd_model sd_xl_base_1.0.safetensors --models {kohya_name} --ratios 1 --save_to merged.safetensors`,
  or train on from it with `--network_weights {kohya_name}`.
{embeddings_text}
## Training

| setting | value |
|---|---|
| base model | `{base_model}` |
| images | {n_images} at {resolution} px (aspect buckets) |
| steps | {steps} (batch {batch} x {accum} accumulation) |
| learning rate | {lr} ({scheduler}) |
| LoRA | rank {rank}, alpha {alpha}, on {targets}{te} |
| new tokens | {pivotal} |
| precision | {precision}, gradient checkpointing {gc}, optimizer {optimizer} |
| loss | min-SNR-gamma {snr}, face-mask background weight {bg}, noise offset {offset} |
| prior preservation | {prior} |
| GPU memory | estimated {estimate}, measured {measured} |
| time | {seconds_per_step} s/step |
{resumed}
Reproduce with `config.json` (full config, package versions, SHA-256 of every image and caption).
Made with `lora_helpers` (`python -m lora_helpers train`).
"""


def write_model_card(run_dir: str | os.PathLike, *, config: dict, trigger: str, n_images: int, steps: int,
                     kohya_path: Path, sample_grid: Path | None, estimated_gb: float,
                     measured_gb: float | None, seconds_per_step: float | None,
                     resumes: Sequence[dict] = (), embedding_path: Path | None = None,
                     tokens: Sequence[str] = (), subjects: dict[str, dict] | None = None) -> Path:
    """Write the model card ``README.md`` (Hub front matter, trigger, usage, settings, samples).

    Args:
        run_dir: the run folder.
        config: the resolved training config (``dataclasses.asdict``) of the last session.
        trigger, n_images, steps: the phrase, the number of images, the optimizer steps done.
        kohya_path, sample_grid: the kohya file and the last validation grid (or None).
        estimated_gb, measured_gb, seconds_per_step: memory and speed figures.
        resumes: ``{"from", "step", "changed"}`` of each resume, so settings changed part-way are stated.
        embedding_path, tokens: the embedding file and token names of pivotal tuning (None: none).
        subjects: several people (slug -> {"trigger", "images"}): the card names each one's trigger, and
            ``trigger`` is only the one its examples use.

    Returns:
        The path.
    """
    run_dir = Path(run_dir)
    samples = ""
    if sample_grid is not None:
        rel = sample_grid.relative_to(run_dir).as_posix()
        samples = f"![validation samples at the last step]({rel})"
    te = " and both text encoders" if config.get("train_text_encoder") else ""
    pivotal = _pivotal_card(embedding_path, list(tokens), trigger, config) if embedding_path else {
        "embeddings_code": "", "embeddings_text": "", "comfy_trigger": trigger, "a1111_trigger": trigger,
        "pivotal": "none (the identifier is a rare word)"}
    text = _CARD.format(
        who=_who(trigger, subjects), base_model=config.get("model"), trigger=trigger, title=f"LoRA: {trigger}", samples=samples,
        run_name=run_dir.name, kohya_name=kohya_path.name, kohya_stem=kohya_path.stem, n_images=n_images,
        resolution=config.get("resolution"), steps=steps, batch=config.get("train_batch_size"),
        accum=config.get("gradient_accumulation_steps"), lr=config.get("learning_rate"),
        scheduler=config.get("lr_scheduler"), rank=config.get("lora_rank"), alpha=config.get("lora_alpha"),
        targets=", ".join(config.get("target_modules") or []), te=te,
        precision=config.get("mixed_precision"), gc=_checkpointing_words(config.get("gradient_checkpointing")),
        optimizer=config.get("optimizer"), snr=config.get("snr_gamma"),
        bg=config.get("background_weight") if config.get("use_masks") else "masks off",
        offset=config.get("noise_offset"),
        prior=(f"on, weight {config.get('prior_loss_weight')}, class prompt '{config.get('class_prompt')}'"
               if config.get("with_prior_preservation") else "off"),
        estimate=f"{estimated_gb:.2f} GB", measured="not measured (CPU)" if measured_gb is None else f"{measured_gb:.2f} GB",
        seconds_per_step="?" if seconds_per_step is None else f"{seconds_per_step:.3f}",
        resumed="".join(_resume_row(r) for r in resumes), **pivotal,
    )
    return write_text(run_dir / "README.md", text)


def _checkpointing_words(setting) -> str:
    """"on", "off" or "on N UNet blocks" for the card (True/False in configs of older runs)."""
    if setting is True or setting == "all":
        return "on"
    if setting is False or setting is None or setting == "none" or setting == 0:
        return "off"
    return f"on {setting} UNet blocks"


def _who(trigger: str, subjects: dict[str, dict] | None) -> str:
    """The card's opening: whom the LoRA shows and the phrase that calls each person."""
    if not subjects:
        return (f"An SDXL LoRA (DreamBooth) of one person. Write **`{trigger}`** in a prompt to call them,\n"
                f"e.g. `a photo of {trigger} hiking in the mountains`.\n")
    rows = "".join(f"| {slug} | `{s['trigger']}` | {s.get('images', '?')} |\n" for slug, s in subjects.items())
    a, b = (s["trigger"] for s in list(subjects.values())[:2]) if len(subjects) > 1 else (trigger, trigger)
    return (f"An SDXL LoRA (DreamBooth) of {len(subjects)} people, trained together with batches balanced across "
            f"them. Write a person's phrase in a prompt to call them, e.g. `a photo of {a} and {b} at a cafe`.\n\n"
            f"| person | trigger | photos |\n|---|---|---|\n{rows}")


def _pivotal_card(path: Path, tokens: list[str], trigger: str, config: dict) -> dict[str, str]:
    """The model card's parts about the new tokens: loading them in diffusers, ComfyUI and A1111."""
    identifier = "".join(tokens)
    stem = path.stem
    code = (f'from safetensors.torch import load_file\n\nemb = load_file("{path.parent.name}/{path.name}")  # beside the LoRA\n'
            f'pipe.load_textual_inversion(emb["clip_l"], token={tokens!r}, text_encoder=pipe.text_encoder, '
            f'tokenizer=pipe.tokenizer)\n'
            f'pipe.load_textual_inversion(emb["clip_g"], token={tokens!r}, text_encoder=pipe.text_encoder_2, '
            f'tokenizer=pipe.tokenizer_2)\n'
            "# pool at the end-of-text token, as in training and in ComfyUI (SDXL's configs say otherwise)\n"
            "for te, tok in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)):\n"
            "    for m in te.modules():\n"
            "        if hasattr(m, 'eos_token_id'):\n"
            "            m.eos_token_id = tok.eos_token_id\n")
    text = (f"\n### The new tokens ({identifier})\n\nThis LoRA was trained with pivotal tuning: the person is called by "
            f"new tokens `{identifier}` whose embeddings in both text encoders are in `{path.name}` (`clip_l` and "
            f"`clip_g`, SDXL's embedding format). Load them together with the LoRA:\n\n"
            f"- **diffusers**: as in the code above (`load_textual_inversion` once per text encoder).\n"
            f"- **ComfyUI**: put `{path.name}` in `ComfyUI/models/embeddings/` and write `embedding:{stem}` where "
            f"the prompt has `{identifier}`.\n"
            f"- **AUTOMATIC1111 / Forge**: put `{path.name}` in `embeddings/` and write `{stem}` where the prompt "
            f"has `{identifier}`.\n")
    people = sorted((path.parent / "embeddings").glob("*.safetensors"))
    if people:  # several people: ComfyUI and A1111 call each by a file of their own
        text += ("\nSeveral people: `embeddings/` holds one file per person with only their tokens ("
                 + ", ".join(f"`{p.name}`" for p in people) + "). In ComfyUI and AUTOMATIC1111 use those instead, "
                 f"e.g. `embedding:{people[0].stem}` (ComfyUI) or `{people[0].stem}` (A1111) for that person.\n")
    return {"embeddings_code": code, "embeddings_text": text,
            "comfy_trigger": trigger.replace(identifier, f"embedding:{stem}"),
            "a1111_trigger": trigger.replace(identifier, stem),
            "pivotal": (f"{len(tokens)} ({identifier}), learning rate {config.get('pivotal_lr')}, trained for the "
                        f"first {config.get('pivotal_freeze_fraction')} of the steps")}


def _resume_row(resume: dict) -> str:
    changed = resume.get("changed") or {}
    what = ", ".join(f"{k}: {new}" if k == "dataset" else f"{k} {old} -> {new}" for k, (old, new) in changed.items())
    return f"| resumed | at step {resume.get('step')} from `{resume.get('from')}`" + (
        f", with changes accepted: {what} (the table shows the settings after the change)" if what else "") + " |\n"


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def check_hub_access(repo_id: str, *, private: bool = True, token: str | None = None) -> str | None:
    """Make sure the finished run can be pushed to ``repo_id``, before an hour of training.

    Checks that a token is there and that it may write the repository (creating it, as the
    push would). Offline, says that the push will be skipped.

    Returns:
        The user name the token belongs to, or None offline.

    Raises:
        PermissionError: no token, or the token cannot write ``repo_id``; says what to do.
    """
    if _hub_offline():
        say(f"note: offline (HF_HUB_OFFLINE=1), so the finished run will not be pushed to {repo_id}")
        return None
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise PermissionError(
            f"pushing to {repo_id} needs a Hugging Face token with write access: in Colab add HF_TOKEN under "
            "Secrets (the key icon), elsewhere run `huggingface-cli login`; or leave the Hub repo empty")
    api = HfApi(token=token)
    try:
        user = api.whoami()["name"]
        api.create_repo(repo_id, private=private, exist_ok=True)
    except Exception as exc:  # HTTP errors, a read-only token, a repo of someone else
        raise PermissionError(f"cannot write to the Hub repo {repo_id}: {type(exc).__name__}: {exc}. Check the "
                              "name (your-user/your-repo) and that the token has write access") from None
    return user


def push_to_hub(run_dir: str | os.PathLike, repo_id: str, *, private: bool = True, token: str | None = None) -> str | None:
    """Upload the finished run (LoRA files, card, config, samples) to the Hugging Face Hub.

    Checkpoints, the latent cache and class images stay local. Offline
    (``HF_HUB_OFFLINE=1``) the upload is skipped with a message.

    Returns:
        The repo URL, or None when skipped.
    """
    if _hub_offline():
        print(f"push to the Hub skipped: offline (HF_HUB_OFFLINE=1); upload {run_dir} later to {repo_id}")
        return None
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(run_dir), commit_message="Upload LoRA trained with lora_helpers",
                      ignore_patterns=["checkpoints/*", "cache/*", "class_images/*", ".*"])
    return str(url)
