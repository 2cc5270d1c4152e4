"""The Space against one client that floods it over raw HTTP (issue 18): the page-only handlers, the upload folder,
the queue and explain requests. One app, started for this module with a small upload cap and the full poster pixel
limit; every loop here is bounded in count and time, and the app is stopped (its uploads deleted) at the end."""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("gradio")
import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from app_helpers import api_client, save_tiny_bundle, start_app  # noqa: E402
from mmgcs.uploads import folder_bytes  # noqa: E402

TIMEOUT = 60
UPLOAD_CAP_MB = 12
PLOT = "A ghost haunts an old house at night."
FILE_DATA = {"_type": "gradio.FileData"}
FLOOD_ENV = {
    "MMGCS_MAX_UPLOAD_FOLDER_MB": str(UPLOAD_CAP_MB),
    "MMGCS_MAX_IMAGE_PIXELS": "40000000",  # the default: a 6300 x 6300 PNG is a poster the app accepts
    "MMGCS_MAX_DECODED_PIXELS": "40000000",  # one such poster decoded at a time
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("flood")
    server = start_app(save_tiny_bundle(workdir / "model"), workdir, **FLOOD_ENV)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def fns(server) -> dict[str, int]:
    config = httpx.get(server.url + "/config", timeout=TIMEOUT).json()
    return {d["api_name"]: d["id"] for d in config["dependencies"] if d.get("api_name")}


def upload(server, name: str, data: bytes) -> dict:
    answer = httpx.post(server.url + "/gradio_api/upload", files=[("files", (name, data))], timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    (path,) = answer.json()
    return {"path": path, "orig_name": name, "meta": FILE_DATA}


@pytest.fixture(scope="module")
def posters(server) -> dict[str, dict]:
    """Uploaded before the upload-cap test fills the folder: a small poster and a 6300 x 6300 PNG (~130 KB)."""
    small, huge = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (60, 90), (200, 20, 20)).save(small, format="PNG")
    Image.new("RGB", (6300, 6300), (9, 9, 9)).save(huge, format="PNG")
    assert len(huge.getvalue()) < 200_000
    return {"small": upload(server, "small.png", small.getvalue()), "huge": upload(server, "huge.png", huge.getvalue())}


FLOODER = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"), timeout=TIMEOUT)


def join(server, fn: int, data: list, session: str | None = None, flood: bool = False) -> httpx.Response:
    """POST queue/join; with `flood`, from another loopback address (127.0.0.2) than the callers timed after it: on
    a real server they are two clients, each with its own per-address cap."""
    body = {"fn_index": fn, "data": data, "session_hash": session or uuid.uuid4().hex[:12]}
    return (FLOODER if flood else httpx).post(server.url + "/gradio_api/queue/join", json=body, timeout=TIMEOUT)


def run_job(server, fn: int, data: list) -> tuple[str, object]:
    """Join the queue with a session of its own and read its stream to the end: ("complete" | "error", output)."""
    session = uuid.uuid4().hex[:12]
    answer = join(server, fn, data, session)
    assert answer.status_code == 200, answer.text
    with httpx.stream("GET", server.url + f"/gradio_api/queue/data?session_hash={session}", timeout=TIMEOUT) as r:
        for line in r.iter_lines():
            if line.startswith("data:"):
                message = json.loads(line[5:])
                if message.get("msg") == "process_completed":
                    output = message.get("output") or {}
                    return ("complete" if message.get("success") else "error"), output
    raise AssertionError("the stream ended without a result")


def queued(server) -> int:
    return httpx.get(server.url + "/gradio_api/queue/status", timeout=TIMEOUT).json()["queue_size"]


def vm(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(field)


def timed_predict(server) -> float:
    client = api_client(server.url)
    try:
        start = time.perf_counter()
        assert client.predict(plot="A detective hunts a killer.", api_name="/predict")["scores"]
        return time.perf_counter() - start
    finally:
        client.close()


# ------------------------------------------------------------------------------------------------------------------
# The page-only handlers: queued, bounded, no file per call, their inputs checked.


def test_a_page_only_handler_cannot_run_outside_the_queue(server, fns):
    for name in ("explanation_view", "explanation_view_1", "predict", "predict_explained"):
        answer = httpx.post(server.url + "/gradio_api/run/predict", json={"fn_index": fns[name], "data": []},
                            timeout=TIMEOUT)
        assert answer.status_code == 404 and "join the queue" in answer.text, (name, answer.text)
    answer = httpx.post(server.url + "/gradio_api/run/predict", json={"fn_index": fns["js_fn"], "data": []},
                        timeout=TIMEOUT)
    assert answer.status_code == 404 and "runs in the page" in answer.text
    assert "Traceback" not in server.log_text()


def test_the_heat_map_of_a_huge_poster_is_bounded_and_writes_no_file(server, fns, posters):
    """The reported attack: the explanation view called with a 7 x 7 map and a 6300 x 6300 PNG, several at once."""
    result = {"explanation": {"text": "a", "genres": {"Drama": {"occlusion": [[0.5] * 7] * 7, "words": []}}}}
    before_files = sorted(p for p in server.uploads.rglob("*") if p.is_file())
    before_peak = vm(server.proc.pid, "VmHWM")
    start = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: run_job(server, fns["explanation_view_1"], [result, None, posters["huge"]]),
                                range(4)))
    assert time.monotonic() - start < 120
    for status, output in answers:
        assert status == "complete", output
        heat = output["data"][2]
        assert heat["path"] is None and heat["url"].startswith("data:image/webp;base64,")  # inline, no file
        assert len(heat["url"]) < 200_000  # drawn on a thumbnail, not on 40 megapixels
    assert sorted(p for p in server.uploads.rglob("*") if p.is_file()) == before_files
    # one 40 MP poster decoded at a time (the pixel budget), then let go: the server's peak grows by about one
    assert vm(server.proc.pid, "VmHWM") - before_peak < 700
    assert server.alive() and "Traceback" not in server.log_text()


@pytest.mark.parametrize("data, logged", [
    ([{"explanation": {"text": "a", "genres": {"Nope": {}}}}, None, None], "malformed result"),
    ([{"explanation": "not a dict"}, None, None], "malformed result"),
    ([None, "<script>", None], "not in the list of choices"),
    ([{"scores": {"Action": 0.5}, "genres": []}, 12345, None], "refused a request"),
], ids=["unknown-genre", "explanation-str", "dropdown-value", "dropdown-int"])
def test_bad_values_sent_to_a_page_handler_log_one_line(server, fns, data, logged):
    before = server.log_text()
    status, _ = run_job(server, fns["explanation_view_1"], data)
    new = server.log_text()[len(before):]
    assert "Traceback" not in new and len(new.strip().splitlines()) <= 2, new
    assert logged in new, new
    assert status in ("complete", "error")
    assert server.alive()


def test_a_malformed_result_sent_to_render_logs_one_line(server, fns):
    before = server.log_text()
    for result in ({"scores": "x"}, {"scores": {"Action": 0.5}, "genres": ["Nope"]}, [1, 2]):
        answer = httpx.post(server.url + "/gradio_api/run/predict", json={"fn_index": fns["render"],
                            "data": [result, None]}, timeout=TIMEOUT)
        assert answer.status_code == 200 and answer.json()["data"][0] == ""
    new = server.log_text()[len(before):]
    assert "Traceback" not in new and new.count("malformed result") == 3


# ------------------------------------------------------------------------------------------------------------------
# The queue: a per-client cap checked when a job joins, explain requests in their own queue share.


def test_a_queue_flood_from_one_session_is_capped_with_a_message(server, fns, posters):
    """The reported attack: 300 explain joins from one client, never reading the results."""
    session = uuid.uuid4().hex[:12]
    data = [PLOT, posters["small"], None, True]
    start = time.monotonic()
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: join(server, fns["predict"], data, session, flood=True), range(300)))
    waiting = queued(server)
    assert time.monotonic() - start < 120
    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) + sum(a.status_code == 200 for a in answers) == 300
    assert len(refused) >= 150, len(refused)  # all but the few admitted while earlier ones finished
    assert all("Too many requests queued from this client" in a.json()["detail"] for a in refused)
    assert waiting <= 4  # MMGCS_MAX_JOBS_PER_SESSION's default
    assert timed_predict(server) < 10
    assert server.log_text().count("over the per-client cap") <= 3  # one line a minute, not one a request


def test_an_explain_backlog_never_holds_up_plain_predictions(server, fns, posters):
    """Explain requests from many sessions of one address: at most MMGCS_MAX_JOBS_PER_IP (32) are admitted; they wait
    in their own queue share, and a plain prediction sent after them is answered first."""
    data = [PLOT, posters["small"], None, True]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: join(server, fns["predict"], data, flood=True), range(100)))
    backlog = queued(server)
    refused = [a for a in answers if a.status_code == 429]
    assert len(refused) >= 40
    assert all("32 are queued or running from this address" in a.json()["detail"] for a in refused)
    assert 0 < backlog <= 32
    took = timed_predict(server)  # from 127.0.0.1: its own address, under its own cap
    assert took < 10 and queued(server) > 0, (took, backlog)  # it overtook explain jobs sent before it


# ------------------------------------------------------------------------------------------------------------------
# The upload folder: one file per request, a cap in bytes, deleted when the app stops.


def _multipart(n_files: int, size: int) -> tuple[bytes, str]:
    boundary = "mmgcsFloodBoundary7"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="files"; filename="f{i}.bin"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode() + os.urandom(size) + b"\r\n"
        for i in range(n_files)
    )
    return parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_an_upload_request_with_many_files_is_refused_and_leaves_nothing(server, posters):
    before = folder_bytes(server.uploads)
    body, content_type = _multipart(200, 20_000)
    answer = httpx.post(server.url + "/gradio_api/upload", content=body, headers={"content-type": content_type},
                        timeout=TIMEOUT)
    assert answer.status_code == 413 and "one file per upload request" in answer.json()["detail"]
    assert folder_bytes(server.uploads) == before  # the first file, already written, was deleted too
    body, content_type = _multipart(1, 20_000)
    answer = httpx.post(server.url + "/gradio_api/upload", content=body, headers={"content-type": content_type},
                        timeout=TIMEOUT)
    assert answer.status_code == 200 and len(answer.json()) == 1


def test_the_upload_folder_stops_at_its_cap(server, posters):
    """The reported flood, scaled to the test limits: unique files of nearly the size limit, one per request."""
    statuses = []
    for i in range(2 * UPLOAD_CAP_MB):
        answer = httpx.post(server.url + "/gradio_api/upload", files=[("files", (f"f{i}.bin", os.urandom(900_000)))],
                            timeout=TIMEOUT)
        statuses.append(answer.status_code)
    assert set(statuses) == {200, 507} and statuses.index(507) >= UPLOAD_CAP_MB // 2
    assert "upload space is full" in answer.json()["detail"]
    assert folder_bytes(server.uploads) <= (UPLOAD_CAP_MB + 1) * 2**20
    assert server.alive()


def test_the_uploads_are_deleted_when_the_app_stops(server, posters):
    assert folder_bytes(server.uploads) > 0
    server.stop()  # SIGTERM, as a host stops a server
    assert server.proc.returncode == 0
    assert folder_bytes(server.uploads) == 0
