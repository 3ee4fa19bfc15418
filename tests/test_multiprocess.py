"""Two CPU processes (gloo), launched as ``torchrun`` launches several GPUs: one voice, a mean loss, an exact resume.

``torchrun --redirects 3`` keeps each process's output in its own files, so the tests see what the
second process printed: nothing. The run stopped after its checkpoint is this file run by torchrun
(``__main__`` below): every process is interrupted after the checkpoint, as the stop button or a
lost runtime would.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_dataset

from lora_helpers.cli import build_parser
from lora_helpers.core.run_lock import lock_run_folder
from lora_helpers.train import ResumeSettingsError, train
from lora_helpers.train.stage import _config_from_args

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--preset", "cpu-smoke", "--device", "cpu", "--validate-every", "0", "--checkpoint-every", "2",
          "--lr-scheduler", "constant"]


def _torchrun(root: Path, name: str, *args: str, script: bool = False) -> tuple[int, dict[int, str]]:
    """Launch ``train`` (or this file) on two processes; (exit code, each process's stdout + stderr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_HELPERS_SMOKE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    logs = root / "logs" / name
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--log-dir", str(logs), "--redirects", "3", *([__file__] if script else ["-m", "lora_helpers", "train"]),
           *args]
    result = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    output = {rank: "".join(p.read_text() for p in sorted(logs.rglob(f"attempt_*/{rank}/std*.log")))
              for rank in (0, 1)}
    assert output[0], result.stdout[-3000:] + result.stderr[-3000:]  # the launch itself failed
    return result.returncode, output


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("multiprocess")
    make_dataset(root / "ds")
    common = [*COMMON, "--model", str(tiny_models / "sdxl"), "--steps", "4"]
    launches = {"straight": _torchrun(root, "straight", "ds", "straight", *common)}
    # stopped after its checkpoint at step 2 (every process interrupted), then resumed to step 4
    launches["stopped"] = _torchrun(root, "stopped", "ds", "resumed", *common, script=True)
    stopped_at = sorted(p.name for p in (root / "resumed" / "checkpoints").iterdir())
    launches["resumed"] = _torchrun(root, "resumed", "ds", "resumed", *common, "--resume", "latest")
    return root, launches, stopped_at


def test_one_process_speaks_and_logs_the_mean_loss(runs):
    root, launches, _ = runs
    code, output = launches["straight"]
    assert code == 0, output[0][-3000:]
    out = output[0]
    assert out.count("done: 4 steps") == 1, out[-2000:]
    assert out.count("LoRA: straight/pytorch_lora_weights.safetensors") == 1
    assert out.count("memory plan for") == 1
    # the other process printed nothing: no lines, no loading bars, no library warnings
    for name, (_, output) in launches.items():
        assert output[1] == "", f"{name}, second process:\n{output[1][-3000:]}"
    rows = _log(root / "straight")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        per_process = row["process_losses"]
        assert len(per_process) == 2
        assert row["loss"] == pytest.approx(sum(per_process) / 2, rel=1e-9)
    # each process trained on its own batch, so their losses differ
    assert any(abs(r["process_losses"][0] - r["process_losses"][1]) > 1e-6 for r in rows)
    final = float(out.split("final loss ")[1].split(",")[0])
    assert final == pytest.approx(sum(r["loss"] for r in rows) / len(rows), abs=1e-4)
    assert sorted(p.name for p in (root / "straight" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    # one writer: the main process put both processes' random states into the checkpoint
    assert sorted(p.name for p in (root / "straight" / "checkpoints" / "checkpoint-2").glob("rng_state_*")) == [
        "rng_state_0.pt", "rng_state_1.pt"]


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(runs):
    root, launches, stopped_at = runs
    code, output = launches["stopped"]
    assert code != 0 and stopped_at == ["checkpoint-2"], output[0][-3000:]
    assert output[0].count("interrupted at step 2; resume from checkpoint-2") == 1, output[0][-3000:]
    code, output = launches["resumed"]
    assert code == 0, output[0][-3000:]
    assert "resumed from checkpoint-2" in output[0]
    a = load_file(root / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(root / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [r["loss"] for r in _log(root / "straight")] == pytest.approx([r["loss"] for r in _log(root / "resumed")],
                                                                        rel=1e-5)


def test_a_locked_run_folder_stops_every_process(runs, tiny_models):
    root = runs[0]
    (root / "locked").mkdir()
    with lock_run_folder(root / "locked", purpose="a test"):
        code, output = _torchrun(root, "locked", "ds", "locked", "--preset", "cpu-smoke", "--model",
                                 str(tiny_models / "sdxl"), "--device", "cpu", "--steps", "2")
    # both processes stop (none waits for the other at a barrier); the refusal is said once
    assert code != 0
    errors = [line for line in output[0].splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"is in use: a test by process {os.getpid()}" in errors[0], output[0][-3000:]
    assert output[1] == ""
    assert not (root / "locked" / "checkpoints").exists()


def test_one_process_does_not_silently_continue_a_two_process_checkpoint(runs, tiny_models):
    root = runs[0]
    shutil.copytree(root / "straight", root / "one")
    args = build_parser().parse_args(["train", "ds", "one", *COMMON, "--model", str(tiny_models / "sdxl"),
                                      "--steps", "6"])
    cfg = _config_from_args(args)
    with pytest.raises(ResumeSettingsError, match=r"processes \(.*\) 2 -> 1"):
        train(root / "ds", root / "one", config=cfg, resume="latest")
    assert sorted(p.name for p in (root / "one" / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    train(root / "ds", root / "one", config=cfg, resume="latest", accept_changes=True)
    resumes = json.loads((root / "one" / "config.json").read_text())["resumes"]
    assert resumes[-1]["changed"] == {"processes": [2, 1]}
    assert "processes 2 -> 1" in (root / "one" / "README.md").read_text()


class _StopAfterCheckpoint:
    """Interrupts every process after the first checkpoint."""

    main_process_only = False

    def on_checkpoint(self, step: int, folder: Path) -> None:
        raise KeyboardInterrupt


if __name__ == "__main__":  # under torchrun: `train` with the command line's settings, stopped after a checkpoint
    args = build_parser().parse_args(["train", *sys.argv[1:]])
    try:
        train(args.dataset_dir, args.run_dir, config=_config_from_args(args), listeners=[_StopAfterCheckpoint()])
    except KeyboardInterrupt:
        raise SystemExit(130)
