"""Test-wide settings: never touch the network, keep threads and analytics quiet."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Tiny models gain nothing from intra-op threads, and two threads per process oversubscribe the 2 cores once
# a test starts subprocesses (DDP, the app server): one thread keeps the suite fast and its timing steady.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MMGCS_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The team's real movie data (../shared/data); tests that need it skip when it is absent."""
    if not (SHARED_DATA / "tmdb5000" / "movies.jsonl").is_file():
        pytest.skip(f"real movie data not found at {SHARED_DATA} (set MMGCS_SHARED_DATA to its folder)")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    """Several Accelerator objects in one process leak state between tests: reset after each test."""
    yield
    try:
        from accelerate.state import AcceleratorState, GradientState, PartialState
    except ImportError:
        return
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()
