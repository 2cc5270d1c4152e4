"""What a server may do with a client's poster: read it only from its own upload folder, with a hard byte limit,
decode it only within a memory budget, and refuse request bodies larger than any valid request.

Nothing here needs Gradio: `app.py` passes Gradio's upload folder in. Every refusal is an `UploadError` whose
message names the problem and the remedy and never quotes the file's content or the server's paths.
"""

from __future__ import annotations

import base64
import binascii
import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NamedTuple, Sequence

from mmgcs.data.confine import inside, read_confined

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
