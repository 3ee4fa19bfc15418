"""Everything Colab-specific the notebooks need: install, Drive, upload, GPU check, downloads.

Each notebook starts with the same install cell; after it, cells call these functions, which
do nothing surprising outside Colab (no Drive to mount, no browser to upload from), so the
same cells run in Colab, in a local Jupyter and under nbval in CI.

The repository address lives in one place, ``[project.urls]`` of ``pyproject.toml``; the
install cell of every notebook repeats it as a form field and a test keeps them equal.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import lora_helpers
from lora_helpers import __version__
from lora_helpers.core.config import smoke_mode
from lora_helpers.core.fileio import write_bytes
from lora_helpers.core.images import IMAGE_SUFFIXES, list_images
from lora_helpers.core.runtime import drive_mount_point, in_colab, workspace_dir

__all__ = [
    "GPURequiredError",
    "in_colab",
    "finish_install",
    "mount_drive",
    "require_gpu",
    "upload_photos",
    "show_files",
]


class GPURequiredError(RuntimeError):
    """A notebook that needs a GPU was started on a CPU runtime."""


def _pip_install(*requirements: str) -> bool:
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", *requirements])
    importlib.invalidate_caches()
    return done.returncode == 0


def finish_install(*, quiet: bool = False) -> str:
    """The Colab install's second half, once ``lora_helpers`` itself imports.

    Installs ``dlib-bin`` only where ``import dlib`` fails: Colab images may carry a compiled
    dlib, and two builds of one module fight. Colab's torch is never touched.

    Args:
        quiet: print nothing.

    Returns:
        One line: the version and where the package was imported from.
    """
    if importlib.util.find_spec("dlib") is None and not _pip_install("dlib-bin"):
        print("could not install dlib-bin: face checks will fail; run `pip install dlib-bin` and restart the runtime")
    line = f"lora_helpers {__version__} from {Path(lora_helpers.__file__).parent}"
    if not quiet:
        print(line)
    return line


def mount_drive(*, use_drive: bool = True) -> Path:
    """Mount Google Drive in Colab so photos/, dataset/ and run/ survive a disconnect.

    Args:
        use_drive: False keeps everything on the runtime's disk (lost when it disconnects).

    Returns:
        The workspace folder (``MyDrive/lora_helpers`` with Drive; else the local one).
    """
    if in_colab() and use_drive:
        from google.colab import drive  # type: ignore[import-not-found]

        mount = drive_mount_point()
        if not (mount / "MyDrive").is_dir():
            drive.mount(str(mount))
    path = workspace_dir()
    where = "on Google Drive" if _drive_path(path) else "on this machine's disk (lost when Colab disconnects)" \
        if in_colab() else "on this machine"
    print(f"workspace {where}: {path}")
    return path


def _drive_path(path: Path) -> str | None:
    """``path`` as Drive shows it (``MyDrive/...``), or None when it is not on Drive."""
    try:
        return Path(path).resolve().relative_to(drive_mount_point().resolve()).as_posix()
    except ValueError:
        return None


def require_gpu(notebook: str) -> None:
    """Stop a notebook that needs a GPU on a CPU runtime, with what to do (smoke mode excepted).

    Loading full SDXL on a CPU runtime needs ~14 GB of RAM: Colab's 12.7 GB session dies
    without a message, so we stop first.

    Raises:
        GPURequiredError: no CUDA GPU and not in smoke mode.
    """
    import torch

    if torch.cuda.is_available() or smoke_mode():
        return
    fix = ("Runtime > Change runtime type > T4 GPU, then Runtime > Run all" if in_colab()
           else "run it on a machine with an NVIDIA GPU, or set LORA_HELPERS_SMOKE=1 to try it with tiny models")
    raise GPURequiredError(f"{notebook} needs a GPU and this runtime has none: {fix}.")


def upload_photos(photos_dir: str | os.PathLike, *, more: bool = False) -> list[Path]:
    """Let a Colab user upload photos into ``photos_dir``; a re-run does not ask again.

    Args:
        photos_dir: where the photos go (on Drive when mounted); created.
        more: ask for more photos even when the folder already holds some.

    Returns:
        The photos now in ``photos_dir``.

    Raises:
        FileNotFoundError: the upload was empty and the folder holds no photos.
    """
    photos_dir = Path(photos_dir)
    photos_dir.mkdir(parents=True, exist_ok=True)
    have = list_images(photos_dir)
    drop_hint = f"you can also copy photos into {photos_dir} (Google Drive: {_drive_path(photos_dir)})" \
        if _drive_path(photos_dir) else f"you can also copy photos into {photos_dir}"
    if not in_colab():
        print(f"{len(have)} photos in {photos_dir} ({drop_hint})")
        return have
    if have and not more:
        print(f"{len(have)} photos already in {photos_dir}; set UPLOAD_MORE = True to add more ({drop_hint})")
        return have
    from google.colab import files  # type: ignore[import-not-found]

    print(f"choose 5-15 photos (JPEG, PNG, WebP, HEIC); {drop_hint}")
    uploaded = files.upload() or {}
    skipped = []
    for name, data in uploaded.items():
        name = Path(name).name  # a browser gives a bare name; never let one point elsewhere
        if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
            skipped.append(name)
            continue
        write_bytes(photos_dir / name, data)
    if skipped:
        print(f"not photos, left out: {', '.join(skipped)} (use {', '.join(sorted(IMAGE_SUFFIXES))})")
    have = list_images(photos_dir)
    if not have:
        raise FileNotFoundError(f"no photos were uploaded and {photos_dir} is empty: run this cell again and choose "
                                f"photos in the upload box, or {drop_hint}")
    print(f"{len(have)} photos in {photos_dir}")
    return have


def show_files(paths: Sequence[str | os.PathLike], *, download: bool = False) -> list[Path]:
    """Print the absolute paths of finished files (and where they are on Drive); optionally download them.

    Args:
        paths: files to show.
        download: in Colab, send each file to the browser as a download.

    Returns:
        The absolute paths.
    """
    shown = []
    for path in paths:
        path = Path(path).resolve()
        size = f"{path.stat().st_size / 1e6:.1f} MB" if path.is_file() else "missing"
        on_drive = f"  (Google Drive: {_drive_path(path)})" if _drive_path(path) else ""
        print(f"{path}  {size}{on_drive}")
        shown.append(path)
    if download and in_colab():
        from google.colab import files  # type: ignore[import-not-found]

        for path in shown:
            if path.is_file():
                files.download(str(path))
    elif download:
        print("downloads start only in Colab; the files are at the paths above")
    return shown
