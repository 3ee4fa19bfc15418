"""Shared fixtures: offline hub, tiny models built once per machine, real sample photos."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Without these a hub id waits ~200 s before failing; tests must never reach the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models are overhead-bound: one thread is as fast on a quiet machine and many
# times faster on a busy one (OpenMP threads spin-wait for each other). Notebook kernels
# started by nbval inherit this.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "sample_data"


@pytest.fixture(scope="session")
def tiny_models() -> Path:
    """Folder with sdxl/, blip/, clip/ tiny models (built on first use, cached by version)."""
    from lora_helpers.core.config import tiny_models_dir

    return tiny_models_dir()


@pytest.fixture(scope="session")
def sample_data() -> Path:
    return SAMPLE_DATA


@pytest.fixture(scope="session")
def person(sample_data) -> list[Path]:
    """The sample photos of one person (the astronaut)."""
    return sorted((sample_data / "person").glob("*.jpg"))


@pytest.fixture(scope="session")
def hopper(sample_data) -> list[Path]:
    """The sample photos of another person (Grace Hopper)."""
    return sorted((sample_data / "other_person").glob("*.jpg"))


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    """A second Accelerator with other settings raises; start each test clean."""
    yield
    if "accelerate" not in sys.modules:  # importing it just to reset costs seconds
        return
    try:
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    except Exception:
        pass
