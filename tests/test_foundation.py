"""Atomic writes, the smoke switch, and the command line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from lora_helpers.core import fileio
from lora_helpers.core.config import HUB_MODELS, default_resolution, resolve_models, smoke_mode


def test_atomic_write_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "captions.txt"
    fileio.write_text(target, "hand-edited caption")
    with pytest.raises(RuntimeError):
        with fileio.atomic_path(target) as tmp:
            tmp.write_text("half writ")
            raise RuntimeError("disconnect")
    assert target.read_text() == "hand-edited caption"
    assert [p.name for p in tmp_path.iterdir()] == ["captions.txt"], "no temp file may be left behind"


def test_atomic_files_are_readable_and_complete(tmp_path):
    path = fileio.write_json(tmp_path / "a" / "config.json", {"rank": 16})
    assert path.stat().st_mode & 0o044 == 0o044
    img = Image.new("RGB", (8, 4), (10, 20, 30))
    out = fileio.save_image(tmp_path / "x.png", img)
    assert Image.open(out).size == (8, 4)
    rows = [{"file_name": "images/a.png", "text": "a photo of TOK person"}]
    fileio.write_jsonl(tmp_path / "metadata.jsonl", rows)
    assert fileio.read_jsonl(tmp_path / "metadata.jsonl") == rows


def test_read_jsonl_names_file_and_line(tmp_path):
    bad = tmp_path / "metadata.jsonl"
    bad.write_text('{"file_name": "a.png"}\n{not json\n')
    with pytest.raises(ValueError, match=r"metadata.jsonl, line 2"):
        fileio.read_jsonl(bad)


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "checkpoint-10"
    with fileio.atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(KeyboardInterrupt):
        with fileio.atomic_dir(target) as tmp:
            (tmp / "weights").write_text("v2-partial")
            raise KeyboardInterrupt
    assert (target / "weights").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-10"]


def test_smoke_switch(monkeypatch, tmp_path, tiny_models):
    monkeypatch.setenv("LORA_HELPERS_SMOKE", "0")
    assert not smoke_mode()
    assert resolve_models() == HUB_MODELS
    assert default_resolution() == 1024
    monkeypatch.setenv("LORA_HELPERS_SMOKE", "1")
    models = resolve_models()
    assert models.smoke and Path(models.sdxl) == tiny_models / "sdxl"
    assert (Path(models.sdxl) / "model_index.json").exists()
    assert default_resolution() == 64
    assert resolve_models(blip="/my/blip", clip=None).blip == "/my/blip"


def test_cli_help_lists_stages():
    out = subprocess.run([sys.executable, "-m", "lora_helpers", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "tiny-models" in out.stdout
    out = subprocess.run([sys.executable, "-m", "lora_helpers"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "SUBCOMMAND" in out.stdout


def test_importing_the_stack_after_the_package_prints_no_kernel_install_advice():
    """bitsandbytes (imported by diffusers) asks CPUs with AVX512-BF16 to `pip install kernels` for 4-bit
    CPU kernels we never use; that line must not appear in every notebook."""
    pytest.importorskip("bitsandbytes")
    code = "import lora_helpers, bitsandbytes, diffusers.quantizers"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "kernels-community" not in done.stdout + done.stderr
