"""What a server may do with a client's poster: read it only from its own upload folder, with a hard byte limit,
decode it only within a memory budget, and refuse request bodies larger than any valid request; and what the upload
folder may hold: this process's own folder, bounded in bytes, one file per upload request, removed at exit.

Nothing here needs Gradio: `app.py` passes Gradio's upload folder in. Every refusal is an `UploadError` whose
message names the problem and the remedy and never quotes the file's content or the server's paths.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import hashlib
import io
import json
import os
import re
import shutil
import signal
import stat
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Sequence

from mmgcs.data.confine import inside, read_confined

log = logging.getLogger("mmgcs.uploads")

UPLOAD_REMEDY = "Upload the poster file itself (gradio_client.handle_file(path) does that)."


class UploadError(ValueError):
    """A client's poster cannot be used; the message is safe to show to that client."""


class UploadedPoster(NamedTuple):
    """A poster's encoded bytes, read under the rules below, and how messages name it (the client's file name)."""

    data: bytes
    name: str


# The builder's confined read, with the client's messages: the path comes from a client, so it is resolved
# before the check (no `..` or symlink out of the folder), opened without following a last-moment symlink and
# without blocking (a FIFO or a device never stalls a worker; `/dev/zero` or a pipe is not a regular file), and read
# to at most `max_bytes + 1`, whatever `stat` said.
_REFUSALS = {
    "poster_outside_source": "The poster is not a file uploaded to this app.",
    "poster_not_regular_file": "The poster is not a regular file.",
}


def read_upload(path: str | os.PathLike, roots: Sequence[str | os.PathLike], max_bytes: int) -> bytes:
    """The bytes of an uploaded file, read only when it is a regular file inside one of `roots` and at most
    `max_bytes` (`mmgcs.data.confine.read_confined`)."""
    path = Path(path)
    root = next((Path(r) for r in roots if inside(path, Path(r))), None)
    if root is None:
        raise UploadError(f"{_REFUSALS['poster_outside_source']} {UPLOAD_REMEDY}")
    data = read_confined(path, root, max_bytes)
    if isinstance(data, bytes):
        return data
    if data.too_big:
        raise _too_big(max_bytes)
    raise UploadError(f"{_REFUSALS.get(data.reason, 'The poster upload could not be read on the server.')} {UPLOAD_REMEDY}")


def check_size(n_bytes: int, max_bytes: int) -> None:
    if n_bytes > max_bytes:
        raise _too_big(max_bytes)


def _too_big(max_bytes: int) -> UploadError:
    return UploadError(
        f"The poster is over the {max_bytes / 2**20:g} MB limit. Resize it (a poster needs well under "
        "1,000 px a side)."
    )


def decode_data_url(url: str, max_bytes: int) -> bytes:
    """The bytes of a `data:<type>;base64,<data>` URL, refused by its length before anything is decoded."""
    head, sep, body = url.partition(",")
    if not sep or not head.endswith(";base64"):
        raise UploadError("An inline poster must be a base64 `data:` URL (data:image/jpeg;base64,...).")
    check_size(len(body) * 3 // 4, max_bytes)
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise UploadError("The inline poster is not valid base64. Send the file itself instead.") from None


class PixelBudget:
    """Bounds the decoded poster pixels held by all requests at once (a small file can be a large image).

    A request reserves its poster's pixel count before decoding and returns it when its answer is ready;
    when the budget is spent, it waits up to `timeout` seconds for others to finish, then is refused.
    """

    def __init__(self, max_pixels: int, timeout: float = 30.0):
        if max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {max_pixels}")
        self.max_pixels = max_pixels
        self.timeout = timeout
        self._in_use = 0
        self._free = threading.Condition()

    @property
    def in_use(self) -> int:
        return self._in_use

    @contextmanager
    def reserve(self, pixels: int) -> Iterator[None]:
        pixels = min(max(pixels, 0), self.max_pixels)  # one image alone always fits (its own limit is checked apart)
        deadline = time.monotonic() + self.timeout
        with self._free:
            while self._in_use + pixels > self.max_pixels:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UploadError("The server is busy decoding other large posters; try again in a moment.")
                self._free.wait(left)
            self._in_use += pixels
        try:
            yield
        finally:
            with self._free:
                self._in_use -= pixels
                self._free.notify_all()


class BodySizeLimit:
    """ASGI middleware: refuses (413) a request whose body is larger than `max_bytes`, before it is parsed.

    Requests to `exempt` path suffixes (Gradio's multipart upload route, which enforces its own
    `max_file_size`) pass through. A body without Content-Length is counted as it streams in.
    """

    def __init__(self, app, max_bytes: int, exempt: Sequence[str] = ("/upload",)):
        self.app = app
        self.max_bytes = max_bytes
        self.exempt = tuple(exempt)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("path", "").endswith(self.exempt):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await self._refuse(send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                raise _BodyTooLarge()
            return message

        try:
            return await self.app(scope, counted_receive, send)
        except _BodyTooLarge:
            return await self._refuse(send)

    async def _refuse(self, send) -> None:
        body = (
            b'{"error": "The request is larger than this app accepts. Upload the poster file through '
            b'/gradio_api/upload (gradio_client.handle_file) instead of inlining it."}'
        )
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    pass


# ---------------------------------------------------------------------------------------------------------------
# The upload folder: this process's own, bounded in bytes, one file per upload request, removed at exit.

UPLOAD_FOLDER_PREFIX = "mmgcs-uploads-"


def own_upload_folder(environ=os.environ, parent: str | os.PathLike | None = None) -> tuple[Path, bool]:
    """The folder Gradio puts this server's uploads in: `GRADIO_TEMP_DIR` when set, else a new folder of this
    process's own (`mmgcs-uploads-<pid>-*` in the temp folder), set as `GRADIO_TEMP_DIR` so Gradio uses it. Returns
    (folder, whether it is this process's own: `clean_up_at_exit` then deletes all of it). Call before Gradio
    builds the page. Own folders left by processes that are gone (killed) are removed first."""
    if environ.get("GRADIO_TEMP_DIR"):
        return Path(environ["GRADIO_TEMP_DIR"]), False
    parent = Path(parent or tempfile.gettempdir())
    remove_stale_folders(parent)
    folder = Path(tempfile.mkdtemp(prefix=f"{UPLOAD_FOLDER_PREFIX}{os.getpid()}-", dir=parent))
    environ["GRADIO_TEMP_DIR"] = str(folder)
    return folder, True


def remove_stale_folders(parent: Path) -> list[Path]:
    """Remove the own upload folders under `parent` whose process is no longer running; returns them."""
    removed = []
    for folder in parent.glob(UPLOAD_FOLDER_PREFIX + "*"):
        pid = folder.name[len(UPLOAD_FOLDER_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)) and folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: it exists
        return True
    return True


def clean_up_at_exit(folder: Path, own: bool) -> None:
    """Make a stop by SIGTERM (how a host stops a server) the KeyboardInterrupt that Gradio's `launch()` stops on,
    so that Gradio's shutdown deletes the uploads it knows of (`delete_cache`); and delete `folder` itself at exit
    when it is this process's `own` (with what Gradio did not track: interrupted uploads). Call from the main
    thread, before launching."""
    if own:
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def folder_bytes(folder: str | os.PathLike) -> int:
    """The bytes of the regular files under `folder` (symlinks not followed)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                st = os.lstat(os.path.join(root, name))
            except OSError:
                continue  # deleted meanwhile
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
    return total


# A scan of the folder costs ~25 us a file: 224 ms for 9,000 uploads (half an hour of 16 callers, kept
# max_upload_age_s), so a scan every second took a share of the CPU that grew with the folder (22 % of a core there;
# a whole core for a small model's uploads). Scans are spaced to take at most this share of the time: between them
# the uploads accepted are added to the last measure, which can only be too high (a deletion is seen at the next
# scan), so the cap holds whatever the spacing.
SCAN_SHARE = 0.01


class UploadFolder:
    """How full the upload folder is, against `max_bytes`. The folder is measured at most every `rescan_s` seconds,
    and at most `SCAN_SHARE` of the time (a scan that took 0.2 s waits 20 s); in between, the uploads accepted are
    added to the last measure (a burst cannot pass one stale measure). One scan at a time: concurrent uploads read
    the last measure meanwhile."""

    def __init__(self, path: str | os.PathLike, max_bytes: int, rescan_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic):
        self.path, self.max_bytes, self.rescan_s, self.clock = Path(path), max_bytes, rescan_s, clock
        self._measured, self._added, self._at, self._took = 0, 0, -float("inf"), 0.0
        self._scanning = threading.Lock()

    def used(self) -> int:
        start = self.clock()
        first = self._at == -float("inf")  # no measure yet: wait for the scan running, if any
        if self._due(start) and self._scanning.acquire(blocking=first):
            try:
                if self._due(start):  # (another caller may have measured while this one waited)
                    added = self._added  # uploads accepted while the scan runs are kept on top of it
                    measured = folder_bytes(self.path)
                    self._measured, self._added = measured, self._added - added
                    self._at, self._took = start, self.clock() - start
            finally:
                self._scanning.release()
        return self._measured + self._added

    def _due(self, now: float) -> bool:
        return now - self._at >= max(self.rescan_s, self._took / SCAN_SHARE)

    def add(self, n_bytes: int) -> None:
        self._added += n_bytes

    def full_message(self, used: int) -> str:
        return (
            f"The server's upload space is full ({used / 2**20:,.0f} MB of {self.max_bytes / 2**20:,.0f} MB; "
            "uploads are deleted after a while). Try again in a few minutes."
        )


ONE_FILE = "This app takes one file per upload request: upload each poster in its own request."


class UploadGuard:
    """ASGI middleware for Gradio's upload route (a POST to a path ending in `/upload`): refuses an upload while
    the folder is over its cap (HTTP 507) or when it grows past it, and a multipart body with more than
    `max_files` parts (HTTP 413) as soon as the extra part begins. The extra part is cut off with an invalid header
    line, so that Gradio's own parser fails and deletes what it had written of the request; its answer is then
    replaced by this refusal."""

    def __init__(self, app, folder: UploadFolder, max_files: int = 1):
        self.app, self.folder, self.max_files = app, folder, max_files

    async def __call__(self, scope, receive, send):
        path = scope.get("path", "").rstrip("/")
        if scope["type"] != "http" or scope.get("method") != "POST" or not path.endswith("/upload"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length", b"")
        declared = int(declared) if declared.isdigit() else 0
        used = await asyncio.to_thread(self.folder.used)
        room = self.folder.max_bytes - used  # what this request may add (concurrent ones each see it: bounded by
        if declared > room:                  # their number times the file size limit)
            return await json_refusal(send, 507, self.folder.full_message(used))
        boundary = _boundary(headers.get(b"content-type", b""))
        if boundary is None:  # not multipart: Gradio refuses it
            return await self.app(scope, receive, send)
        parts = _PartCounter(boundary)
        state = {"refusal": None, "done": False, "bytes": 0}

        async def counted_receive():
            if state["done"]:
                return await receive()
            message = await receive()
            if message["type"] != "http.request":
                return message
            body = message.get("body", b"")
            state["bytes"] += len(body)
            cut = parts.feed(body, self.max_files)
            if cut is not None:
                body = body[:cut] + b"\x00:\r\n\r\n"
                state["refusal"], state["done"] = (413, ONE_FILE), True
            elif state["bytes"] > room:  # more than it declared: the folder would pass its cap
                body = b"\r\n--" + boundary + b"\r\n\x00:\r\n\r\n"
                state["refusal"], state["done"] = (507, self.folder.full_message(used + state["bytes"])), True
            else:
                state["done"] = not message.get("more_body", False)
                return message
            return {"type": "http.request", "body": body, "more_body": False}

        async def guarded_send(message):
            if state["refusal"] is None:
                return await send(message)
            if message["type"] == "http.response.start":  # Gradio's answer to the cut-off body is replaced
                await json_refusal(send, *state["refusal"])

        await self.app(scope, counted_receive, guarded_send)
        if state["refusal"] is None:
            self.folder.add(state["bytes"])
        else:
            log.warning("refused an upload (%s)", "more than one file" if state["refusal"][0] == 413 else "folder full")


def _boundary(content_type: bytes) -> bytes | None:
    match = re.search(rb'boundary="?([^";\s]+)"?', content_type)
    return match.group(1) if match and content_type.lower().startswith(b"multipart/") else None


class _PartCounter:
    """Counts the parts of a multipart body as it streams in (a delimiter `--boundary` not followed by `--`)."""

    def __init__(self, boundary: bytes):
        self.delimiter = b"--" + boundary
        self.parts = 0
        self._tail = b""
        self._seen = 0  # bytes fed so far
        self._last = -1  # where the last delimiter counted starts

    def feed(self, data: bytes, max_parts: int) -> int | None:
        """Feed the next chunk; when a part past `max_parts` begins, the index in `data` just after its
        delimiter line (what may still be passed on), else None."""
        window = self._tail + data
        base = self._seen - len(self._tail)
        size = len(self.delimiter)
        i = window.find(self.delimiter)
        while 0 <= i and i + size + 2 <= len(window):
            if base + i > self._last:
                self._last = base + i
                if window[i + size:i + size + 2] != b"--":
                    self.parts += 1
                    if self.parts > max_parts:
                        return max(0, i + size + 2 - len(self._tail))
            i = window.find(self.delimiter, i + 1)
        self._seen += len(data)
        self._tail = window[-(size + 1):]
        return None


async def json_refusal(send, status: int, message: str) -> None:
    """A JSON refusal that Gradio's page shows (`detail`) and raw clients read (`error`)."""
    body = json.dumps({"detail": message, "error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------------------------
# Posters shown back: small, kept in memory, sent inline.

class Thumbnails:
    """Small copies of the posters decoded lately, found by their encoded bytes (a digest of them), at most
    `capacity` (least recently used dropped first; 64 x 360 px RGB is ~25 MB). A page that shows a poster again
    (its explanation heat map) reads one of these instead of decoding the upload a second time."""

    def __init__(self, size: int = 360, capacity: int = 64):
        self.size, self.capacity = size, capacity
        self._images: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    def get(self, data: bytes):
        key = hashlib.sha256(data).digest()
        with self._lock:
            image = self._images.get(key)
            if image is not None:
                self._images.move_to_end(key)
            return image

    def put(self, data: bytes, image):
        """Keep (and return) a thumbnail of `image`, a decoded PIL image of the poster whose bytes are `data`."""
        if image is None:
            return None
        if max(image.size) <= self.size:
            small = image.copy()
        else:  # reducing_gap: a box reduction first, then the filter on a small image (~20x faster for 40 MP)
            small = image.resize(_fit(image.size, self.size), reducing_gap=2.0)
        with self._lock:
            self._images[hashlib.sha256(data).digest()] = small
            while len(self._images) > self.capacity:
                self._images.popitem(last=False)
        return small


def _fit(size: tuple[int, int], longest: int) -> tuple[int, int]:
    scale = longest / max(size)
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def inline_image(image, quality: int = 85) -> dict | None:
    """A PIL image as the value of an image output that carries it inline (a WebP `data:` URL) rather than as a file
    written to the server's cache for every answer (a replacement for `gr.Image.postprocess`)."""
    if image is None:
        return None
    encoded = io.BytesIO()
    image.save(encoded, format="WEBP", quality=quality)
    url = "data:image/webp;base64," + base64.b64encode(encoded.getvalue()).decode("ascii")
    return {"path": None, "url": url, "size": len(encoded.getvalue()), "orig_name": "heat-map.webp",
            "mime_type": "image/webp", "is_stream": False, "meta": {"_type": "gradio.FileData"}}
