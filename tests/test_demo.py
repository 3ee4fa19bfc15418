"""The README's main job: the whole pipeline on sample_data/ in smoke mode."""

from __future__ import annotations

import json

from PIL import Image

from lora_helpers.demo import DemoConfig, run_demo


def test_demo_runs_every_stage(tmp_path, sample_data, monkeypatch):
    monkeypatch.setenv("LORA_HELPERS_SMOKE", "1")
    lines: list[str] = []
    result = run_demo(DemoConfig(photos=sample_data / "person", out_dir=tmp_path / "demo", steps=4), log=lines.append)

    assert result.smoke
    assert set(result.seconds) == {"prepare", "caption", "train", "generate", "evaluate"}
    dataset = tmp_path / "demo" / "dataset"
    rows = [json.loads(line) for line in (dataset / "metadata.jsonl").read_text().splitlines()]
    assert len(rows) == len(list((sample_data / "person").glob("*.jpg")))
    assert all("TOK person" in row["text"] for row in rows)
    for key in ("lora", "kohya", "grid:prompt-seed", "grid:scale", "grid:checkpoints", "evaluation:scores"):
        assert result.outputs[key].exists(), key
    grid = Image.open(result.outputs["grid:prompt-seed"])
    assert grid.width > 2 * 64 and grid.height > 3 * 64  # 3 prompts x 2 seeds, with labels
    config = json.loads((tmp_path / "demo" / "run" / "config.json").read_text())
    assert config["trigger"] == "TOK person"
    # Every stage prints where its output went; the photo kept for the likeness score is counted.
    assert any(str(result.outputs["lora"]) in line for line in lines)
    held = [r["file_name"] for r in rows if r.get("held_out")]
    assert held and any(f"({len(held)} held out of training for the likeness score)" in line for line in lines)
