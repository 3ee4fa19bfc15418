"""Accept or reject any photo by hand, or choose which are held out of training; saved for the next run."""

from __future__ import annotations

import ipywidgets as widgets

from lora_helpers.prepare.report import HELD_OUT_COLOUR, VERDICT_COLOURS
from lora_helpers.prepare.stage import read_overrides, write_overrides

__all__ = ["override_widgets"]

# (label, overrides.json value)
_CHOICES = [("auto", "auto"), ("accept", "accept"), ("reject", "reject"), ("hold out", "hold_out"),
            ("train on it", "train")]


def override_widgets(result):
    """Dropdowns to accept, reject, hold out or train on any photo; choices are saved to ``overrides.json``.

    "hold out" keeps a usable photo out of training for the held-out likeness score; "train on
    it" keeps it in training whatever the automatic choice (``PrepareConfig.hold_out=0`` holds
    none out). Re-run :func:`lora_helpers.prepare.stage.prepare_photos` on the same folders
    afterwards: it reads the saved overrides.

    Args:
        result: the :class:`lora_helpers.prepare.records.PrepareResult` to show.

    Returns:
        An ``ipywidgets.VBox``.
    """
    current = read_overrides(result.out_dir)
    status = widgets.Label("")
    rows = []

    def on_change(name):
        def handler(change):
            if change["new"] == "auto":
                current.pop(name, None)
            else:
                current[name] = change["new"]
            write_overrides(result.out_dir, current)
            status.value = f"saved {len(current)} override(s) to overrides.json; now run the next cell"
        return handler

    for r in result.records:
        dropdown = widgets.Dropdown(options=_CHOICES, value=current.get(r.file, "auto"),
                                    layout=widgets.Layout(width="120px"))
        dropdown.observe(on_change(r.file), names="value")
        held = (f" <b style='color:rgb{HELD_OUT_COLOUR}'>held out</b>" if r.accepted and r.held_out else "")
        label = widgets.HTML(f"<b style='color:rgb{VERDICT_COLOURS[r.verdict]}'>{r.verdict}</b>{held} {r.file}"
                             f"<br><small>{'; '.join(r.reasons)}</small>", layout=widgets.Layout(width="620px"))
        rows.append(widgets.HBox([dropdown, label]))
    # Under "Run all" the next cell runs before anyone can choose: say so, it is not a bug.
    header = widgets.HTML("<b>Choose accept or reject for any photo, or hold out / train on it, then run the next "
                          "cell.</b> Held-out photos are kept out of training so the likeness score sees a face the "
                          "LoRA never saw. Choices are saved at once; under <i>Run all</i> the next cell has already "
                          "used the earlier ones, so run it again after choosing.")
    return widgets.VBox([header] + rows + [status])
