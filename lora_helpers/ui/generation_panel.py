"""A small generation panel for notebooks (Jupyter and Colab).

The panel calls the same :func:`lora_helpers.generate.images.generate_images` as the notebook
cells and the command line, with the same cache, so a picture made here is the same
picture a script makes from its seed. Pictures are shown with an ``ipywidgets.Image``
(PNG bytes), which Colab renders without a custom widget manager; errors appear in
the panel's status line instead of vanishing inside a button callback.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import ipywidgets as W

from lora_helpers.core.config import smoke_mode
from lora_helpers.generate.images import GenerateConfig, GeneratedImage, generate_images, resolve_size, resolve_steps
from lora_helpers.core.grids import make_grid, save_png_with_metadata
from lora_helpers.core.png import png_bytes
from lora_helpers.generate.cache import ImageCache
from lora_helpers.generate.combine import LoraSet
from lora_helpers.generate.lora import LoraInfo

__all__ = ["GenerationPanel", "generation_panel"]

_MAX_SEED = 2**31 - 1


class GenerationPanel(W.VBox):
    """The panel widget; its controls are attributes so code (and tests) can drive it.

    Attributes:
        prompt, negative, seed, randomise, n_images, steps, guidance, scale, size,
        generate_button, save_button, image, status: the controls.
        last: the images of the last generation (list of GeneratedImage).
        last_picture: what is shown (one image or the grid).
        saved: paths written by Save.
    """

    def __init__(self, pipe, *, lora_info: LoraInfo | LoraSet | None = None, cache: ImageCache | None = None,
                 out_dir: str | os.PathLike = "outputs/panel", config: GenerateConfig | None = None):
        config = config or GenerateConfig()
        self.pipe = pipe
        self.lora_info = lora_info
        self.cache = cache
        self.out_dir = Path(out_dir)
        self.config = config
        self.last: list[GeneratedImage] = []
        self.last_picture = None
        self.saved: list[Path] = []

        trigger = lora_info.trigger if lora_info and lora_info.trigger else None
        people = list(getattr(lora_info, "subjects", None) or {})  # several people: {name} calls each
        wide = W.Layout(width="98%")
        self.prompt = W.Textarea(
            value="a photo of {subject}, natural light" if trigger or config.subject else
            "a photo of " + " and ".join("{" + p + "}" for p in people[:2]) + ", natural light" if people else
            "a photo of a person",
            description="Prompt", placeholder="one prompt per line; {subject} = the trigger phrase, {name} = one of "
                                              "several people",
            layout=W.Layout(width="98%", height="60px"))
        self.negative = W.Text(value=config.negative_prompt, description="Negative", layout=wide)
        self.seed = W.BoundedIntText(value=0, min=0, max=_MAX_SEED, description="Seed", layout=W.Layout(width="220px"))
        self.randomise = W.Button(description="Random seed", icon="random", layout=W.Layout(width="130px"))
        self.n_images = W.IntSlider(value=1, min=1, max=8, description="Images")
        self.steps = W.IntSlider(value=resolve_steps(config.steps), min=1, max=100, description="Steps")
        self.guidance = W.FloatSlider(value=config.guidance, min=1.0, max=15.0, step=0.5, description="Guidance")
        self.scale = W.FloatSlider(value=lora_info.scale if lora_info else 0.0, min=0.0, max=1.5, step=0.05,
                                   description="LoRA scale", disabled=lora_info is None)
        self.size = W.ToggleButtons(options=[512, 1024], value=1024 if (config.size or 1024) >= 1024 else 512,
                                    description="Size")
        self.generate_button = W.Button(description="Generate", button_style="primary", icon="play")
        self.save_button = W.Button(description="Save", icon="save", disabled=True)
        self.image = W.Image(format="png", layout=W.Layout(max_width="100%"))
        self.status = W.HTML(value=self._intro())

        self.randomise.on_click(self._on_randomise)
        self.generate_button.on_click(self._on_generate)
        self.save_button.on_click(self._on_save)
        super().__init__([
            self.prompt, self.negative,
            W.HBox([self.seed, self.randomise, self.n_images]),
            W.HBox([self.steps, self.guidance]),
            W.HBox([self.scale, self.size]),
            W.HBox([self.generate_button, self.save_button]),
            self.status, self.image,
        ])

    def _intro(self) -> str:
        people = getattr(self.lora_info, "subjects", None)
        who = ("base model only" if self.lora_info is None else
               f"LoRA <b>{self.lora_info.name}</b>, people " + ", ".join(
                   f"<code>{{{k}}}</code> = <code>{v}</code>" for k, v in people.items()) if people and not
               self.lora_info.trigger else f"LoRA <b>{self.lora_info.name}</b>, trigger <code>{self.lora_info.trigger}</code>")
        smoke = f" · smoke mode: every size is generated at {resolve_size(None)} px" if smoke_mode() else ""
        return f"<small>{who}{smoke}</small>"

    def request(self) -> tuple[list[str], list[int], GenerateConfig]:
        """The prompts, seeds and config the controls describe now."""
        prompts = [line.strip() for line in self.prompt.value.splitlines() if line.strip()]
        seeds = [(self.seed.value + i) % (_MAX_SEED + 1) for i in range(self.n_images.value)]
        config = GenerateConfig(
            negative_prompt=self.negative.value.strip(), size=int(self.size.value), steps=int(self.steps.value),
            guidance=float(self.guidance.value), lora_scale=float(self.scale.value) if self.lora_info else None,
            scheduler=self.config.scheduler, subject=self.config.subject, batch_size=self.config.batch_size)
        return prompts, seeds, config

    def _on_randomise(self, _button: Any = None) -> None:
        self.seed.value = random.SystemRandom().randint(0, _MAX_SEED)

    def _on_generate(self, _button: Any = None) -> None:
        self.generate_button.disabled = True
        self.status.value = "<i>generating…</i>"
        start = time.perf_counter()
        try:
            prompts, seeds, config = self.request()
            items = generate_images(self.pipe, prompts, seeds, config=config, lora_info=self.lora_info,
                                    cache=self.cache, progress=False)
            if len(items) == 1:
                picture = items[0].image
            else:
                picture = make_grid([it.image for it in items], rows=len(prompts), cols=len(seeds),
                                    row_labels=[it.prompt for it in items[:: len(seeds)]],
                                    col_labels=[f"seed {s}" for s in seeds])
            self.last, self.last_picture = items, picture
            self.image.value = png_bytes(picture)
            hits = sum(it.cached for it in items)
            self.status.value = (f"{len(items)} image(s), {items[0].params['width']} px, "
                                 f"{time.perf_counter() - start:.1f} s" + (f", {hits} from the cache" if hits else ""))
            self.save_button.disabled = False
        except Exception as exc:  # noqa: BLE001 - show every failure in the panel, not in a hidden log
            self.status.value = f"<span style='color:#b00'>error: {type(exc).__name__}: {exc}</span>"
        finally:
            self.generate_button.disabled = False

    def _on_save(self, _button: Any = None) -> None:
        if not self.last:
            self.status.value = "nothing to save yet: press Generate first"
            return
        try:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            paths = [it.save(self.out_dir / f"{stamp}_{i:02d}_seed{it.seed}.png") for i, it in enumerate(self.last)]
            if len(self.last) > 1:
                paths.append(save_png_with_metadata(self.out_dir / f"{stamp}_grid.png", self.last_picture,
                                                    {"images": [it.params for it in self.last]}))
            self.saved.extend(paths)
            self.status.value = f"saved {len(paths)} file(s) to {self.out_dir}"
        except Exception as exc:  # noqa: BLE001
            self.status.value = f"<span style='color:#b00'>could not save: {exc}</span>"


def generation_panel(pipe, *, lora_info: LoraInfo | LoraSet | None = None, cache: ImageCache | None = None,
                     out_dir: str | os.PathLike = "outputs/panel", config: GenerateConfig | None = None) -> GenerationPanel:
    """Build the panel: prompt, negative prompt, seed (+ random), steps, guidance, LoRA scale,
    size (512/1024), Generate, the picture (one image or a prompt × seed grid) and Save.

    Args:
        pipe: from :func:`lora_helpers.generate.pipeline.load_pipeline`.
        lora_info: the loaded LoRA, or several (:func:`lora_helpers.generate.combine.load_loras`; the slider
            scales all of them); None: base model, the scale slider is disabled.
        cache: an :class:`ImageCache` shared with the notebook (repeats are instant).
        out_dir: where Save writes PNGs with their parameters.
        config: starting values (negative prompt, steps, guidance, scheduler).

    Returns:
        The widget; display it as the last expression of a cell.
    """
    return GenerationPanel(pipe, lora_info=lora_info, cache=cache, out_dir=out_dir, config=config)
