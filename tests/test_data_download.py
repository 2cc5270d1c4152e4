"""Poster downloader and CSV source against a real HTTP server on 127.0.0.1 (no internet)."""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data_helpers import image_bytes
from mmgcs.data.build import BuildOptions, build
from mmgcs.data.download import PosterDownloader

JPEG = image_bytes("JPEG", size=(40, 60), seed=11)


class _Handler(BaseHTTPRequestHandler):
    hits: Counter = Counter()

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        path = self.path.split("?")[0]
        self.hits[path] += 1
        try:
            if path.startswith("/ok"):
                self._send(200, JPEG, "image/jpeg")
            elif path == "/missing.jpg":
                self._send(404, b"not found", "text/plain")
            elif path == "/slow.jpg":
                time.sleep(1.5)
                self._send(200, JPEG, "image/jpeg")
            elif path == "/html.jpg":
                self._send(200, b"<!doctype html><html><body>Sign in</body></html>", "text/html")
            elif path == "/flaky.jpg":
                if self.hits[path] == 1:
                    self._send(503, b"busy", "text/plain")
                else:
                    self._send(200, JPEG, "image/jpeg")
            else:
                self._send(404, b"", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def _send(self, code, body, ctype):
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def server():
    _Handler.hits = Counter()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)  # port 0: a free port
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", _Handler.hits
    httpd.shutdown()
    httpd.server_close()


def _downloader(tmp_path, **kw):
    kw = {"rate": 0, "timeout": 0.4, "retries": 2, "backoff": 0.05, **kw}
    return PosterDownloader(tmp_path / "cache", **kw)


def test_good_poster_is_cached_and_not_fetched_twice(server, tmp_path):
    base, hits = server
    d = _downloader(tmp_path)
    first = d.fetch(f"{base}/ok.jpg")
    assert first.error is None and first.path.read_bytes() == JPEG and not first.cached
    second = d.fetch(f"{base}/ok.jpg")
    assert second.cached and second.path == first.path and hits["/ok.jpg"] == 1


def test_404_fails_at_once_without_retry(server, tmp_path):
    base, hits = server
    r = _downloader(tmp_path).fetch(f"{base}/missing.jpg")
    assert r.path is None and "HTTP 404" in r.error and hits["/missing.jpg"] == 1


def test_slow_server_times_out_after_retries(server, tmp_path):
    base, hits = server
    start = time.perf_counter()
    r = _downloader(tmp_path, retries=1).fetch(f"{base}/slow.jpg")
    assert r.path is None and "timed out" in r.error and r.attempts == 2
    assert time.perf_counter() - start < 1.5  # never waited for the slow body


def test_non_image_body_is_refused_and_not_cached(server, tmp_path):
    base, _ = server
    d = _downloader(tmp_path)
    r = d.fetch(f"{base}/html.jpg")
    assert r.path is None and "not an image" in r.error and "doctype" in r.error
    assert not d.cache_path(f"{base}/html.jpg").exists()


def test_server_error_is_retried_with_backoff(server, tmp_path):
    base, hits = server
    r = _downloader(tmp_path, backoff=0.2).fetch(f"{base}/flaky.jpg")
    assert r.error is None and r.attempts == 2 and hits["/flaky.jpg"] == 2


def test_rate_limit_spaces_requests(server, tmp_path):
    base, _ = server
    urls = [f"{base}/ok{i}.jpg" for i in range(6)]
    start = time.perf_counter()
    results = _downloader(tmp_path, rate=10, workers=4).fetch_many(urls)
    assert time.perf_counter() - start >= 0.45  # 6 request starts at 10/s need 0.5 s
    assert all(r.path is not None for r in results.values())


def test_csv_source_downloads_posters_and_reports_failures(server, tmp_path):
    base, hits = server
    src = tmp_path / "csvsrc"
    (src / "img").mkdir(parents=True)
    (src / "img" / "local.jpg").write_bytes(JPEG)
    lines = [
        "id,title,overview,genres,poster_url,poster_path",
        f'1,One,"A plot, with a comma.",Action|Comedy,{base}/ok1.jpg,',
        f'2,Two,Another plot.,"[{{""id"": 18, ""name"": ""Drama""}}]",{base}/missing.jpg,',
        f"3,Three,Third plot.,\"['Comedy', 'Drama']\",{base}/html.jpg,",
        "4,Four,Fourth plot.,Action;Drama,,img/local.jpg",
        f"5,Five,,Drama,{base}/missing.jpg,",  # no plot and the poster fails: dropped
        f"6,Six,Sixth plot.,Comedy,{base}/ok1.jpg,",  # same URL as row 1: fetched once
    ]
    (src / "movies.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = build(BuildOptions(sources=[str(src)], out=str(tmp_path / "out"), min_genre_count=1, progress=False,
                                poster_cache=str(tmp_path / "cache"), download_rate=0, download_timeout=1.0,
                                download_retries=1))
    kept = {r["id"]: r for split in result.dataset.values() for r in split}
    names = result.dataset["train"].features["genres"].feature.names
    assert set(kept) == {1, 2, 3, 4, 6}
    assert kept[1]["poster"] is not None and kept[4]["poster"] is not None and kept[6]["poster"] is not None
    assert kept[2]["poster"] is None and kept[3]["poster"] is None
    assert [names[g] for g in kept[1]["genres"]] == ["Action", "Comedy"]
    assert [names[g] for g in kept[2]["genres"]] == ["Drama"] and [names[g] for g in kept[3]["genres"]] == ["Comedy", "Drama"]
    failed = {e["id"]: e["detail"] for e in result.report["events"] if e["reason"] == "poster_download_failed"}
    assert "HTTP 404" in failed[2] and "not an image" in failed[3] and 5 in failed
    assert [e["id"] for e in result.report["events"] if e["action"] == "dropped"] == [5]
    assert hits["/ok1.jpg"] == 1 and hits["/missing.jpg"] == 1  # distinct URLs are fetched once
    # a second build reuses the cache: no new request for the good poster
    build(BuildOptions(sources=[str(src)], out=str(tmp_path / "out2"), min_genre_count=1, progress=False,
                       poster_cache=str(tmp_path / "cache"), download_rate=0, download_timeout=1.0, download_retries=0))
    assert hits["/ok1.jpg"] == 1
    assert json.loads((tmp_path / "out" / "build_report.json").read_text())["sources"]["csvsrc"]["format"] == "csv"
