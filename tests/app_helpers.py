"""Helpers for the app tests: a tiny model bundle, and app.py started once on a free loopback port."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LABELS = ["Action", "Comedy", "Drama", "Horror"]
# "Action" always passes (p >= 0) and "Comedy" never does (a sigmoid stays below 1): a result whose genre set
# follows these shows that the bundle's per-genre thresholds are the ones applied.
THRESHOLDS = [0.0, 1.0, 0.5, 0.5]
# Small limits so the tests can cross them with small inputs.
TEST_LIMITS = {"MMGCS_MAX_PLOT_CHARS": "2000", "MMGCS_MAX_IMAGE_PIXELS": "1000000", "MMGCS_MAX_FILE_MB": "1"}
START_TIMEOUT = 120


# A few plots for the tiny bundle's lexical branch, so that explanations have words to show ("haunted" → Horror).
LEXICAL_PLOTS = [
    ("A ghost haunts an old house at night.", "Horror"), ("A witch in a haunted forest curses a village.", "Horror"),
    ("Two friends open a funny bakery.", "Comedy"), ("A clumsy dog ruins a funny wedding.", "Comedy"),
    ("Soldiers fight a battle in the desert.", "Action"), ("A police team chases a gang.", "Action"),
    ("A family grieves after a death.", "Drama"), ("A mother and her son rebuild their lives.", "Drama"),
]


def save_tiny_bundle(folder: Path) -> Path:
    """A tiny fused (text + poster) model with per-genre thresholds and a fitted lexical branch, in Hub layout."""
    import numpy as np

    from mmgcs.testing import tiny_model

    model = tiny_model(LABELS, thresholds=THRESHOLDS, lexical=True, lexical_features=4096, lexical_min_df=1)
    targets = np.array([[float(genre == label) for label in LABELS] for _, genre in LEXICAL_PLOTS])
    model.lexical.fit([plot for plot, _ in LEXICAL_PLOTS], targets, c=10.0)
    model.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def app_env(model_dir: Path, **extra: str) -> dict:
    return {
        **os.environ,
        "MMGCS_MODEL": str(model_dir),
        "MMGCS_EXAMPLES": "",
        "GRADIO_SERVER_NAME": "127.0.0.1",
        "GRADIO_ANALYTICS_ENABLED": "False",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "MMGCS_PRECISION": "fp32",  # answers compared with the model run in the test process
        **TEST_LIMITS,
        **extra,
    }


@dataclass
class AppServer:
    proc: subprocess.Popen
    url: str
    log: Path
    model_dir: Path
    uploads: Path  # the server's upload folder (GRADIO_TEMP_DIR)

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_app(model_dir: Path, workdir: Path, **extra_env: str) -> AppServer:
    """`python app.py` in a subprocess on a free 127.0.0.1 port, its uploads in `workdir/uploads` unless
    GRADIO_TEMP_DIR is given; returns once the app answers."""
    import httpx

    port = free_port()
    log = workdir / "app.log"
    extra_env.setdefault("GRADIO_TEMP_DIR", str(workdir / "uploads"))
    with log.open("w") as out:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen(
            [sys.executable, "app.py"], cwd=REPO, env=app_env(model_dir, GRADIO_SERVER_PORT=str(port), **extra_env),
            stdout=out, stderr=subprocess.STDOUT,
        )
    server = AppServer(proc, f"http://127.0.0.1:{port}", log, model_dir, Path(extra_env["GRADIO_TEMP_DIR"]))
    deadline = time.time() + START_TIMEOUT
    while time.time() < deadline:
        if not server.alive():
            raise RuntimeError(f"app.py exited with code {proc.returncode}:\n{server.log_text()[-4000:]}")
        try:
            if httpx.get(server.url + "/gradio_api/info", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"app.py did not answer within {START_TIMEOUT} s:\n{server.log_text()[-4000:]}")


def api_client(url: str):
    """A gradio_client Client for the app at `url` that sends no telemetry (its `analytics_enabled` default is on
    whatever GRADIO_ANALYTICS_ENABLED says)."""
    from gradio_client import Client

    return Client(url, verbose=False, analytics_enabled=False)


_shared: dict[str, AppServer] = {}


def shared_app_server(tmp_path_factory) -> AppServer:
    """One app per test session, shared by the API and browser tests (start-up costs ~10 s)."""
    server = _shared.get("server")
    if server is None or not server.alive():
        workdir = tmp_path_factory.mktemp("app")
        server = start_app(save_tiny_bundle(workdir / "model"), workdir)
        atexit.register(server.stop)
        _shared["server"] = server
    return server
