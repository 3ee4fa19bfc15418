"""Two CPU processes (gloo), launched as ``torchrun`` launches several GPUs: one voice, a mean loss, an exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import make_dataset


def _torchrun(*args: str, cwd) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "LORA_HELPERS_SMOKE": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lora_helpers", "train", *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _log(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    root = tmp_path_factory.mktemp("multiprocess")
    make_dataset(root / "ds")
    common = ["--preset", "cpu-smoke", "--model", str(tiny_models / "sdxl"), "--device", "cpu", "--validate-every", "0",
              "--checkpoint-every", "2", "--lr-scheduler", "constant"]
    straight = _torchrun("ds", "straight", "--steps", "4", *common, cwd=root)
    # a run stopped after its checkpoint at step 2, then resumed to step 4
    _torchrun("ds", "resumed", "--steps", "2", *common, cwd=root)
    resumed = _torchrun("ds", "resumed", "--steps", "4", "--resume", "latest", *common, cwd=root)
    return root, straight, resumed


def test_one_process_speaks_and_logs_the_mean_loss(runs):
    root, straight, _ = runs
    out = straight.stdout
    assert out.count("done: 4 steps") == 1, out[-2000:]
    assert out.count("LoRA: straight/pytorch_lora_weights.safetensors") == 1
    assert out.count("memory plan for") == 1
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


def test_a_resumed_two_process_run_equals_an_uninterrupted_one(runs):
    root, _, resumed = runs
    assert "resumed from checkpoint-2" in resumed.stdout
    a = load_file(root / "straight" / "pytorch_lora_weights.safetensors")
    b = load_file(root / "resumed" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert [r["loss"] for r in _log(root / "straight")] == pytest.approx([r["loss"] for r in _log(root / "resumed")],
                                                                        rel=1e-5)
