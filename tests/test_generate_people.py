"""Several people at generation (tiny SDXL): placeholders, two LoRAs at their weights, runs of several people."""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_helpers.core.random_lora import make_random_lora
from lora_helpers.generate import (
    GenerateConfig, fill_subject, generate_images, load_lora, load_loras, load_pipeline, prompt_seed_grid, unload_lora,
)

CFG = GenerateConfig(size=64, steps=2)
TWO = "{ada} and {grace} at a cafe"


@pytest.fixture(scope="module")
def base_model(tiny_models) -> str:
    return str(tiny_models / "sdxl")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, base_model) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("people")
    return (make_random_lora(root / "Ada", base_model, seed=1, trigger="TOK1 person"),
            make_random_lora(root / "grace", base_model, seed=2, trigger="TOK2 person"))


@pytest.fixture(scope="module")
def pipe(base_model):
    return load_pipeline(base_model, device="cpu")


def _px(item) -> np.ndarray:
    return np.asarray(item.image, dtype=np.int16)


def _one(pipe, prompt, lora_info, **config) -> np.ndarray:
    from dataclasses import replace

    return _px(generate_images(pipe, prompt, 0, config=replace(CFG, **config), lora_info=lora_info, progress=False)[0])


def test_placeholders_name_each_person_and_subject_is_refused_with_several():
    people = {"ada": "TOK1 person", "grace": "TOK2 person"}
    assert fill_subject(TWO, None, people) == "TOK1 person and TOK2 person at a cafe"
    assert fill_subject("a photo of {subject}, {style}", "TOK person") == "a photo of TOK person, {style}"
    with pytest.raises(ValueError, match=r"several people: write \{ada\}, \{grace\}"):
        fill_subject("a photo of {subject}", None, people)
    with pytest.raises(ValueError, match=r"\{bob\}.*use \{ada\}, \{grace\}"):
        fill_subject("{bob} at a cafe", None, people)


def _merged_by_hand(files: list[Path], weights: list[float], out: Path) -> Path:
    """One LoRA equal to the weighted sum: ranks side by side, each up matrix scaled by its weight."""
    tensors = [load_file(f) for f in files]
    merged = {}
    for key in tensors[0]:
        if ".lora.down." in key:
            merged[key] = torch.cat([t[key] for t in tensors], dim=0)
        elif ".lora.up." in key:
            merged[key] = torch.cat([t[key] * w for t, w in zip(tensors, weights)], dim=1)
    assert len(merged) == len(tensors[0])
    save_file(merged, out)
    return out


def test_two_loras_mix_at_their_weights_and_switching_back_to_one_is_exact(pipe, runs, base_model, tmp_path):
    run_a, run_b = runs
    ada = load_lora(pipe, run_a, adapter_name="ada")
    alone_before, base_before = _one(pipe, "a photo of {subject}", ada), _one(pipe, "a photo of TOK1 person", None)

    both = load_loras(pipe, [run_a, run_b], weights=[0.8, 0.6])
    assert both.subjects == {"ada": "TOK1 person", "grace": "TOK2 person"}
    mixed = generate_images(pipe, TWO, 0, config=CFG, lora_info=both, progress=False)[0]
    assert mixed.prompt == "TOK1 person and TOK2 person at a cafe"
    assert "Ada/pytorch_lora_weights.safetensors + " in mixed.params["lora"]
    assert "Lora: pytorch_lora_weights.safetensors + pytorch_lora_weights.safetensors x1" in mixed.metadata()["parameters"]

    # the same picture from one hand-made LoRA holding 0.8 x Ada's change + 0.6 x Grace's
    hand = load_pipeline(base_model, device="cpu")
    hand.load_lora_weights(str(_merged_by_hand([r / "pytorch_lora_weights.safetensors" for r in runs], [0.8, 0.6],
                                               tmp_path / "merged.safetensors")))
    by_hand = hand(prompt=mixed.prompt, height=64, width=64, num_inference_steps=2, guidance_scale=CFG.guidance,
                   generator=torch.Generator("cpu").manual_seed(0)).images[0]
    assert np.abs(_px(mixed) - np.asarray(by_hand, dtype=np.int16)).max() <= 1
    # and not the picture of either alone at its weight, nor of other weights
    a_only = _one(pipe, mixed.prompt, both.loras[0], lora_scale=0.8)
    b_only = _one(pipe, mixed.prompt, both.loras[1], lora_scale=0.6)
    assert min(np.abs(_px(mixed) - a_only).mean(), np.abs(_px(mixed) - b_only).mean()) > 1
    both.weights = [0.8, 0.0]
    assert np.array_equal(_one(pipe, TWO, both), a_only)  # weight 0: as if the LoRA were not there
    both.weights = [0.8, 0.6]
    # back to one LoRA, and to the base model: exactly the pictures from before the second LoRA came
    assert np.array_equal(_one(pipe, "a photo of TOK1 person", both.loras[0], lora_scale=1.0), alone_before)
    assert np.array_equal(_one(pipe, "a photo of TOK1 person", None), base_before)
    with pytest.raises(ValueError, match=r"write \{ada\}, \{grace\}"):
        generate_images(pipe, "a photo of {subject}", 0, config=CFG, lora_info=both, progress=False)
    with pytest.raises(ValueError, match="2 weights for 3 LoRAs"):
        load_loras(pipe, [run_a, run_b, run_a], weights=[1, 1])
    unload_lora(pipe, both)
    assert not {a for names in pipe.get_list_adapters().values() for a in names}


def test_a_run_of_several_people_gives_one_grid_row_per_person(pipe, base_model, tmp_path):
    run = make_random_lora(tmp_path / "pair", base_model, seed=3)
    config = json.loads((run / "config.json").read_text())
    config.pop("trigger")
    config["subjects"] = {"ada": {"trigger": "TOK1 person", "class_noun": "person", "images": 6},
                          "grace": {"trigger": "TOK2 person", "class_noun": "person", "images": 2}}
    (run / "config.json").write_text(json.dumps(config))
    info = load_lora(pipe, run)
    assert info.trigger is None and info.subjects == {"ada": "TOK1 person", "grace": "TOK2 person"}
    grid = prompt_seed_grid(pipe, ["a photo of {subject}", TWO], [0], config=CFG, lora_info=info)
    assert grid.row_labels == ["a photo of TOK1 person", "a photo of TOK2 person", "TOK1 person and TOK2 person at a cafe"]
    with pytest.raises(ValueError, match=r"\{ada\}, \{grace\}"):
        generate_images(pipe, "a photo of {subject}", 0, config=CFG, lora_info=info, progress=False)
    unload_lora(pipe, info)


def test_cli_combines_two_runs_and_refuses_a_wrong_number_of_weights(runs, base_model, tmp_path, capsys,
                                                                    monkeypatch):
    from lora_helpers.cli import main
    from lora_helpers.generate import cli as generate_cli

    run_a, run_b = runs
    out = tmp_path / "out"
    code = main(["generate", str(run_a), "--also", str(run_b), "--weights", "0.8", "0.8", "--prompt", TWO,
                 "--size", "64", "--steps", "2", "--out", str(out), "--base-model", base_model, "--device", "cpu"])
    printed = capsys.readouterr().out
    assert code == 0 and "2 LoRAs: Ada x0.8 + grace x0.8" in printed
    (image,) = (out / "images").glob("*.png")
    assert "tok1-person-and-tok2-person" in image.name
    monkeypatch.setattr(generate_cli, "load_pipeline", mock.Mock(side_effect=AssertionError("model loaded")))
    code = main(["generate", str(run_a), "--also", str(run_b), "--weights", "0.8", "--prompt", TWO,
                 "--out", str(tmp_path / "out2")])
    err = capsys.readouterr().err
    assert code == 2 and "--weights: 1 given for 2 LoRAs" in err and "Traceback" not in err


def test_panel_with_two_loras_starts_with_both_placeholders_and_generates(pipe, runs):
    from lora_helpers.ui.generation_panel import generation_panel

    both = load_loras(pipe, list(runs), weights=[0.8, 0.8])
    panel = generation_panel(pipe, lora_info=both, config=CFG)
    assert panel.prompt.value == "a photo of {ada} and {grace}, natural light"
    assert "{ada}</code> = <code>TOK1 person" in panel.status.value
    panel.size.value = 512
    panel._on_generate()
    assert panel.last and panel.last[0].prompt == "a photo of TOK1 person and TOK2 person, natural light", \
        panel.status.value
    unload_lora(pipe, both)
