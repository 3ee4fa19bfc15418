"""Training refuses what would silently go wrong or lose work, in one line without a traceback:
a resume with changed settings or data, damaged or missing checkpoints, a second training in the
same run folder, a run folder that cannot be written, and a disk that fills up while saving."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_helpers import make_dataset

from lora_helpers.cli import main
from lora_helpers.core import run_folder
from lora_helpers.train import CheckpointError, ResumeSettingsError, RunWriteError, TrainConfig, train
from lora_helpers.train import checkpoints as ckpt

REPO = Path(__file__).resolve().parents[1]


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


def test_another_process_count_is_a_change_even_for_checkpoints_that_did_not_record_it(tmp_path):
    from lora_helpers.train.resume import check_resume

    cfg = _config(Path("/models"))
    state = {"step": 2, "config": {"learning_rate": cfg.learning_rate}, "dataset": []}
    old = tmp_path / "checkpoint-2"
    old.mkdir()
    for i in range(2):  # written before the count was recorded: one RNG file per process
        (old / f"rng_state_{i}.pt").write_bytes(b"")
    with pytest.raises(ResumeSettingsError, match=r"processes \(torchrun --nproc_per_node, accelerate launch "
                                                  r"--num_processes\) 2 -> 1.*--accept-changes"):
        check_resume(old, state, cfg, [], run_dir=tmp_path, accept_changes=False, processes=1)
    assert check_resume(old, state, cfg, [], run_dir=tmp_path, accept_changes=False, processes=2)["changed"] == {}
    record = check_resume(old, {**state, "processes": 4}, cfg, [], run_dir=tmp_path, accept_changes=True, processes=2)
    assert record["changed"] == {"processes": [4, 2]}


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


# ----------------------------------------------------------------------------- one training per run folder


def test_a_second_training_in_the_same_run_folder_stops_at_once_naming_the_other(run, dataset, tiny_models, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom lora_helpers.core.run_lock import lock_run_folder\n"
                               f"with lock_run_folder({str(run)!r}):\n    print('locked', flush=True)\n"
                               "    sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(run)
        code, err = _cli(capsys, dataset, run, tiny_models, "--steps", "5", "--resume", "latest")
        line = _error_line(err)
        assert code == 1 and f"{run} is in use: training by process {holder.pid} since" in line
        assert f"lock file {run / run_folder.LOCK_FILE}" in line
        assert _snapshot(run) == before
    finally:
        holder.communicate("", timeout=60)
    assert holder.returncode == 0 and not (run / run_folder.LOCK_FILE).exists()  # released on exit


def test_a_stale_lock_is_taken_over_with_a_note(run, dataset, tiny_models, capsys):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(gone.stdout)
    (run / run_folder.LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname(),
                                                        "purpose": "training", "since": "2026-01-01T00:00:00"}))
    result = train(dataset, run, config=_config(tiny_models), resume="latest")
    assert result.steps == 3
    assert f"taking over the lock of training by process {pid} since 2026-01-01T00:00:00" in capsys.readouterr().out
    assert not (run / run_folder.LOCK_FILE).exists()


def test_the_lock_is_released_when_training_fails(run, dataset, tiny_models):
    with pytest.raises(ResumeSettingsError):
        train(dataset, run, config=_config(tiny_models, seed=7), resume="latest")
    assert not (run / run_folder.LOCK_FILE).exists()
    train(dataset, run, config=_config(tiny_models), resume="latest")  # the folder is free again


# ----------------------------------------------------------------------------- the run folder and the disk


def test_a_read_only_run_folder_is_refused_before_the_models_load(dataset, tiny_models, tmp_path, capsys, monkeypatch):
    def read_only(*args, dir=None, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", dir)

    monkeypatch.setattr(run_folder.tempfile, "mkstemp", read_only)
    code, err = _cli(capsys, dataset, tmp_path / "run", tiny_models)
    assert code == 1
    assert _error_line(err) == (f"error: {tmp_path / 'run'}: cannot be written (Permission denied); choose a folder "
                                "you can write to")
    assert not (tmp_path / "run" / "cache").exists()


@pytest.mark.parametrize("where", ["run", "file/run"])
def test_a_file_where_the_run_folder_should_be_is_refused(dataset, tiny_models, tmp_path, capsys, where):
    (tmp_path / where.split("/")[0]).write_text("notes")
    code, err = _cli(capsys, dataset, tmp_path / where, tiny_models)
    assert code == 1 and _error_line(err).startswith(f"error: {tmp_path / where.split('/')[0]}: a file stands where")
    assert (tmp_path / where.split("/")[0]).read_text() == "notes"


def test_too_little_free_space_is_refused_before_the_models_load(dataset, tiny_models, tmp_path, capsys,
                                                                 monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(run_folder.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5 * 10**6, 5 * 10**6))
    code, err = _cli(capsys, dataset, tmp_path / "run", tiny_models)
    line = _error_line(err)
    assert code == 1 and line.startswith(f"error: {tmp_path / 'run'}: only 5 MB free on its disk")
    assert "free some space or choose a folder on another disk" in line
    assert not (tmp_path / "run" / "cache").exists()


@pytest.mark.parametrize("failure, says", [
    (OSError(errno.ENOSPC, "No space left on device"), "the disk is full"),
    (RuntimeError("[enforce fail at inline_container.cc:626] . PytorchStreamWriter failed writing file data/0: "
                  "file write failed"), "writing failed (a full disk?)"),
])
def test_a_full_disk_while_saving_a_checkpoint_keeps_the_earlier_ones(dataset, tiny_models, tmp_path, capsys,
                                                                      monkeypatch, failure, says):
    real_save, calls = torch.save, {"n": 0}

    def save(obj, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:  # checkpoint-1 (optimizer, RNG, training state) fits; checkpoint-2 does not
            Path(path).write_bytes(b"half")
            raise failure
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    run = tmp_path / "run"
    code, err = _cli(capsys, dataset, run, tiny_models, "--steps", "3")
    line = _error_line(err)
    assert code == 1
    assert line.startswith(f"error: could not write {run / 'checkpoints' / 'checkpoint-2'}: {says}")
    assert "Earlier checkpoints are intact (checkpoint-1)" in line and "--resume latest" in line
    assert ckpt.list_checkpoints(run) == [run / "checkpoints" / "checkpoint-1"]
    assert ckpt.checkpoint_problem(run / "checkpoints" / "checkpoint-1") is None
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-1"]  # no half-written folder
    assert [json.loads(r)["step"] for r in (run / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_a_full_disk_while_writing_the_final_files_says_what_is_intact(run, dataset, tiny_models, monkeypatch):
    from lora_helpers.train import outputs

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(run / "README.md"))

    monkeypatch.setattr(outputs, "write_model_card", full)
    with pytest.raises(RunWriteError, match=r"at step 3: the disk is full.*newest checkpoint is intact "
                                            r"\(checkpoint-3\)"):
        train(dataset, run, config=_config(tiny_models), resume="latest")


@pytest.mark.parametrize("flag, value, says", [
    ("--seed", "99999999999999999999",
     "seed must be whole numbers from 0 to 2**64-1 (e.g. 0), not 99999999999999999999"),
    ("--rank", "0", "lora_rank must be at least 1 (e.g. 16), not 0"),
    ("--batch-size", "0", "train_batch_size must be at least 1 (e.g. 1), not 0"),
])
def test_cli_names_a_setting_out_of_range_before_anything_is_written(dataset, tiny_models, tmp_path, capsys, flag,
                                                                     value, says):
    code, err = _cli(capsys, dataset, tmp_path / "run", tiny_models, flag, value)
    assert code == 2 and _error_line(err) == f"error: {says}"
    assert not (tmp_path / "run").exists()
