"""Nothing MMGCS starts phones home (issue 18): a training run, `mmgcs predict` and the Space's app, each in a
subprocess whose every Python socket is watched, open no connection to, send no datagram to and resolve no name of
anything but this machine; ONNX Runtime records no telemetry on the way.

The watch is a `sitecustomize` module on the subprocess's PYTHONPATH (inherited by its own workers): it wraps
socket.connect / connect_ex / sendto and the name lookups, writes each non-loopback address with the stack that asked
for it to a log, and refuses it as an unreachable network would. The runs see the environment a user's machine
has: neither HF_HUB_OFFLINE nor GRADIO_ANALYTICS_ENABLED is set for them. C code with sockets of its own (ONNX
Runtime's telemetry uploader) is not seen by this watch; that one is kept off by ORT_DISABLE_TELEMETRY and checked
by the files it would write.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_helpers import GENRES, REPO_ROOT, build_dataset, subprocess_env, tiny_overrides

GUARD = r'''
import ipaddress
import os
import socket
import traceback

_LOG = os.environ["MMGCS_NETWORK_LOG"]


def _local(host) -> bool:
    if host is None:
        return True
    host = (host.decode() if isinstance(host, bytes) else str(host)).split("%")[0].lower()
    if host in ("", "localhost") or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False  # a name to look up elsewhere
    return address.is_loopback or address.is_unspecified


def _refuse(what, target):
    with open(_LOG, "a", encoding="utf-8") as log:
        stack = "".join(traceback.format_stack(limit=12)[:-2])
        log.write(f"pid {os.getpid()} {what} {target!r}\n{stack}\n")
    raise socket.gaierror(socket.EAI_AGAIN, f"{what} {target!r}: refused by the no-network test")


def _watch_address(what, real):
    def watched(self, *args):
        address = args[-1]
        if self.family in (socket.AF_INET, socket.AF_INET6) and not _local(address[0]):
            _refuse(what, address)
        return real(self, *args)
    return watched


def _watch_name(what, real):
    def watched(host, *args, **kwargs):
        if not _local(host):
            _refuse(what, host)
        return real(host, *args, **kwargs)
    return watched


for _name in ("connect", "connect_ex", "sendto"):
    setattr(socket.socket, _name, _watch_address(_name, getattr(socket.socket, _name)))
for _name in ("getaddrinfo", "gethostbyname", "gethostbyname_ex"):
    setattr(socket, _name, _watch_name(_name, getattr(socket, _name)))
'''


@pytest.fixture
def watched_env(tmp_path) -> dict:
    """The environment of a watched subprocess: the guard first on PYTHONPATH, an empty HOME (where ONNX Runtime
    would write its telemetry), no offline switches."""
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD, encoding="utf-8")
    home = tmp_path / "home"
    home.mkdir()
    env = subprocess_env()
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "GRADIO_ANALYTICS_ENABLED", "ORT_DISABLE_TELEMETRY"):
        env.pop(name, None)
    env.update(PYTHONPATH=os.pathsep.join([str(guard), str(REPO_ROOT)]), MMGCS_NETWORK_LOG=str(tmp_path / "network.log"),
               HOME=str(home), XDG_CACHE_HOME=str(home / ".cache"), HF_HOME=str(home / "hf"))
    return env


def assert_no_network(env: dict) -> None:
    log = Path(env["MMGCS_NETWORK_LOG"])
    assert not log.exists(), log.read_text()[-6000:]
    written = [str(p) for p in Path(env["HOME"]).rglob("*") if "Microsoft" in str(p) or "onnxruntime" in p.name]
    assert not written, written  # ONNX Runtime's telemetry database and device id


def test_the_guard_sees_and_refuses_a_connection(watched_env):
    """The watch itself works: a name lookup and a connection to an outside address are logged and refused."""
    code = ("import socket\n"
            "for attempt in (lambda: socket.getaddrinfo('huggingface.co', 443),\n"
            "                lambda: socket.socket().connect(('192.0.2.1', 80))):\n"
            "    try: attempt()\n"
            "    except OSError as e: print(type(e).__name__)\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); c = socket.create_connection(s.getsockname())\n")
    run = subprocess.run([sys.executable, "-c", code], env=watched_env, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.split() == ["gaierror", "gaierror"], run.stderr
    log = Path(watched_env["MMGCS_NETWORK_LOG"]).read_text()
    assert "getaddrinfo 'huggingface.co'" in log and "connect ('192.0.2.1', 80)" in log and "127.0.0.1" not in log


@pytest.mark.slow
def test_a_training_run_opens_no_outside_connection(tmp_path, watched_env):
    data = build_dataset(tmp_path, n=30)
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "training/train_fusion.py", *tiny_overrides(data, out, train__epochs=1)],
                         cwd=REPO_ROOT, env=watched_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert (out / "COMPLETE").is_file()
    assert_no_network(watched_env)


def test_mmgcs_predict_opens_no_outside_connection(tmp_path, watched_env):
    from mmgcs.testing import tiny_model

    bundle = tmp_path / "model"
    tiny_model(GENRES).save_pretrained(bundle)
    movies = tmp_path / "movies.jsonl"
    rows = [{"id": 1, "title": "Night", "plot": "A ghost haunts an old house at night."},
            # a poster given as a URL is refused as a row error, never fetched
            {"id": 2, "title": "Far away", "plot": "Two friends open a bakery.", "poster_path": "https://example.com/p.jpg"}]
    movies.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    run = subprocess.run([sys.executable, "-m", "mmgcs", "predict", "--model", str(bundle), "--input", str(movies),
                          "--out", str(out)], cwd=REPO_ROOT, env=watched_env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == ["1", "2"]
    assert_no_network(watched_env)


@pytest.mark.slow
def test_the_app_opens_no_outside_connection(tmp_path, watched_env):
    """The Space on 127.0.0.1: start-up, one prediction over HTTP, shut-down."""
    pytest.importorskip("gradio")
    import httpx

    from app_helpers import START_TIMEOUT, app_env, free_port, save_tiny_bundle

    port = free_port()
    env = {**app_env(save_tiny_bundle(tmp_path / "model"), GRADIO_SERVER_PORT=str(port)), **watched_env,
           "GRADIO_TEMP_DIR": str(tmp_path / "uploads")}
    for name in ("HF_HUB_OFFLINE", "GRADIO_ANALYTICS_ENABLED"):  # the app's own defaults, as a user runs it
        env.pop(name, None)
    log, url = tmp_path / "app.log", f"http://127.0.0.1:{port}"
    with log.open("w") as output:  # a file, not a pipe: a full pipe would block the server
        proc = subprocess.Popen([sys.executable, "app.py"], cwd=REPO_ROOT, env=env, stdout=output,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + START_TIMEOUT
        while not _answers(url, httpx):
            assert proc.poll() is None and time.time() < deadline, log.read_text(errors="replace")[-4000:]
            time.sleep(0.3)
        answer = _predict(url, httpx, ["A detective hunts a killer in the city.", None, None])
        assert answer["event"] == "complete" and answer["data"][0]["scores"], answer
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert_no_network(watched_env)


def _answers(url: str, httpx) -> bool:
    try:
        return httpx.get(url + "/gradio_api/info", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _predict(url: str, httpx, data: list) -> dict:
    """POST /gradio_api/call/predict, then read its events; returns the last as {"event", "data"}."""
    r = httpx.post(url + "/gradio_api/call/predict", json={"data": data}, timeout=60)
    assert r.status_code == 200, r.text
    text = httpx.get(url + f"/gradio_api/call/predict/{r.json()['event_id']}", timeout=60).text
    events = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith(("event:", "data:"))]
    return {"event": events[-2], "data": json.loads(events[-1])}
