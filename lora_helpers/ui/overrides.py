"""Accept or reject any photo by hand; the choice is saved for the next preparation run."""

from __future__ import annotations

import ipywidgets as widgets

from lora_helpers.prepare.report import VERDICT_COLOURS
from lora_helpers.prepare.stage import read_overrides, write_overrides

__all__ = ["override_widgets"]


def override_widgets(result):
    """Dropdowns to accept or reject any photo; choices are saved to ``overrides.json``.

    Re-run :func:`lora_helpers.prepare.stage.prepare_photos` on the same folders afterwards:
    it reads the saved overrides.

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
        dropdown = widgets.Dropdown(options=["auto", "accept", "reject"], value=current.get(r.file, "auto"),
                                    layout=widgets.Layout(width="110px"))
        dropdown.observe(on_change(r.file), names="value")
        label = widgets.HTML(f"<b style='color:rgb{VERDICT_COLOURS[r.verdict]}'>{r.verdict}</b> {r.file}"
                             f"<br><small>{'; '.join(r.reasons)}</small>", layout=widgets.Layout(width="620px"))
        rows.append(widgets.HBox([dropdown, label]))
    # Under "Run all" the next cell runs before anyone can choose: say so, it is not a bug.
    header = widgets.HTML("<b>Choose accept or reject for any photo, then run the next cell.</b> "
                          "Choices are saved at once; under <i>Run all</i> the next cell has already used "
                          "the earlier ones, so run it again after choosing.")
    return widgets.VBox([header] + rows + [status])
