"""ipywidgets panels for the notebooks: the caption editor, photo overrides, the generation panel."""

from lora_helpers.ui.caption_editor import caption_editor
from lora_helpers.ui.generation_panel import GenerationPanel, generation_panel
from lora_helpers.ui.overrides import override_widgets

__all__ = ["caption_editor", "GenerationPanel", "generation_panel", "override_widgets"]
