"""The Colab helpers and what the notebooks rely on in Colab: Drive, upload, GPU guard, the
8-bit AdamW fallback, the Hub check before training, checkpoints people can compare, and
overrides that redo only the photos they change."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from lora_helpers import colab
from lora_helpers.core import run_folder
from lora_helpers.train import checkpoints as ckpt
from lora_helpers.core.runtime import in_colab, workspace_dir

FAKE_COLAB = Path(__file__).resolve().parent / "fake_colab"


@pytest.fixture
def fake_colab(monkeypatch, tmp_path):
    """This process as a Colab kernel: google.colab imported, Drive mounted under tmp_path."""
    monkeypatch.syspath_prepend(str(FAKE_COLAB))
    for name in [m for m in sys.modules if m == "google.colab" or m.startswith("google.colab.")]:
        monkeypatch.delitem(sys.modules, name)
    module = importlib.import_module("google.colab")
    monkeypatch.setitem(sys.modules, "google.colab", module)
    monkeypatch.setenv("LORA_HELPERS_DRIVE", str(tmp_path / "drive"))
    monkeypatch.delenv("LORA_HELPERS_WORKSPACE", raising=False)
    monkeypatch.setenv("FAKE_COLAB_DOWNLOADS", str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("google.colab.")]:
        sys.modules.pop(name, None)


def test_not_colab_here():
    assert not in_colab()


def test_mount_drive_puts_the_workspace_on_drive(fake_colab, capsys):
    assert in_colab()
    workspace = colab.mount_drive()
    assert workspace == fake_colab / "drive" / "MyDrive" / "lora_helpers"
    assert "on Google Drive" in capsys.readouterr().out


def test_without_drive_the_workspace_is_local_and_says_it_is_lost_on_disconnect(fake_colab, monkeypatch, capsys):
    monkeypatch.chdir(fake_colab)
    workspace = colab.mount_drive(use_drive=False)
    assert not (fake_colab / "drive").exists() and workspace == fake_colab / "outputs"
    assert "lost when Colab disconnects" in capsys.readouterr().out


def test_a_repository_copy_on_drive_keeps_outputs_in_its_outputs_folder(fake_colab):
    repo_copy = fake_colab / "drive" / "MyDrive" / "lora_helpers"
    repo_copy.mkdir(parents=True)
    (repo_copy / "pyproject.toml").write_text('[project]\nname = "lora_helpers"\n')
    assert workspace_dir() == repo_copy / "outputs"


def test_upload_writes_photos_once_and_a_rerun_does_not_ask_again(fake_colab, sample_data, monkeypatch, capsys):
    photos = fake_colab / "drive" / "MyDrive" / "lora_helpers" / "photos"
    monkeypatch.setenv("FAKE_COLAB_UPLOADS", str(sample_data / "person"))
    got = colab.upload_photos(photos)
    sources = sorted((sample_data / "person").iterdir())
    assert [p.name for p in got] == [p.name for p in sources]
    assert all((photos / p.name).read_bytes() == p.read_bytes() for p in sources)
    assert "MyDrive/lora_helpers/photos" in capsys.readouterr().out  # says dropping into Drive works too

    # A second run (a re-run cell, "Run all" after a disconnect) does not open the upload box again.
    monkeypatch.setenv("FAKE_COLAB_UPLOADS", str(fake_colab / "nowhere"))
    again = colab.upload_photos(photos)
    assert len(again) == len(sources)
    assert "UPLOAD_MORE" in capsys.readouterr().out


def test_an_empty_upload_says_what_to_do(fake_colab, monkeypatch):
    monkeypatch.delenv("FAKE_COLAB_UPLOADS", raising=False)
    with pytest.raises(FileNotFoundError, match="no photos were uploaded.*copy photos into"):
        colab.upload_photos(fake_colab / "photos")


def test_upload_takes_heic_and_leaves_out_files_that_are_not_photos(fake_colab, monkeypatch, capsys):
    pillow_heif = pytest.importorskip("pillow_heif")
    uploads = fake_colab / "uploads"
    uploads.mkdir()
    heif = pillow_heif.from_pillow(Image.new("RGB", (64, 48), (200, 120, 40)))
    heif.save(str(uploads / "IMG_0001.HEIC"), quality=90)
    (uploads / "notes.txt").write_text("not a photo")
    monkeypatch.setenv("FAKE_COLAB_UPLOADS", str(uploads))
    got = colab.upload_photos(fake_colab / "photos")
    assert [p.name for p in got] == ["IMG_0001.HEIC"]
    assert "notes.txt" in capsys.readouterr().out

    from lora_helpers.core.images import load_image

    image = load_image(got[0])
    assert image.size == (64, 48) and abs(image.getpixel((10, 10))[0] - 200) < 20


def test_show_files_prints_absolute_drive_paths_and_downloads_in_colab(fake_colab, capsys):
    run = fake_colab / "drive" / "MyDrive" / "lora_helpers" / "run"
    run.mkdir(parents=True)
    lora = run / "pytorch_lora_weights.safetensors"
    lora.write_bytes(b"x" * 1000)
    shown = colab.show_files([lora], download=True)
    out = capsys.readouterr().out
    assert shown == [lora.resolve()] and str(lora.resolve()) in out
    assert "MyDrive/lora_helpers/run/pytorch_lora_weights.safetensors" in out
    assert (fake_colab / "downloads.txt").read_text().split() == [str(lora.resolve())]


def test_gpu_guard_stops_a_cpu_runtime_with_what_to_do(fake_colab, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    monkeypatch.setenv("LORA_HELPERS_SMOKE", "0")
    with pytest.raises(colab.GPURequiredError, match="04_generate_and_inspect needs a GPU.*Change runtime type > T4 GPU"):
        colab.require_gpu("04_generate_and_inspect")
    monkeypatch.setenv("LORA_HELPERS_SMOKE", "1")
    colab.require_gpu("04_generate_and_inspect")  # smoke mode: tiny models run on a CPU


def test_without_bitsandbytes_8bit_adamw_becomes_adamw_and_the_plan_counts_it(monkeypatch, capsys):
    from lora_helpers.train import TrainConfig, plan_memory
    from lora_helpers.train import resolve as train_config

    config = TrainConfig.from_preset("t4-8gb", mixed_precision="fp16", optimizer="adamw8bit")
    with_8bit = plan_memory(config, device_type="cuda")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails, as on a runtime without it
    train_config.bitsandbytes_problem.cache_clear()
    train_config._say_once.cache_clear()
    try:
        plan = plan_memory(config, device_type="cuda")
        resolved = train_config.resolve_config(config, "cuda")
    finally:
        train_config.bitsandbytes_problem.cache_clear()
        train_config._say_once.cache_clear()
    assert resolved.optimizer == "adamw"
    out = capsys.readouterr().out
    assert out.count("8-bit AdamW is not available") == 1 and "using AdamW instead" in out
    assert "optimizer state (adamw)" in str(plan)
    assert plan.train_peak_gb > with_8bit.train_peak_gb  # 8 bytes of state per weight instead of 2


def test_a_hub_push_that_cannot_work_stops_training_before_anything_loads(tmp_path, monkeypatch):
    import huggingface_hub

    from lora_helpers.train import TrainConfig, train

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    config = TrainConfig.from_preset("cpu-smoke", hub_repo_id="someone/tok-person")
    with pytest.raises(PermissionError, match="someone/tok-person needs a Hugging Face token.*HF_TOKEN"):
        train(tmp_path / "dataset", tmp_path / "run", config=config)
    assert not (tmp_path / "run").exists()


def test_offline_a_hub_push_is_announced_as_skipped_up_front(capsys, monkeypatch):
    from lora_helpers.train.outputs import check_hub_access

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert check_hub_access("someone/tok-person") is None
    assert "will not be pushed" in capsys.readouterr().out


def _fake_checkpoint(run: Path, step: int) -> Path:
    def write_lora(folder: Path) -> None:
        save_file({"w": torch.full((2, 2), float(step))}, str(folder / run_folder.LORA_WEIGHT_NAME))

    return ckpt.save_checkpoint(run, step, write_lora=write_lora, optimizer_state={"s": step},
                                training_state={"step": step}, summary={"step": step})


def test_pruning_keeps_every_checkpoints_lora_and_only_the_newest_resume_state(tmp_path):
    for step in (10, 20, 30, 40):
        _fake_checkpoint(tmp_path, step)
    pruned = ckpt.prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in pruned] == ["checkpoint-10", "checkpoint-20"]
    assert [p.name for p in run_folder.list_checkpoints(tmp_path, resumable=False)] == [
        "checkpoint-10", "checkpoint-20", "checkpoint-30", "checkpoint-40"]
    assert [p.name for p in run_folder.list_checkpoints(tmp_path)] == ["checkpoint-30", "checkpoint-40"]
    for p in pruned:
        assert sorted(f.name for f in p.iterdir()) == [run_folder.LORA_WEIGHT_NAME, "training_state.json"]
    assert ckpt.find_checkpoint(tmp_path, "latest").name == "checkpoint-40"
    with pytest.raises(FileNotFoundError, match="training state was pruned.*checkpoint-30, checkpoint-40"):
        ckpt.find_checkpoint(tmp_path, 10)

    assert [step for step, _ in run_folder.find_checkpoints(tmp_path)] == [10, 20, 30, 40]  # 04 and 05 see the whole run


def test_evaluation_scores_the_final_lora_and_the_identical_last_checkpoint_once(tmp_path):
    from lora_helpers.evaluate.run import _run_checkpoints

    for step in (10, 20):
        _fake_checkpoint(tmp_path, step)
    # The final file holds the last checkpoint's weights but its bytes differ (header order, metadata).
    save_file({"w": torch.full((2, 2), 20.0)}, str(tmp_path / run_folder.LORA_WEIGHT_NAME), metadata={"trigger": "TOK person"})
    assert (tmp_path / run_folder.LORA_WEIGHT_NAME).read_bytes() != (tmp_path / "checkpoints/checkpoint-20" / run_folder.LORA_WEIGHT_NAME).read_bytes()
    found = _run_checkpoints(tmp_path, "all")
    assert [(name, step) for name, step, _ in found] == [("checkpoint-10", 10), ("final", 20)]


def test_an_override_redoes_only_the_photo_it_changes(tmp_path, sample_data, monkeypatch):
    from lora_helpers.prepare import photo
    from lora_helpers.prepare import stage as prepare

    calls = []
    real = photo.process_photo

    def counting(path, *args, **kwargs):
        calls.append(path.name)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(photo, "process_photo", counting)
    photos = sorted((sample_data / "person").iterdir())[:4]
    config = prepare.PrepareConfig(resolution=64)
    first = prepare.prepare_photos(photos, tmp_path / "dataset", config=config, progress=False)
    assert len(calls) == 4
    calls.clear()
    prepare.write_overrides(tmp_path / "dataset", {photos[1].name: "reject"})
    second = prepare.prepare_photos(photos, tmp_path / "dataset", config=config, progress=False, previous=first)
    assert calls == [photos[1].name]
    assert second.record(photos[1].name).verdict == "reject" and second.reused == 3
    assert [r.verdict for r in second.records if r.file != photos[1].name] == \
        [r.verdict for r in first.records if r.file != photos[1].name]
    assert not (tmp_path / "dataset" / "images" / f"{photos[1].stem}.png").exists()
    # Same result as doing everything again.
    calls.clear()
    fresh = prepare.prepare_photos(photos, tmp_path / "dataset", config=config, progress=False)
    assert len(calls) == 4
    assert [(r.file, r.verdict, r.reasons) for r in fresh.records] == [(r.file, r.verdict, r.reasons) for r in second.records]


def test_stage_inputs_name_the_notebook_to_run_first(tmp_path, monkeypatch):
    from lora_helpers.stage_inputs import stage_input

    monkeypatch.setenv("LORA_HELPERS_SMOKE", "0")
    with pytest.raises(FileNotFoundError, match="run 01_prepare_photos first"):
        stage_input("dataset", tmp_path / "dataset")
    with pytest.raises(FileNotFoundError, match="run 03_train_lora first"):
        stage_input("run", tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="no photos in .*upload them"):
        stage_input("photos", tmp_path / "photos")
    monkeypatch.setenv("LORA_HELPERS_SMOKE", "1")
    assert stage_input("photos", tmp_path / "photos").name == "person"  # the sample photos stand in
