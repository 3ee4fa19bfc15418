"""``drive.mount`` as Colab has it: after it, ``<mountpoint>/MyDrive`` is the person's Drive."""

from pathlib import Path


def mount(mountpoint, force_remount=False, timeout_ms=120000, readonly=False):
    (Path(mountpoint) / "MyDrive").mkdir(parents=True, exist_ok=True)
    print(f"Mounted at {mountpoint}")
