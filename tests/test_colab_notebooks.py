"""Every notebook, top to bottom, the way Colab runs it.

Colab's mechanics, reproduced: the kernel has ``google.colab`` imported (a stand-in from
``tests/fake_colab``), its working folder holds a ``lora_helpers/`` clone folder (which Python
would import as an empty namespace package), and ``lora_helpers`` is *not* installed
beforehand: a fresh virtual environment sees the dependencies but not our package. The
notebooks' own install cell must install it, Drive must be mounted, photos uploaded, and every
Colab-only cell runs (none is skipped). Smoke mode keeps the models tiny.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import site
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAKE_COLAB = Path(__file__).resolve().parent / "fake_colab"
NOTEBOOKS = sorted((REPO / "notebooks").glob("*.ipynb"))


def _copy_repository(dest: Path) -> Path:
    """The repository as a clone or a Drive copy would hold it (sources, sample photos, notebooks)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "outputs")
    dest.mkdir(parents=True)
    for name in ("lora_helpers", "sample_data", "notebooks"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    return dest


def _venv_without_package(root: Path) -> Path:
    """A virtual environment with every dependency importable and lora_helpers not installed.

    The running interpreter's site-packages is added as a plain path: its packages import,
    but its .pth files (our editable install's import hook among them) are not run.
    """
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    Path(purelib, "dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    found = subprocess.run([str(python), "-c", "import importlib.util as u; "
                            "print(getattr(u.find_spec('lora_helpers'), 'origin', None))"],
                           capture_output=True, text=True, cwd=root, env=env)
    assert found.stdout.strip() == "None", "lora_helpers must not be installed before the notebooks run"
    return python


def _colab_env(root: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LORA_HELPERS_", "PYTEST_", "COV_")) and k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update({
        "PYTHONPATH": str(FAKE_COLAB),               # its sitecustomize imports google.colab, as Colab's kernel has
        "LORA_HELPERS_SMOKE": "1",
        "LORA_HELPERS_DRIVE": str(root / "drive"),  # where drive.mount puts MyDrive (Colab: /content/drive)
        "FAKE_COLAB_UPLOADS": str(REPO / "sample_data" / "person"),
        "FAKE_COLAB_DOWNLOADS": str(root),
        "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    })
    if os.environ.get("LORA_HELPERS_CACHE"):
        env["LORA_HELPERS_CACHE"] = os.environ["LORA_HELPERS_CACHE"]  # the tiny models, built once
    env.update(extra)
    return env


def _run_notebooks(python: Path, content: Path, names: list[str], env: dict[str, str]) -> str:
    for name in names:
        shutil.copy2(REPO / "notebooks" / name, content / name)
    done = subprocess.run([str(python), "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q",
                           "--rootdir", str(content), *names],
                          cwd=content, env=env, capture_output=True, text=True, timeout=1500)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "skipped" not in output.splitlines()[-1], "Colab cells must run, not be skipped:\n" + output[-2000:]
    return output


@pytest.fixture(scope="module")
def colab(tmp_path_factory):
    root = tmp_path_factory.mktemp("colab")
    content = root / "content"  # Colab's working folder, with a clone in it
    clone = _copy_repository(content / "lora_helpers")
    wheels = root / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(clone),
                    "-w", str(wheels)], check=True, cwd=root, capture_output=True)
    return root, content, next(wheels.glob("lora_helpers-*.whl"))


def test_every_notebook_runs_in_colab_mode(colab):
    root, content, wheel = colab
    python = _venv_without_package(root)
    env = _colab_env(root, LORA_HELPERS_SOURCE=str(wheel))
    _run_notebooks(python, content, [p.name for p in NOTEBOOKS], env)

    installed = subprocess.run([str(python), "-c", "import lora_helpers; print(lora_helpers.__file__, lora_helpers.__version__)"],
                               cwd=content, env=env, capture_output=True, text=True)
    where, version = installed.stdout.split()
    assert "site-packages" in where and str(root / "venv") in where, "installed into the kernel's environment"
    assert version == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]

    workspace = root / "drive" / "MyDrive" / "lora_helpers"  # everything on (the stand-in) Drive
    uploaded = sorted(p.name for p in (workspace / "photos").iterdir())
    assert uploaded == sorted(p.name for p in (REPO / "sample_data" / "person").iterdir())
    for name in uploaded:  # the upload is byte-identical and the source untouched
        assert (workspace / "photos" / name).read_bytes() == (REPO / "sample_data" / "person" / name).read_bytes()
    assert len(list((workspace / "dataset" / "images").glob("*.png"))) >= 5
    assert (workspace / "run" / "pytorch_lora_weights.safetensors").is_file()
    assert list((workspace / "run").glob("*_kohya.safetensors"))
    assert (workspace / "run" / "evaluation" / "scores.csv").is_file()
    assert list((workspace / "generated").glob("*.png"))


def test_setup_installs_from_a_copy_on_drive(tmp_path):
    """Opened from a copy of the repository on Drive: no address and no LORA_HELPERS_SOURCE needed."""
    content = tmp_path / "content"
    content.mkdir()
    _copy_repository(tmp_path / "drive" / "MyDrive" / "lora_helpers")
    python = _venv_without_package(tmp_path)
    # Offline, from the copy: build with the setuptools already installed rather than fetching one.
    env = _colab_env(tmp_path, PIP_NO_BUILD_ISOLATION="0", PIP_NO_INDEX="1")
    output = _run_notebooks(python, content, ["00_setup.ipynb"], env)
    assert "passed" in output
    shown = subprocess.run([str(python), "-c", "import lora_helpers, pathlib; print(pathlib.Path(lora_helpers.__file__))"],
                           cwd=content, env=env, capture_output=True, text=True).stdout.strip()
    assert str(tmp_path / "venv") in shown
    # The Drive folder holds the repository, so outputs go to its outputs/ (as in a checkout).
    assert (tmp_path / "drive" / "MyDrive" / "lora_helpers" / "outputs").is_dir()


def test_install_cell_is_the_same_everywhere_and_names_the_project_address():
    address = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["urls"]["Repository"]
    cells = []
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
        cells.append("".join(first_code["source"]))
        assert re.search(r'^REPO_URL = "([^"]+)"\s+#@param', cells[-1], re.M).group(1) == address, path.name
    assert all(cell == cells[0] for cell in cells), "the install cell differs between notebooks"
    readme = (REPO / "README.md").read_text()
    for path in NOTEBOOKS:  # an "Open in Colab" badge per notebook, built from the same address
        slug = address.removeprefix("https://github.com/")
        assert f"https://colab.research.google.com/github/{slug}/blob/main/notebooks/{path.name}" in readme


def test_notebooks_are_thin_and_use_tags_not_comment_markers():
    for path in NOTEBOOKS:
        nb = json.loads(path.read_text())
        for cell in nb["cells"]:
            source = "".join(cell["source"])
            assert "NBVAL_" not in source, f"{path.name}: nbval markers belong in cell tags"
            if cell["cell_type"] == "code":
                assert not re.search(r"^\s*(def|class) ", source, re.M), f"{path.name}: a helper defined in a cell"
                assert not cell.get("outputs"), f"{path.name}: outputs must be stripped"
        gpu_needed = path.name.startswith(("03", "04", "05"))
        if gpu_needed:
            assert nb["metadata"].get("accelerator") == "GPU" and nb["metadata"]["colab"].get("gpuType") == "T4"
            assert "require_gpu(" in path.read_text(), f"{path.name} must stop on a CPU runtime"
