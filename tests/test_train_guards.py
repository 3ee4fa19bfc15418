"""Training refuses what would silently go wrong or lose work, in one line without a traceback:
a resume with changed settings or data, and damaged or missing checkpoints."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from PIL import Image
from train_helpers import make_dataset

from lora_helpers.cli import main
from lora_helpers.core import run_folder
from lora_helpers.train import CheckpointError, ResumeSettingsError, TrainConfig, train
from lora_helpers.train import checkpoints as ckpt

def _config(tiny_models, **overrides) -> TrainConfig:
    base = dict(model=str(tiny_models / "sdxl"), max_train_steps=3, checkpointing_steps=1, validation_steps=0,
                validation_prompts=(), lr_scheduler="constant", progress=False)
    return TrainConfig.from_preset("cpu-smoke", **{**base, **overrides})


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="module")
def base_run(dataset, tiny_models, tmp_path_factory) -> Path:
    """Three steps with a checkpoint after each: checkpoint-1, -2 and -3 can all be resumed from."""
    run = tmp_path_factory.mktemp("base") / "run"
    train(dataset, run, config=_config(tiny_models))
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def _snapshot(folder: Path) -> dict[str, str]:
    """SHA-256 of every file under ``folder`` (the lock file left out)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != run_folder.LOCK_FILE}


def _cli(capsys, dataset, run, tiny_models, *args) -> tuple[int, str]:
    code = main(["train", str(dataset), str(run), "--model", str(tiny_models / "sdxl"), "--preset", "cpu-smoke",
                 "--validate-every", "0", "--checkpoint-every", "1", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    return lines[0]


# ----------------------------------------------------------------------------- resume honesty


def test_a_resume_with_changed_settings_or_data_is_refused_naming_each_change(run, dataset, tiny_models, tmp_path,
                                                                              capsys):
    data = Path(shutil.copytree(dataset, tmp_path / "dataset"))
    photo = data / "images" / "astronaut_01.png"
    image = Image.open(photo).convert("RGB")
    image.putpixel((0, 0), (255, 0, 0))
    image.save(photo)
    before = _snapshot(run)
    code, err = _cli(capsys, data, run, tiny_models, "--steps", "4", "--resume", "latest", "--lr", "5e-4",
                     "--batch-size", "2")
    line = _error_line(err)
    assert code == 1
    assert "checkpoint-3 was trained with other settings" in line
    assert "learning_rate (--lr) 0.001 -> 0.0005" in line and "train_batch_size (--batch-size) 1 -> 2" in line
    assert "dataset: 1 image or mask changed (images/astronaut_01.png)" in line and "--accept-changes" in line
    assert _snapshot(run) == before  # config.json, the log, the cache and every checkpoint untouched


def test_an_accepted_change_is_used_and_recorded_in_config_and_model_card(run, dataset, tiny_models):
    result = train(dataset, run, config=_config(tiny_models, max_train_steps=5, learning_rate=5e-4),
                   resume="latest", accept_changes=True)
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in rows] == pytest.approx([1e-3] * 3 + [5e-4] * 2)  # the new rate was really used
    config = json.loads(result.config_path.read_text())
    assert config["config"]["learning_rate"] == 5e-4
    assert config["resumes"] == [{"from": "checkpoints/checkpoint-3", "step": 3,
                                  "changed": {"learning_rate": [1e-3, 5e-4]}}]
    card = (run / "README.md").read_text()
    assert "| resumed | at step 3 from `checkpoints/checkpoint-3`" in card and "learning_rate 0.001 -> 0.0005" in card
    # the next resume knows the line of changes from the checkpoint itself
    assert ckpt.read_training_state(run / "checkpoints" / "checkpoint-5")["resumes"] == config["resumes"]


def test_a_changed_lora_shape_is_refused_even_when_changes_are_accepted(run, dataset, tiny_models):
    before = _snapshot(run)
    with pytest.raises(ResumeSettingsError, match=r"lora_rank \(--rank\) 4 -> 8: its LoRA weights have the old shape"):
        train(dataset, run, config=_config(tiny_models, lora_rank=8), resume="latest", accept_changes=True)
    assert _snapshot(run) == before


def test_a_dataset_change_is_described_file_by_file():
    from lora_helpers.train.resume import resume_changes

    cfg = _config(Path("/models"))
    old = [{"file_name": f"images/{n}.png", "sha256": n, "mask_sha256": None, "caption_sha256": n} for n in "abc"]
    new = [dict(old[0], caption_sha256="edited"), old[1], {"file_name": "images/d.png", "sha256": "d",
                                                            "mask_sha256": None, "caption_sha256": "d"}]
    changes = resume_changes({"learning_rate": cfg.learning_rate}, old, cfg, new)
    assert changes == {"dataset": (None, "1 caption changed (images/a.png); 1 image added (images/d.png); "
                                         "1 image gone (images/c.png)")}
    assert resume_changes({"learning_rate": cfg.learning_rate}, old, cfg, old) == {}


# ----------------------------------------------------------------------------- damaged and missing checkpoints


def _damage(folder: Path, how: str) -> str:
    if how == "truncated LoRA":
        lora = folder / run_folder.LORA_WEIGHT_NAME
        lora.write_bytes(lora.read_bytes()[:1000])
        return f"{run_folder.LORA_WEIGHT_NAME} cannot be read"
    if how == "missing optimizer":
        (folder / "optimizer.pt").unlink()
        return "optimizer.pt is missing"
    (folder / "training_state.pt").write_bytes(b"garbage\n" * 10)
    return "training_state.pt cannot be read"


@pytest.mark.parametrize("how", ["truncated LoRA", "missing optimizer", "garbage training state"])
def test_resume_latest_skips_a_damaged_newest_checkpoint(run, dataset, tiny_models, capsys, how):
    reason = _damage(run / "checkpoints" / "checkpoint-3", how)
    before = _snapshot(run / "checkpoints")
    result = train(dataset, run, config=_config(tiny_models), resume="latest")
    out = capsys.readouterr().out
    assert f"resuming from checkpoint-2, the newest good checkpoint (skipped: checkpoint-3: {reason}" in out
    assert result.steps == 3 and ckpt.checkpoint_problem(run / "checkpoints" / "checkpoint-3") is None
    after = _snapshot(run / "checkpoints")
    earlier = {k: v for k, v in before.items() if not k.startswith("checkpoint-3/")}
    assert {k: after[k] for k in earlier} == earlier  # checkpoint-1 and -2 byte for byte


def test_a_damaged_checkpoint_named_explicitly_is_refused_naming_the_good_ones(run, dataset, tiny_models, capsys):
    _damage(run / "checkpoints" / "checkpoint-2", "missing optimizer")
    before = _snapshot(run)
    for which in ("2", str(run / "checkpoints" / "checkpoint-2")):
        code, err = _cli(capsys, dataset, run, tiny_models, "--steps", "3", "--resume", which)
        assert code == 1
        assert _error_line(err) == (f"error: {run / 'checkpoints' / 'checkpoint-2'} is damaged: optimizer.pt is "
                                    f"missing; good checkpoints to resume from in {run}: checkpoint-1, checkpoint-3")
    assert _snapshot(run) == before
    with pytest.raises(CheckpointError, match="no checkpoint in .* can be resumed from: checkpoint-3: "
                                              "training_state.pt cannot be read.*checkpoint-2: optimizer.pt"):
        _damage(run / "checkpoints" / "checkpoint-3", "garbage training state")
        _damage(run / "checkpoints" / "checkpoint-1", "truncated LoRA")
        ckpt.find_checkpoint(run, "latest")


@pytest.mark.parametrize("which, says", [
    ("7", "checkpoint-7: no such checkpoint"),
    ("/no/such/checkpoint", "'/no/such/checkpoint' is none of these (no such folder)"),
    ("lastest", "'lastest' is none of these"),
    ("-2", "'-2' is none of these"),
])
def test_resume_of_a_missing_checkpoint_or_a_bad_value_names_the_checkpoints_that_exist(run, dataset, tiny_models,
                                                                                        capsys, which, says):
    before = _snapshot(run)
    code, err = _cli(capsys, dataset, run, tiny_models, "--resume", which)
    line = _error_line(err)
    assert code == 1 and says in line
    assert line.endswith(f"checkpoints to resume from in {run}: checkpoint-1, checkpoint-2, checkpoint-3")
    assert _snapshot(run) == before


def test_resume_values_are_checked_before_anything_is_written(dataset, tiny_models, tmp_path):
    with pytest.raises(CheckpointError, match="not -3"):
        train(dataset, tmp_path / "run", config=_config(tiny_models), resume=-3)
    assert not (tmp_path / "run").exists()
