"""Accept or reject any photo by hand, or choose which are held out of training; with several people, rename a
person or move a photo to another; saved for the next run."""

from __future__ import annotations

import ipywidgets as widgets

from lora_helpers.prepare.report import HELD_OUT_COLOUR, VERDICT_COLOURS
from lora_helpers.prepare.stage import read_overrides, write_overrides
from lora_helpers.prepare.subjects import read_subject_overrides, write_subject_overrides

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

    With several people each person's name can be changed (saved as a rename in ``subjects.json``;
    two people given the same name become one) and each photo moved to another person (a new
    name makes a new person).

    Args:
        result: the :class:`lora_helpers.prepare.records.PrepareResult` to show.

    Returns:
        An ``ipywidgets.VBox``.
    """
    current = read_overrides(result.out_dir)
    status = widgets.Label("")
    rows = []
    people, person_of = _subject_widgets(result, status)

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
        rows.append(widgets.HBox([dropdown] + ([person_of[r.file]] if r.file in person_of else []) + [label]))
    # Under "Run all" the next cell runs before anyone can choose: say so, it is not a bug.
    header = widgets.HTML("<b>Choose accept or reject for any photo, or hold out / train on it, then run the next "
                          "cell.</b> Held-out photos are kept out of training so the likeness score sees a face the "
                          "LoRA never saw. Choices are saved at once; under <i>Run all</i> the next cell has already "
                          "used the earlier ones, so run it again after choosing.")
    return widgets.VBox([header] + people + rows + [status])


def _subject_widgets(result, status):
    """Rename fields, one per person, and a person field per photo; empty when the dataset has one person."""
    people = list(dict.fromkeys(r.subject for r in result.records if r.subject))
    if not people:
        return [], {}
    saved = read_subject_overrides(result.out_dir)

    def save(part, key):
        def handler(change):
            saved[part][key] = change["new"]  # "" clears it: read back as the automatic choice
            write_subject_overrides(result.out_dir, **saved)
            status.value = "saved to subjects.json; now run the next cell"
        return handler

    renames = []
    for person in people:
        # Keyed by the person's first photo: automatic names (person_1, ...) can shift as photos are added.
        first = next(r.file for r in result.records if r.subject == person)
        field = widgets.Text(value=person, description="person", layout=widgets.Layout(width="260px"))
        field.observe(save("names", first), names="value")
        renames.append(field)
    person_of = {}
    for r in result.records:
        box = widgets.Combobox(value=saved["photos"].get(r.file, ""), placeholder=r.subject or "whose photo?",
                               options=people, ensure_option=False, layout=widgets.Layout(width="140px"))
        box.observe(save("photos", r.file), names="value")
        person_of[r.file] = box
    header = widgets.HTML("<b>People</b>: rename one here (the same name for two merges them); move a photo to "
                          "another person in the box beside it.")
    return [header, widgets.HBox(renames)], person_of
