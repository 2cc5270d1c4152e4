"""Poster downloads into a cache folder: rate-limited, retried with backoff, timed out, skipped when present.

Only an identifiable image is ever written to the cache (an HTML error page served with 200 is refused), and it is
written atomically, so an interrupted build never leaves a half file that a later build would trust.

Only public addresses are fetched, and a redirect is followed only on the same host and scheme (netguard.py).
An error names the problem in the downloader's own words and sizes: nothing the server sent (body, reason
phrase, redirect target) is quoted, since the errors go into build_report.json, which ships with the dataset.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from urllib.parse import urlparse

import PIL.Image

from mmgcs.data.images import MAX_IMAGE_BYTES
from mmgcs.data.netguard import RefusedURL, opener

USER_AGENT = "mmgcs-dataset-builder/0.1"
_RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclass(frozen=True)
class DownloadResult:
    url: str
    path: Path | None  # the cached file, when the poster could be had
    error: str | None = None
    cached: bool = False  # True when the file was already in the cache (no request made)
    attempts: int = 0


class RateLimiter:
    """At most `rate` request starts per second, shared by all worker threads."""

    def __init__(self, rate: float):
        self.interval = 1.0 / rate if rate and rate > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


class PosterDownloader:
    def __init__(
        self,
        cache_dir: str | os.PathLike,
        rate: float = 5.0,
        timeout: float = 10.0,
        retries: int = 3,
        backoff: float = 0.5,
        workers: int = 4,
        max_bytes: int = MAX_IMAGE_BYTES,
        allow_private_hosts: bool = False,
    ):
        self.cache_dir = Path(cache_dir)
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.workers = max(1, workers)
        self.max_bytes = max_bytes
        self.limiter = RateLimiter(rate)
        # False: loopback, private, link-local, reserved and multicast addresses are refused (netguard.py)
        self.allow_private_hosts = allow_private_hosts

    def cache_path(self, url: str) -> Path:
        ext = Path(urlparse(url).path).suffix.lower()
        ext = ext if ext in (".jpg", ".jpeg", ".png", ".webp", ".gif") else ".img"
        return self.cache_dir / (hashlib.sha256(url.encode()).hexdigest()[:24] + ext)

    def fetch(self, url: str) -> DownloadResult:
        path = self.cache_path(url)
        if path.is_file() and path.stat().st_size > 0:
            return DownloadResult(url, path, cached=True)
        if urlparse(url).scheme not in ("http", "https"):
            return DownloadResult(url, None, f"not an http(s) URL: {url!r}")
        error = "no attempt made"
        for attempt in range(1, self.retries + 2):
            self.limiter.wait()
            data, error, retry_after = self._get(url)
            if data is not None:
                problem = _not_an_image(data)
                if problem:
                    return DownloadResult(url, None, problem, attempts=attempt)
                self._store(path, data)
                return DownloadResult(url, path, attempts=attempt)
            if retry_after is None or attempt > self.retries:
                return DownloadResult(url, None, error, attempts=attempt)
            time.sleep(max(retry_after, self.backoff * 2 ** (attempt - 1)))
        return DownloadResult(url, None, error, attempts=self.retries + 1)

    def fetch_many(self, urls: list[str], progress=None) -> dict[str, DownloadResult]:
        """Fetch distinct URLs with `workers` threads; `progress(result)` is called as each finishes."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        results: dict[str, DownloadResult] = {}
        unique = list(dict.fromkeys(urls))
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            for result in pool.map(self.fetch, unique):
                results[result.url] = result
                if progress:
                    progress(result)
        return results

    def _get(self, url: str) -> tuple[bytes | None, str | None, float | None]:
        """(body, error, retry_after): retry_after is None when retrying cannot help (404, bad URL)."""
        request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT, "Accept": "image/*"})
        deadline = time.monotonic() + self.timeout
        try:
            with opener(self.allow_private_hosts).open(request, timeout=self.timeout) as response:
                declared = response.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self.max_bytes:
                    return None, f"poster is {int(declared):,} bytes, over the {self.max_bytes:,} limit", None
                chunks, size = [], 0
                while chunk := response.read(64 * 1024):
                    size += len(chunk)
                    if size > self.max_bytes:
                        return None, f"poster is over the {self.max_bytes:,} byte limit", None
                    if time.monotonic() > deadline:  # a server trickling bytes must not hold the build forever
                        return None, f"timed out after {self.timeout:g} s (slow transfer)", 0.0
                    chunks.append(chunk)
                return b"".join(chunks), None, None
        except urllib.error.HTTPError as e:
            e.close()
            retry = e.code in _RETRY_STATUS
            retry_after = _retry_after(e.headers.get("Retry-After")) if retry else None
            return None, f"HTTP {e.code} {_phrase(e.code)}", (retry_after if retry_after is not None else 0.0) if retry else None
        except RefusedURL as e:  # retrying cannot help
            return None, f"refused: {e}", None
        except (TimeoutError, socket.timeout):
            return None, f"timed out after {self.timeout:g} s", 0.0
        except urllib.error.URLError as e:
            reason = e.reason
            if isinstance(reason, (TimeoutError, socket.timeout)):
                return None, f"timed out after {self.timeout:g} s", 0.0
            if isinstance(reason, RefusedURL):
                return None, f"refused: {reason}", None
            return None, f"cannot connect ({reason})", 0.0
        except http.client.HTTPException as e:  # a malformed status line or header: its text is the server's
            if isinstance(e, ConnectionError):  # RemoteDisconnected
                return None, "the server closed the connection without a response", 0.0
            return None, f"the server's response is not valid HTTP ({type(e).__name__})", 0.0
        except (ConnectionError, OSError) as e:
            return None, f"connection failed ({type(e).__name__}: {e})", 0.0

    def _store(self, path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def _phrase(code: int) -> str:
    """The standard reason phrase for `code`: the one the server sent is free text it chose."""
    try:
        return HTTPStatus(code).phrase
    except ValueError:
        return "(non-standard status)"


def _retry_after(value: str | None) -> float | None:
    if value and value.strip().isdigit():
        return min(float(value.strip()), 60.0)
    return None


def _not_an_image(data: bytes) -> str | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data)) as img:
                img.verify()
        return None
    except PIL.Image.DecompressionBombError:
        return None  # an image all the same: the build refuses it with the size in the message
    except Exception:
        return f"the server sent {len(data):,} bytes that are not an image"
