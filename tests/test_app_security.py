"""The Space against a hostile client over raw HTTP: no server file is read, nothing hangs or floods memory, every
refusal carries a message, and the server stays healthy. Each test reproduces a reported attack (issue 9)."""

from __future__ import annotations

import io
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("gradio")
import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from app_helpers import api_client, shared_app_server  # noqa: E402

SECRET = "MMGCS-SECRET-MARKER-7f3a"
FILE_DATA = {"_type": "gradio.FileData"}
TIMEOUT = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    return shared_app_server(tmp_path_factory)


@pytest.fixture(scope="module")
def secret_file(tmp_path_factory) -> Path:
    """A file outside Gradio's upload folder that a client must never be able to read, even if it is an image."""
    path = tmp_path_factory.mktemp("server-secrets") / "secret.png"
    image = io.BytesIO()
    Image.new("RGB", (40, 60), (9, 9, 9)).save(image, format="PNG")
    path.write_bytes(image.getvalue() + SECRET.encode())
    return path


def call(server, data: list | None = None, body: bytes | None = None) -> dict:
    """POST /gradio_api/call/predict as a raw client; returns the final event as {"event", "data"}."""
    content = body if body is not None else json.dumps({"data": data}).encode()
    r = httpx.post(server.url + "/gradio_api/call/predict", content=content,
                   headers={"content-type": "application/json"}, timeout=TIMEOUT)
    if r.status_code != 200:
        return {"event": f"http {r.status_code}", "data": r.text}
    event_id = r.json()["event_id"]
    text = httpx.get(server.url + f"/gradio_api/call/predict/{event_id}", timeout=TIMEOUT).text
    events = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith(("event:", "data:"))]
    return {"event": events[-2], "data": json.loads(events[-1])}


def refusal(server, data: list) -> str:
    answer = call(server, data)
    assert answer["event"] == "error", answer
    message = answer["data"]["error"]
    assert message, answer  # a refusal always says why
    return message


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def assert_healthy(server) -> None:
    assert server.alive()
    answer = call(server, ["A detective hunts a killer.", None, None])
    assert answer["event"] == "complete" and answer["data"][0]["scores"], answer


@pytest.mark.parametrize("with_meta", [False, True], ids=["no-meta", "meta"])
def test_a_server_file_is_never_read_nor_echoed(server, secret_file, with_meta):
    for path in (str(secret_file), "/etc/passwd", "/proc/self/environ", "../../../../etc/hostname"):
        poster = {"path": path, **({"meta": FILE_DATA} if with_meta else {})}
        message = refusal(server, ["a plot", poster, None])
        assert SECRET not in message and "root:" not in message and str(secret_file.parent) not in message
    assert SECRET not in server.log_text()


def test_a_symlink_in_the_upload_folder_pointing_out_is_refused(server, secret_file):
    folder = server.uploads / "mmgcs-test-link"
    folder.mkdir(parents=True, exist_ok=True)
    link = folder / "poster.png"
    link.unlink(missing_ok=True)
    link.symlink_to(secret_file)
    try:
        message = refusal(server, ["a plot", {"path": str(link), "meta": FILE_DATA}, None])
    finally:
        link.unlink()
    assert "not a file uploaded" in message or "could not be used" in message
    assert SECRET not in message


def test_pipes_never_hang_the_model_slots(server, tmp_path):
    """A read that never returns (a FIFO, /proc/self/fd/N) would hold a slot forever; 20 of them must not."""
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    paths = [str(fifo), "/proc/self/fd/0", "/proc/self/fd/1", "/dev/stdin"] * 5
    start = time.monotonic()
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda p: call(server, ["a plot", {"path": p, "meta": FILE_DATA}, None]), paths))
    assert all(a["event"] == "error" and a["data"]["error"] for a in answers), answers
    assert time.monotonic() - start < 60
    assert_healthy(server)


def test_dev_zero_is_refused_without_growing_the_server(server):
    before = rss_mb(server.proc.pid)
    for with_meta in (False, True):
        poster = {"path": "/dev/zero", **({"meta": FILE_DATA} if with_meta else {})}
        assert refusal(server, ["a plot", poster, None])
    assert rss_mb(server.proc.pid) - before < 100
    assert_healthy(server)


@pytest.mark.parametrize(
    "data, field",
    [
        ([123, None, None], "plot"), ([True, None, None], "plot"), ([["a"], None, None], "plot"),
        ([{"a": 1}, None, None], "plot"), (["a plot", None, 5], "title"), (["a plot", 5, None], "poster"),
        (["a plot", "poster.png", None], "poster"), (["a plot", [1, 2], None], "poster"),
        (["a plot"], "/predict takes 3 values"), ([], "/predict takes 3 values"),
    ],
    ids=["int", "bool", "list", "object", "title-int", "poster-int", "poster-str", "poster-list", "short", "empty"],
)
def test_wrong_json_types_are_refused_with_a_message(server, data, field):
    assert field in refusal(server, data)


def test_a_private_or_bare_url_gets_a_message(server):
    for poster in ({"url": "http://127.0.0.1:9/x.png", "meta": FILE_DATA}, {"url": "http://127.0.0.1:9/x.png"},
                   {"url": "ftp://example.com/x.png", "meta": FILE_DATA}):
        assert refusal(server, ["a plot", poster, None])
    assert_healthy(server)


@pytest.mark.parametrize("field", [0, 2], ids=["plot", "title"])
def test_a_lone_surrogate_is_a_user_error_not_a_traceback(server, field):
    data = ["a plot", None, None]
    data[field] = "a \ud800 surrogate"
    body = json.dumps({"data": data}).encode()  # json escapes it as \ud800, as a raw client would send it
    answer = call(server, body=body)
    assert answer["event"] == "error" and "surrogate" in answer["data"]["error"], answer
    assert "Traceback" not in server.log_text()


def test_a_huge_json_body_is_refused_before_it_is_read(server):
    before = rss_mb(server.proc.pid)
    inline = "data:image/png;base64," + "A" * (100 * 2**20)
    answer = call(server, body=json.dumps({"data": ["p", {"url": inline, "path": "x.png", "meta": FILE_DATA}, None]}).encode())
    assert answer["event"] == "http 413" and "larger than this app accepts" in answer["data"]
    assert rss_mb(server.proc.pid) - before < 100
    assert_healthy(server)


def test_a_thin_image_small_as_a_file_is_refused(server):
    """A 1 x 900,000 PNG is a few KB and within the pixel limit, but resizing it would take GBs."""
    image = io.BytesIO()
    Image.new("RGB", (1, 900_000)).save(image, format="PNG")
    path = Path(server.log.parent) / "thin.png"
    path.write_bytes(image.getvalue())
    client = api_client(server.url)
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    try:
        with pytest.raises(AppError, match="too thin"):
            client.predict(poster=handle_file(path), api_name="/predict")
    finally:
        client.close()
    assert_healthy(server)
