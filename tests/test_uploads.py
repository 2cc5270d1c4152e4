"""mmgcs.uploads: what a server may read of a client's poster, the decoded-pixel budget and the body limit."""

from __future__ import annotations

import base64
import os
import threading
import time

import pytest

from mmgcs.uploads import BodySizeLimit, PixelBudget, UploadError, decode_data_url, read_upload


def test_read_upload_reads_a_regular_file_inside_the_folder(tmp_path):
    (tmp_path / "up").mkdir()
    (tmp_path / "up" / "a.png").write_bytes(b"12345")
    assert read_upload(tmp_path / "up" / "a.png", [tmp_path / "up"], 10) == b"12345"


@pytest.mark.parametrize("make", ["outside", "dotdot", "symlink-out", "fifo", "dev-zero", "folder"])
def test_read_upload_refuses_what_is_not_an_upload(tmp_path, make):
    up = tmp_path / "up"
    up.mkdir()
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"SECRET")
    path = {
        "outside": secret,
        "dotdot": up / ".." / "secret.png",
        "symlink-out": up / "link.png",
        "fifo": up / "pipe.png",
        "dev-zero": up / "zero.png",
        "folder": up / "dir.png",
    }[make]
    if make == "symlink-out":
        path.symlink_to(secret)
    elif make == "fifo":
        os.mkfifo(path)  # an open without O_NONBLOCK would wait for a writer forever
    elif make == "dev-zero":
        path.symlink_to("/dev/zero")
    elif make == "folder":
        path.mkdir()
    with pytest.raises(UploadError) as err:
        read_upload(path, [up], 1000)
    assert "SECRET" not in str(err.value) and str(tmp_path) not in str(err.value)


def test_read_upload_stops_at_the_byte_limit(tmp_path):
    (tmp_path / "big.png").write_bytes(b"x" * 5000)
    with pytest.raises(UploadError, match="limit"):
        read_upload(tmp_path / "big.png", [tmp_path], 4999)


def test_a_data_url_is_refused_by_its_length_before_decoding():
    assert decode_data_url("data:image/png;base64," + base64.b64encode(b"abc").decode(), 10) == b"abc"
    with pytest.raises(UploadError, match="limit"):
        decode_data_url("data:image/png;base64," + "A" * 4000, 1000)
    with pytest.raises(UploadError, match="base64"):
        decode_data_url("data:image/png;base64,@@@@", 1000)
    with pytest.raises(UploadError, match="base64"):
        decode_data_url("data:text/plain,hello", 1000)


def test_the_pixel_budget_makes_a_request_wait_then_refuses_it():
    budget = PixelBudget(100, timeout=0.3)
    with budget.reserve(70):
        assert budget.in_use == 70
        start = time.monotonic()
        with pytest.raises(UploadError, match="busy"):
            with budget.reserve(40):
                pass
        assert time.monotonic() - start >= 0.25
        with budget.reserve(30):  # what fits goes at once
            assert budget.in_use == 100
    assert budget.in_use == 0
    with budget.reserve(10_000):  # one image over the budget still runs alone (its own limit is checked apart)
        assert budget.in_use == 100


def test_the_pixel_budget_lets_a_waiting_request_in_when_another_ends():
    budget = PixelBudget(100, timeout=5)
    entered = threading.Event()

    def second():
        with budget.reserve(60):
            entered.set()

    with budget.reserve(60):
        t = threading.Thread(target=second)
        t.start()
        time.sleep(0.2)
        assert not entered.is_set()
    t.join(5)
    assert entered.is_set() and budget.in_use == 0


def _asgi_echo():
    async def app(scope, receive, send):
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": str(len(body)).encode()})

    return app


def test_the_body_limit_refuses_large_bodies_declared_or_streamed():
    from starlette.testclient import TestClient

    client = TestClient(BodySizeLimit(_asgi_echo(), max_bytes=1000, exempt=("/upload",)))
    assert client.post("/call", content=b"x" * 1000).text == "1000"
    assert client.post("/call", content=b"x" * 1001).status_code == 413
    chunked = client.post("/call", content=iter([b"x" * 600, b"x" * 600]))  # no Content-Length
    assert chunked.status_code == 413 and "larger than this app accepts" in chunked.text
    assert client.post("/gradio_api/upload", content=b"x" * 5000).text == "5000"  # Gradio limits uploads itself
