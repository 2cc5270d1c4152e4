"""Poster downloader and CSV source against a real HTTP server on 127.0.0.1 (no internet).

The downloader refuses loopback addresses unless told otherwise, so the tests that fetch from the local server
pass allow_private_hosts=True explicitly; the ones without it check the refusal itself (the address rule on its own:
tests/test_data_netguard.py)."""

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
# stands for a secret the server (or a file it reads) holds: it must never reach an error or a report
MARKER = "ROOT-SECRET-7f3a9c"
SECRET_BODY = f"{MARKER}:x:0:0:root:/root:/bin/bash\n".encode() * 3  # an /etc/passwd look-alike


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
            elif path == "/secret.jpg":
                self._send(200, SECRET_BODY, "text/plain")
            elif path == "/reason.jpg":  # a reason phrase is free text the server chooses
                self._send(404, b"", "text/plain", reason=f"Not Found {MARKER}")
            elif path == "/redirect-same.jpg":
                self._redirect("/ok-after-redirect.jpg")
            elif path == "/redirect-host.jpg":  # the same server under another name
                self._redirect(f"http://localhost:{self.server.server_address[1]}/ok-other-host.jpg")
            elif path == "/redirect-ftp.jpg":
                self._redirect(f"ftp://127.0.0.1:{self.server.server_address[1]}/ok-ftp.jpg")
            elif path == "/flaky.jpg":
                if self.hits[path] == 1:
                    self._send(503, b"busy", "text/plain")
                else:
                    self._send(200, JPEG, "image/jpeg")
            else:
                self._send(404, b"", "text/plain")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout test)

    def _redirect(self, location):
        self.send_response(302)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _send(self, code, body, ctype, reason=None):
        self.send_response(code, reason)
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
    kw = {"rate": 0, "timeout": 0.4, "retries": 2, "backoff": 0.05, "allow_private_hosts": True, **kw}
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
    assert r.path is None and "not an image" in r.error and "48 bytes" in r.error
    assert "doctype" not in r.error.lower()  # the body is never quoted (it went into the report)
    assert not d.cache_path(f"{base}/html.jpg").exists()


def test_errors_quote_nothing_the_server_sent(server, tmp_path):
    base, _ = server
    d = _downloader(tmp_path)
    body = d.fetch(f"{base}/secret.jpg")
    assert "not an image" in body.error and f"{len(SECRET_BODY):,} bytes" in body.error
    status = d.fetch(f"{base}/reason.jpg")
    assert status.error == "HTTP 404 Not Found"  # the standard phrase, not the server's
    assert MARKER not in body.error and MARKER not in status.error


def test_loopback_is_refused_without_the_option(server, tmp_path):
    base, hits = server
    port = base.rsplit(":", 1)[1]
    d = _downloader(tmp_path, allow_private_hosts=False)
    for url in (f"{base}/ok.jpg", f"http://localhost:{port}/ok.jpg", f"http://[::ffff:127.0.0.1]:{port}/ok.jpg"):
        r = d.fetch(url)
        assert r.path is None and r.error.startswith("refused:") and "public hosts only" in r.error, url
        assert r.attempts == 1  # not retried: it cannot succeed
    assert sum(hits.values()) == 0  # no connection was made
    assert not any((tmp_path / "cache").glob("*"))


def test_redirect_is_followed_only_on_the_same_host_and_scheme(server, tmp_path):
    base, hits = server
    d = _downloader(tmp_path)  # loopback allowed: the redirect rule holds all the same
    same = d.fetch(f"{base}/redirect-same.jpg")
    assert same.error is None and same.path.read_bytes() == JPEG and hits["/ok-after-redirect.jpg"] == 1
    other = d.fetch(f"{base}/redirect-host.jpg")
    assert other.path is None and "redirected to another host; refused" in other.error and other.attempts == 1
    ftp = d.fetch(f"{base}/redirect-ftp.jpg")
    assert ftp.path is None and "redirected to another scheme; refused" in ftp.error
    assert hits["/ok-other-host.jpg"] == 0 and "localhost" not in other.error  # the target is not quoted


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
                                download_retries=1, allow_private_hosts=True))
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
                       poster_cache=str(tmp_path / "cache"), download_rate=0, download_timeout=1.0, download_retries=0,
                       allow_private_hosts=True))
    assert hits["/ok1.jpg"] == 1
    assert json.loads((tmp_path / "out" / "build_report.json").read_text())["sources"]["csvsrc"]["format"] == "csv"


def _csv_source(tmp_path, lines):
    src = tmp_path / "csvsrc"
    src.mkdir(parents=True)
    (src / "movies.csv").write_text("\n".join(["id,title,overview,genres,poster_url,poster_path", *lines]) + "\n",
                                    encoding="utf-8")
    return src


def test_build_report_quotes_no_response_and_refuses_private_hosts(server, tmp_path):
    base, hits = server
    src = _csv_source(tmp_path, [f"1,One,A plot.,Drama,{base}/secret.jpg,", f"2,Two,B plot.,Drama,{base}/reason.jpg,",
                                 f"3,Three,C plot.,Drama,{base}/redirect-host.jpg,", "4,Four,D plot.,Drama,,",
                                 "5,Five,E plot.,Drama,,"])
    opts = dict(sources=[str(src)], min_genre_count=1, progress=False, poster_cache=str(tmp_path / "cache"),
                download_rate=0, download_timeout=1.0, download_retries=0)
    allowed = build(BuildOptions(out=str(tmp_path / "out"), allow_private_hosts=True, **opts))
    text = (tmp_path / "out" / "build_report.json").read_text(encoding="utf-8")
    failed = {e["id"]: e["detail"] for e in allowed.report["events"] if e["reason"] == "poster_download_failed"}
    assert "not an image" in failed[1] and "HTTP 404 Not Found" in failed[2] and "another host" in failed[3]
    assert MARKER not in text
    before = sum(hits.values())
    refused = build(BuildOptions(out=str(tmp_path / "out2"), **opts))  # the default: public hosts only
    failed = {e["id"]: e["detail"] for e in refused.report["events"] if e["reason"] == "poster_download_failed"}
    assert set(failed) == {1, 2, 3} and all("public hosts only" in d for d in failed.values())
    assert sum(hits.values()) == before  # not one request reached the local server


def test_cli_allow_private_hosts_flag(server, tmp_path):
    from mmgcs.data.__main__ import main

    base, hits = server
    rows = [f"{i},T{i},Plot {i}.,Drama,{base}/ok{i}.jpg," for i in range(1, 4)]
    src = _csv_source(tmp_path, rows)
    args = ["build", "--source", str(src), "--min-genre-count", "1", "--no-progress", "--download-rate", "0",
            "--download-retries", "0", "--poster-cache", str(tmp_path / "cache")]
    assert main([*args, "--out", str(tmp_path / "default")]) == 0
    assert sum(hits.values()) == 0
    assert main([*args, "--out", str(tmp_path / "allowed"), "--allow-private-hosts"]) == 0
    report = json.loads((tmp_path / "allowed" / "build_report.json").read_text())
    assert report["totals"]["with_poster"] == 3 and sum(hits.values()) == 3
