"""The machine we run on: device, dtype, freeing memory, and a report for people."""

from __future__ import annotations

import gc
import importlib.util
import os
import platform
import sys
from pathlib import Path
from dataclasses import dataclass

import torch

__all__ = [
    "default_device",
    "default_dtype",
    "free_memory",
    "available_host_memory_gb",
    "MachineReport",
    "machine_report",
    "package_report",
    "is_main_process",
    "say",
    "in_colab",
    "drive_mount_point",
    "workspace_dir",
]

WORKSPACE_ENV = "LORA_HELPERS_WORKSPACE"
DRIVE_ENV = "LORA_HELPERS_DRIVE"


def default_device() -> torch.device:
    """CUDA when present, else CPU (never a hard-coded "cuda")."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device | str | None = None) -> torch.dtype:
    """fp16 on CUDA (a T4 has no bf16), fp32 on CPU where fp16 kernels are slow or missing."""
    device = torch.device(device) if device is not None else default_device()
    return torch.float16 if device.type == "cuda" else torch.float32


def free_memory() -> None:
    """Collect garbage and return cached GPU memory, after a model is dropped.

    Callers must drop their own references first (``del model``); this only makes
    the freed memory visible to the next big allocation.
    """
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()


@dataclass
class MachineReport:
    """What this machine offers for training SDXL LoRAs."""

    device: str
    gpu_name: str | None
    gpu_memory_gb: float | None
    fp16: bool
    bf16: bool
    host_memory_gb: float | None
    cpu_count: int
    in_colab: bool
    torch_version: str
    preset: str
    advice: str

    def __str__(self) -> str:
        gpu = f"{self.gpu_name}, {self.gpu_memory_gb:.1f} GB" if self.gpu_name else "no GPU"
        host = f"{self.host_memory_gb:.1f} GB" if self.host_memory_gb else "unknown"
        lines = [
            f"device:       {self.device} ({gpu})",
            f"fp16 / bf16:  {'yes' if self.fp16 else 'no'} / {'yes' if self.bf16 else 'no'}",
            f"host memory:  {host}, {self.cpu_count} CPU cores",
            f"torch:        {self.torch_version}{'  (Colab)' if self.in_colab else ''}",
            f"preset:       {self.preset}",
            f"advice:       {self.advice}",
        ]
        return "\n".join(lines)


def _host_memory_gb() -> float | None:
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
        return pages * size / 1e9
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def available_host_memory_gb() -> float | None:
    """Host RAM free for a new allocation now (Linux ``MemAvailable``), in GiB; None when unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return None


def machine_report() -> MachineReport:
    """Inspect the machine and say which training preset fits it.

    Returns:
        A :class:`MachineReport`; ``str()`` of it is a short table for people.
    """
    colab = in_colab()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        mem = props.total_memory / 1e9
        bf16 = torch.cuda.is_bf16_supported()
        if mem >= 30:
            preset, advice = "a100", "plenty of GPU memory: 1024 px, larger batch and rank"
        elif mem >= 7.5:
            preset, advice = "t4-8gb", "fp16 with cached latents and text embeddings, 8-bit AdamW, 1024 px in an 8 GB budget"
        else:
            preset, advice = "t4-8gb", f"only {mem:.1f} GB: use the 8-bit UNet option and 768 px"
        return MachineReport(
            device="cuda", gpu_name=props.name, gpu_memory_gb=mem, fp16=True, bf16=bf16,
            host_memory_gb=_host_memory_gb(), cpu_count=os.cpu_count() or 1, in_colab=colab,
            torch_version=torch.__version__, preset=preset, advice=advice,
        )
    return MachineReport(
        device="cpu", gpu_name=None, gpu_memory_gb=None, fp16=False, bf16=False,
        host_memory_gb=_host_memory_gb(), cpu_count=os.cpu_count() or 1, in_colab=colab,
        torch_version=torch.__version__, preset="cpu-smoke",
        advice="no GPU: only the tiny smoke models are practical here (in Colab: Runtime > Change runtime type > T4 GPU)"
        + f" [{platform.processor() or platform.machine()}]",
    )


# What each stage needs; `import name` -> pip package to install when it is missing.
_PACKAGES = {
    "torch": "torch", "diffusers": "diffusers", "transformers": "transformers", "peft": "peft",
    "accelerate": "accelerate", "safetensors": "safetensors", "PIL": "pillow", "cv2": "opencv-python-headless<5",
    "dlib": "dlib-bin", "face_recognition_models": "face-recognition-models", "ipywidgets": "ipywidgets",
    "matplotlib": "matplotlib", "bitsandbytes": "bitsandbytes", "isal": "isal",
}


def package_report() -> list[tuple[str, str | None, str]]:
    """Versions of the packages the stages use.

    Returns:
        Rows of (import name, version or None when missing, pip name to install it).
        ``bitsandbytes`` is only needed for 8-bit AdamW on CUDA; without ``isal``
        preparation writes its PNGs more slowly.
    """
    import importlib.metadata
    import importlib.util

    rows = []
    for module, pip_name in _PACKAGES.items():
        spec = importlib.util.find_spec(module)
        version = None
        if spec is not None:
            dist = pip_name.split("<")[0].split("=")[0]
            for candidate in (dist, module):
                try:
                    version = importlib.metadata.version(candidate)
                    break
                except importlib.metadata.PackageNotFoundError:
                    continue
            version = version or "installed"
        rows.append((module, version, pip_name))
    return rows


def is_main_process() -> bool:
    """False in every process but the first of a multi-process launch (``torchrun``, ``accelerate launch``).

    Read from the launcher's ``RANK`` variable, so it can be asked before (and after) accelerate
    is set up: command-line output must come from one process only.
    """
    try:
        return int(os.environ.get("RANK", "0")) == 0
    except ValueError:
        return True


def say(message: str) -> None:
    """Print ``message`` from the main process only (one line, not one per process)."""
    if is_main_process():
        print(message)


def in_colab() -> bool:
    """True inside Google Colab (its ``google.colab`` module is importable there)."""
    if "google.colab" in sys.modules or "COLAB_RELEASE_TAG" in os.environ:
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ImportError, ValueError):  # no `google` package at all
        return False


def drive_mount_point() -> Path:
    """Where Google Drive is mounted: ``/content/drive`` in Colab, or ``LORA_HELPERS_DRIVE``."""
    return Path(os.environ.get(DRIVE_ENV) or "/content/drive")


def workspace_dir() -> Path:
    """The folder where every stage keeps its folders (photos/, dataset/, run/, generated/).

    ``LORA_HELPERS_WORKSPACE`` wins; with Google Drive mounted it is ``MyDrive/lora_helpers``
    (nothing lost on a disconnect; ``MyDrive/lora_helpers/outputs`` when that folder is a copy
    of this repository); in a checkout of this repository it is ``outputs/`` at the repository
    root (also from ``notebooks/``); elsewhere ``./outputs``.
    """
    drive = drive_mount_point() / "MyDrive"
    if os.environ.get(WORKSPACE_ENV):
        path = Path(os.environ[WORKSPACE_ENV])
    elif drive.is_dir():
        path = drive / "lora_helpers"
        if (path / "pyproject.toml").is_file():  # the repository itself lives there
            path = path / "outputs"
    else:
        cwd = Path.cwd()
        root = cwd.parent if cwd.name == "notebooks" and (cwd.parent / "lora_helpers").is_dir() else cwd
        path = root / "outputs"
    path.mkdir(parents=True, exist_ok=True)
    return path
